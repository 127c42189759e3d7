"""A resumable training phase: :func:`prunekit.training.loop.train`'s loop, checkpointed.

The batch order, the update and the loss bookkeeping are those of
:func:`prunekit.training.loop.train` (epoch ``e`` shuffled by
``epoch_seed(seed, e)``), so an uninterrupted phase gives the same weights as
``train``. A checkpoint records the position in that order; resuming skips the
batches already run and continues bit-identically.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ...training.data import make_loader
from ...training.loop import epoch_seed
from ...training.checkpoint import Position, restore_checkpoint, save_checkpoint

__all__ = ["Phase", "run_phase"]


@dataclass(frozen=True)
class Phase:
    """One training phase.

    Attributes:
        epochs: passes over the data.
        batch_size: samples per optimizer step.
        seed: seed of the batch order (``epoch_seed(seed, e)`` for epoch ``e``).
        checkpoint: checkpoint file (``None``: no checkpoints).
        every: optimizer steps between checkpoints (``None``: at the end of each epoch).
        desc: progress bar label.
    """

    epochs: int
    batch_size: int
    seed: int
    checkpoint: Path | None = None
    every: int | None = None
    desc: str = "train"


def run_phase(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, phase: Phase,
              *, pruner: Any | None = None, progress: bool = False) -> dict[str, Any]:
    """Train ``model`` for ``phase``; resume from ``phase.checkpoint`` if it exists.

    Returns:
        ``{"epoch_losses": [...], "steps": total optimizer steps, "resumed_at": step or None}``.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> X, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
        >>> run_phase(net, opt, X, y, Phase(epochs=2, batch_size=8, seed=0))["steps"]
        6
    """
    pos, resumed = Position(), None
    if phase.checkpoint is not None:
        # Debris of a write cut off by a crash (the checkpoint itself is intact: writes are atomic).
        for stale in phase.checkpoint.parent.glob(f".{phase.checkpoint.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if phase.checkpoint is not None and phase.checkpoint.exists():
        pos = restore_checkpoint(phase.checkpoint, model=model, optimizer=optimizer, pruner=pruner)
        resumed = pos.step
    per_epoch = math.ceil(len(X) / phase.batch_size)
    was_training = model.training
    model.train()
    try:
        with tqdm(total=phase.epochs * per_epoch, initial=pos.step, desc=phase.desc, unit="step",
                  disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            while pos.epoch < phase.epochs:
                _epoch(model, optimizer, X, y, phase, pos, per_epoch, pruner, bar)
    finally:
        model.train(was_training)
    return {"epoch_losses": pos.epoch_losses, "steps": pos.step, "resumed_at": resumed}


def _epoch(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, phase: Phase,
           pos: Position, per_epoch: int, pruner: Any | None, bar: tqdm) -> None:
    loader = make_loader(X, y, batch_size=phase.batch_size, shuffle=True, seed=epoch_seed(phase.seed, pos.epoch))
    loss_fn = nn.CrossEntropyLoss()
    for index, (xb, yb) in enumerate(loader):
        if index < pos.batch:  # already run before the checkpoint this phase resumed from
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        pos.loss_sum += loss.item() * len(xb)
        pos.loss_count += len(xb)
        pos.step += 1
        pos.batch = index + 1
        bar.update(1)
        bar.set_postfix(epoch=pos.epoch + 1, loss=f"{pos.loss_sum / pos.loss_count:.4f}", refresh=False)
        if pos.batch == per_epoch:
            pos.epoch_losses.append(pos.loss_sum / pos.loss_count)
            pos.epoch, pos.batch, pos.loss_sum, pos.loss_count = pos.epoch + 1, 0, 0.0, 0
        due = pos.batch == 0 if phase.every is None else pos.step % phase.every == 0
        if phase.checkpoint is not None and due:
            save_checkpoint(phase.checkpoint, model=model, optimizer=optimizer, pruner=pruner, position=pos)
