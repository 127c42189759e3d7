"""Loading a ``torch.export`` program of an accelerated model: every prunekit operator registered first.

An exported program holds calls to ``torch.ops.prunekit.*`` (fp32 kernels from
:mod:`prunekit.runtime.ops`, int8 kernels from :mod:`prunekit.runtime.int8`), not prunekit's
module classes; ``torch.export.load`` can resolve them only once they are registered.
"""

from __future__ import annotations

import os

import torch

from . import int8, ops

__all__ = ["load"]


def load(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """``torch.export.load(path)`` after registering prunekit's fp32 and int8 operators.

    The program runs with or without the compiled kernels (the operators fall
    back to pure torch with the same results).

    Example:
        >>> program = load("model.pt2")  # doctest: +SKIP
        >>> y = program.module()(x)  # doctest: +SKIP
    """
    ops.register()
    int8.register_ops()
    return torch.export.load(path)
