"""Sparse execution: modules that run pruned layers fast, and :func:`accelerate` to pick them.

The dense model with exact zeros (:func:`prunekit.strip`) is the oracle every
fast path is checked against.
"""

from .conv import SparseConv2d
from .swap import accelerate
from .modules import FORMATS, SparseLinear
from .report import AccelerationReport, LayerChoice

__all__ = ["FORMATS", "AccelerationReport", "LayerChoice", "SparseConv2d", "SparseLinear", "accelerate"]
