"""Recording a model's forward into a :class:`~prunekit.methods.structural.graph.DependencyGraph`.

The graph's data structures live in :mod:`.graph`; how each recorded op couples
channels lives in :mod:`.propagate`; this module runs the model once and feeds
every torch call (outside opaque layers) and every layer call to the capture.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..._modes import in_mode
from .graph import DependencyGraph, call_model, check_example_input
from .propagate import Capture

__all__ = ["build_graph"]


class _Recorder(TorchFunctionMode):
    """Hands every torch call made outside an opaque layer to the capture."""

    def __init__(self, capture: Any) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        value = func(*args, **kwargs)
        if self.capture.opaque == 0:
            value = self.capture.on_op(func, value, args, kwargs)
        return value


def build_graph(model: nn.Module, example_input: Any, ignore: Iterable[str | type] | None = None, *,
                hidden: bool = False) -> DependencyGraph:
    """Run ``model`` on ``example_input`` and return its :class:`DependencyGraph`.

    Args:
        model: the model (not modified; run once in eval mode under ``no_grad``).
        example_input: a tensor, a tuple of tensors (``model(*inputs)``) or a
            dict of keyword arguments (``model(**inputs)``, e.g. ``{"input_ids": ids}``).
        ignore: module paths or types whose channels are never pruned; they run
            as black boxes, so an unsupported layer can be listed here.
        hidden: let RMS-type norms (Llama, Qwen2, Mistral, Gemma, T5, ``nn.RMSNorm``)
            carry their channels instead of freezing them, so the hidden size
            (residual stream) of such models becomes one prunable group (see
            :mod:`prunekit.methods.structural.rmsnorm`). Off by default: the hidden
            size is frozen by the norms' statistics, as before. LayerNorm
            (mean-centering) freezes its channels either way.

    Raises:
        GraphError: an op or layer the graph cannot follow (the message names
            the op, the module path and what to pass to skip or register it).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> g = build_graph(net, torch.randn(1, 3, 8, 8))
        >>> sorted({m.path for m in g.members})
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_graph: model must be an nn.Module, got {type(model).__name__}")
    check_example_input("build_graph", example_input)
    graph = DependencyGraph(model, hidden=hidden)
    capture = Capture(graph, ignore)
    if hidden:
        graph.surgeries = capture.rms_surgeries()
    handles = capture.install()
    try:
        with in_mode(model, training=False), torch.no_grad(), _Recorder(capture):  # running statistics must not move
            output = call_model(model, example_input)
        capture.finish(output)
    finally:
        for handle in handles:
            handle.remove()
    return graph
