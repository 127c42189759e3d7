"""One-shot pruning of pretrained models from calibration data: magnitude, Wanda and SparseGPT.

* :func:`prune_oneshot` — the entry point: block-by-block calibration with
  pruned outputs propagated, per-layer solvers, a :class:`OneShotReport`.
* :mod:`~prunekit.methods.oneshot.solvers` — the per-layer solvers on a weight and its
  inputs' Gram matrix (:func:`magnitude_prune`, :func:`wanda_prune`, :func:`sparsegpt_prune`).
* :mod:`~prunekit.methods.oneshot.blocks` — block discovery and exact block inputs.
* :mod:`~prunekit.methods.oneshot.calibration` — calibration calls (no KV cache) and Gram hooks.
* :mod:`~prunekit.methods.oneshot.layers` — each layer as an ``(out, in·k)`` matrix problem
  (Linear, transformers ``Conv1D``, convolutions through im2col).

Example:
    >>> import torch, prunekit.methods.oneshot as oneshot
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> report = oneshot.prune_oneshot(net, [torch.randn(32, 16)], method="wanda", sparsity=0.5, blocks=False)
    >>> round(report.sparsity, 2)
    0.5
"""

from .blocks import BlockFeeder, find_blocks, resolve_blocks
from .calibration import GramAccumulator
from .layers import Layer, UnsupportedLayer
from .prune import METHODS, LayerResult, OneShotReport, prune_oneshot
from .solvers import Target, magnitude_prune, relative_error, sparsegpt_prune, wanda_prune

__all__ = [
    "BlockFeeder",
    "GramAccumulator",
    "Layer",
    "UnsupportedLayer",
    "resolve_blocks",
    "LayerResult",
    "METHODS",
    "OneShotReport",
    "Target",
    "find_blocks",
    "magnitude_prune",
    "prune_oneshot",
    "relative_error",
    "sparsegpt_prune",
    "wanda_prune",
]
