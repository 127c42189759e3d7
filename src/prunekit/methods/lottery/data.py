"""The three splits a lottery run trains, early-stops and reports on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ...training.data import stratified_split

__all__ = ["LotteryData"]

_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LotteryData:
    """Training, validation and test tensors (in memory).

    The validation split picks the early-stopping iteration (minimum
    validation loss); the test split is only evaluated on the weights of that
    iteration and on the final weights, never to choose anything.

    Attributes:
        X_train, y_train: training inputs and labels.
        X_val, y_val: validation inputs and labels (carved from the training data).
        X_test, y_test: test inputs and labels.

    Example:
        >>> X, y = torch.randn(100, 4), torch.arange(100) % 2
        >>> data = LotteryData.carve(X, y, X[:10], y[:10], val_fraction=0.2)
        >>> len(data.X_train), len(data.X_val)
        (80, 20)
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def __post_init__(self) -> None:
        for split in _SPLITS:
            X, y = getattr(self, f"X_{split}"), getattr(self, f"y_{split}")
            if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise TypeError(f"LotteryData: X_{split} and y_{split} must be torch.Tensors")
            if X.dim() == 0 or y.dim() == 0 or len(X) != len(y) or len(X) == 0:
                raise ValueError(f"LotteryData: X_{split} and y_{split} must be non-empty with the same number of "
                                 f"samples, got shapes {tuple(X.shape)} and {tuple(y.shape)}")

    @classmethod
    def carve(cls, X: torch.Tensor, y: torch.Tensor, X_test: torch.Tensor, y_test: torch.Tensor, *,
              val_fraction: float = 0.1, seed: int = 0) -> "LotteryData":
        """Split a validation set off the training data, stratified and deterministic.

        Uses :func:`prunekit.training.data.stratified_split` on ``y``: the same arguments
        always give the same split, and the test data is never touched.

        Example:
            >>> from prunekit.training.data import load_mnist5k
            >>> data = LotteryData.carve(*load_mnist5k("train"), *load_mnist5k("test"))
            >>> len(data.X_train), len(data.X_val), len(data.X_test)
            (3600, 400, 1000)
        """
        train_idx, val_idx = stratified_split(y, val_fraction, seed)
        train_t, val_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        return cls(X[train_t], y[train_t], X[val_t], y[val_t], X_test, y_test)

    def fingerprint(self) -> str:
        """SHA-256 over the shapes, dtypes and bytes of all six tensors (part of a run's config hash)."""
        digest = hashlib.sha256()
        for split in _SPLITS:
            for tensor in (getattr(self, f"X_{split}"), getattr(self, f"y_{split}")):
                array = np.ascontiguousarray(tensor.detach().cpu().numpy())
                digest.update(f"{split}:{array.dtype.str}:{array.shape};".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()
