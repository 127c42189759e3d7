"""A small, reproducible training loop and an evaluation helper for in-memory data.

The loop is deliberately ordinary (zero_grad, forward, backward, step): a
:class:`prunekit.Pruner` attached to the optimizer prunes through it unchanged,
because it hooks ``optimizer.step()``.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .._validate import check_int
from .data import make_loader

__all__ = ["train", "evaluate", "epoch_seed"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of ``epoch`` in a run seeded with ``seed``.

    Mixing with ``numpy.random.SeedSequence`` (rather than ``seed + epoch``)
    keeps neighbouring runs from sharing epochs: seed 0 epoch 1 and seed 1
    epoch 0 get unrelated orders.

    Example:
        >>> epoch_seed(0, 1) != epoch_seed(1, 0)
        True
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint32)[0])


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_data(owner: str, X: torch.Tensor, y: torch.Tensor) -> None:
    for name, value in (("X", X), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if X.dim() == 0 or y.dim() == 0 or len(X) != len(y):
        raise ValueError(f"{owner}: X and y must have the same number of samples, got shapes "
                         f"{tuple(X.shape)} and {tuple(y.shape)}")
    if len(X) == 0:
        raise ValueError(f"{owner}: X and y are empty")


def _resolve_progress(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()  # tqdm draws on stderr: only worth it for a person watching
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (auto), got {type(progress).__name__} {progress!r}")
    return progress


def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    optimizer: torch.optim.Optimizer,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` on in-memory ``(X, y)`` with mini-batches; return the mean loss of each epoch.

    Epoch ``e`` visits the samples in the order of
    ``make_loader(..., seed=epoch_seed(seed, e))``, so a run is reproducible
    given the model's initial weights and the optimizer. The model is put in
    training mode and its previous mode is restored afterwards. Batches are
    moved to the device of the model's parameters.

    Args:
        model: the model to train (in place).
        X: inputs, first dimension = samples.
        y: targets (class indices for the default loss).
        epochs: passes over the data (>= 0).
        batch_size: samples per optimizer step (>= 1).
        optimizer: updates the model's parameters; a Pruner may be attached.
        seed: non-negative seed of the shuffling order.
        loss_fn: ``loss_fn(logits, targets) -> scalar``; default cross-entropy.
        progress: show a tqdm bar (``None``: only when stderr is a terminal).
        desc: label of the progress bar.

    Returns:
        Mean per-sample loss of each epoch (losses of a batch are weighted by its size).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> X, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> losses = train(model, X, y, epochs=3, batch_size=8, optimizer=opt, progress=False)
        >>> len(losses)
        3
    """
    owner = "train"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_data(owner, X, y)
    epochs = check_int(owner, "epochs", epochs, minimum=0)
    batch_size = check_int(owner, "batch_size", batch_size, minimum=1)
    seed = check_int(owner, "seed", seed, minimum=0)
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    steps_per_epoch = math.ceil(len(X) / batch_size)
    was_training = model.training
    model.train()
    try:
        with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", disable=not _resolve_progress(progress),
                  file=sys.stderr, dynamic_ncols=True) as bar:
            return [_train_epoch(model, X, y, e, batch_size, optimizer, seed, loss_fn, bar) for e in range(epochs)]
    finally:
        model.train(was_training)


def _train_epoch(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    seed: int,
    loss_fn: LossFn,
    bar: tqdm,
) -> float:
    """One pass over the data; returns the mean per-sample loss."""
    device = _device_of(model)
    total, count = 0.0, 0
    for xb, yb in make_loader(X, y, batch_size=batch_size, shuffle=True, seed=epoch_seed(seed, epoch)):
        xb, yb = xb.to(device), yb.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(xb)
        count += len(xb)
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.4f}", refresh=False)
    return total / count


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a classifier on ``(X, y)``.

    Runs in eval mode under ``torch.no_grad()`` in batches of ``batch_size`` and
    restores the model's previous train/eval mode.

    Args:
        model: a classifier returning logits ``(N, num_classes)``.
        X: inputs, first dimension = samples.
        y: int64 class indices ``(N,)``.
        batch_size: samples per forward pass (>= 1).

    Returns:
        ``{"loss": mean per-sample cross-entropy, "accuracy": fraction correct in [0, 1]}``.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> X, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> sorted(evaluate(model, X, y, batch_size=10))
        ['accuracy', 'loss']
    """
    owner = "evaluate"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    _check_data(owner, X, y)
    batch_size = check_int(owner, "batch_size", batch_size, minimum=1)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        loss_sum, correct = 0.0, 0
        for start in range(0, len(X), batch_size):
            xb, yb = X[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            logits = model(xb)
            # Summed per batch, divided once: a short last batch keeps its true weight.
            loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return {"loss": loss_sum / len(X), "accuracy": correct / len(X)}
