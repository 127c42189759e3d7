"""Switch a model to training or eval mode for a while, and put every module back exactly as it was."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["in_mode"]


@contextlib.contextmanager
def in_mode(model: nn.Module, *, training: bool) -> Iterator[nn.Module]:
    """Run the block with ``model.train(training)``; restore each module's own flag on exit, even on an exception.

    ``model.train(was_training)`` would not do: it sets every submodule to the
    root's flag, so a submodule kept in eval mode on purpose (a frozen
    BatchNorm, a teacher, a dropout switched off) would come back in training
    mode. The flags are restored by assignment, not by calling ``train()``
    again, so overridden ``train`` methods cannot move them.

    Args:
        model: the model (changed in place for the duration of the block).
        training: ``True`` for training mode, ``False`` for eval mode.

    Yields:
        ``model``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> _ = model[1].eval()
        >>> with in_mode(model, training=False):
        ...     model[0].training
        False
        >>> model.training, model[0].training, model[1].training
        (True, True, False)
    """
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in saved:
            module.training = flag
