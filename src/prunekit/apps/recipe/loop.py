"""A resumable training phase: :func:`prunekit.training.loop.run_loop` with checkpoints.

The batch order, the update and the loss bookkeeping are those of
:func:`prunekit.training.loop.train` (epoch ``e`` shuffled by
``epoch_seed(seed, e)``), so an uninterrupted phase gives the same weights as
``train``. A checkpoint records the position in that order; resuming skips the
batches already run and continues bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...training.checkpoint import Checkpoints
from ...training.loop import LoopOptions, run_loop

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
    checkpoints = None if phase.checkpoint is None else Checkpoints(phase.checkpoint, optimizer, pruner, phase.every)
    start = None if checkpoints is None else checkpoints.resume(model)
    options = LoopOptions(epochs=phase.epochs, batch_size=phase.batch_size, seed=phase.seed, progress=progress,
                          desc=phase.desc)
    pos = run_loop(model, optimizer, X, y, options, start=start, callbacks=[] if checkpoints is None else [checkpoints])
    return {"epoch_losses": pos.epoch_losses, "steps": pos.step, "resumed_at": None if start is None else start.step}
