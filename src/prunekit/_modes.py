"""Switch a model to training or eval mode, or the CPU to flushing denormal floats, for a while; restore them after."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["denormals_flushed", "in_mode"]


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


def _flushing_denormals() -> bool:
    # the smallest positive float32 (a denormal, built from its bits so that no conversion can flush
    # it first) survives a multiplication only when denormals are not treated as zero
    tiny = torch.tensor([1], dtype=torch.int32).view(torch.float32)
    return bool((tiny * 1.0).item() == 0.0)


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Run the block with denormal floats flushed to zero on the CPU (``torch.set_flush_denormal``); restore after.

    Activations of a degraded (heavily pruned) network can drift into the
    denormal range (below ~1.2e-38 in float32), where CPU arithmetic takes a
    slow microcode path, many times slower. Flushing them to zero changes each
    such value by less than 1.2e-38. The setting belongs to the calling
    thread (the x86 MXCSR register): all the work with one intra-op thread, the
    caller's share with more (torch's running worker threads keep theirs). The
    previous setting is read back by a probe (torch has no getter) and restored.
    Where the CPU cannot flush (no DAZ support) the block runs unchanged.

    Example:
        >>> tiny = torch.tensor([1], dtype=torch.int32).view(torch.float32)
        >>> with denormals_flushed():
        ...     flushed = (tiny * 1.0).item()
        >>> flushed, (tiny * 1.0).item() > 0  # flushed inside, restored after
        (0.0, True)
    """
    before = _flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
