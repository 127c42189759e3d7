"""Registry of layer surgeries: how a layer couples channels, and how to rebuild it smaller.

A *surgery* is two functions for one layer type:

* ``couple(module, ctx, *inputs, **kwargs) -> Flow | tuple``: given the Flows of
  the call's arguments, record which parameter slices follow which channels
  (``ctx.member``), create or couple channels (``ctx.new_atoms``, ``ctx.unite``,
  ``ctx.input_atoms``) and return the Flow(s) of the output (``ctx.out``).
* ``rebuild(module, keep) -> nn.Module``: the smaller module, where
  ``keep = {param: {dim: LongTensor of kept indices}}`` lists only the dims
  that shrink. The built-in surgeries slice the module in place and return it
  (:func:`~prunekit.methods.structural.layers.slice_inplace`); a rebuild may also return
  a new module (:func:`slice_state` gives the sliced state to load).

A type with a surgery is traced as one block (never entered by ``torch.fx``).
The built-in surgeries (:mod:`.layers`, :mod:`.recurrent`) are looked up after
the registered ones, so :func:`register_surgery` can replace any of them.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import layers, recurrent
from .layers import slice_state

__all__ = ["Surgery", "register_surgery", "find_surgery", "slice_state", "Keep"]

Keep = Mapping[str, Mapping[int, torch.Tensor]]


@dataclass(frozen=True)
class Surgery:
    """The two functions of a layer's surgery (see the module docstring)."""

    couple: Callable[..., Any]
    rebuild: Callable[[nn.Module, Keep], nn.Module]


_REGISTRY: dict[type, Surgery] = {}


def register_surgery(module_type: type, couple: Callable[..., Any],
                     rebuild: Callable[[nn.Module, Keep], nn.Module]) -> None:
    """Teach structural pruning a layer type (and its subclasses).

    Args:
        module_type: an ``nn.Module`` subclass.
        couple: ``(module, ctx, *input_flows, **kwarg_flows) -> output Flow(s)``;
            ``ctx`` is a :class:`~prunekit.methods.structural.graph.Context`.
        rebuild: ``(module, keep) -> new module``; ``keep`` maps a parameter
            name to ``{dim: kept indices}`` for the dims that shrink.

    Example:
        >>> class Scale(nn.Module):  # y = x * alpha, one alpha per channel
        ...     def __init__(self, c):
        ...         super().__init__()
        ...         self.alpha = nn.Parameter(torch.ones(c))
        ...     def forward(self, x):
        ...         return x * self.alpha.view(1, -1, 1, 1)
        >>> def couple(m, ctx, x):
        ...     atoms = ctx.input_atoms(x, dim=1, size=m.alpha.numel())
        ...     ctx.member("alpha", 0, atoms)
        ...     return ctx.out(atoms, dim=1)
        >>> def rebuild(m, keep):
        ...     new = Scale(len(keep["alpha"][0]) if "alpha" in keep else m.alpha.numel())
        ...     new.load_state_dict(slice_state(m, keep))
        ...     return new
        >>> register_surgery(Scale, couple, rebuild)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_surgery: module_type must be an nn.Module subclass, got {module_type!r}")
    for arg, fn in (("couple", couple), ("rebuild", rebuild)):
        if not callable(fn):
            raise TypeError(f"register_surgery: {arg} must be callable, got {type(fn).__name__}")
    _REGISTRY[module_type] = Surgery(couple, rebuild)


def find_surgery(module_type: type) -> Surgery | None:
    """The surgery for ``module_type``: the most specific class in its MRO with one, or ``None``.

    At each class a registered surgery comes before a built-in one.

    Example:
        >>> find_surgery(nn.Conv2d).rebuild.__name__, find_surgery(nn.ReLU)
        ('rebuild_conv', None)
    """
    builtin, known = _builtin_surgeries(), _known_library_surgeries()
    for cls in module_type.__mro__:
        surgery = _REGISTRY.get(cls) or builtin.get(cls) or known.get(cls)
        if surgery is not None:
            return surgery
    return None


@functools.cache
def _builtin_surgeries() -> dict[type, Surgery]:
    # Built once, on the first lookup, and kept apart from _REGISTRY (which holds only what users register).
    pairs = {**layers.builtin_surgeries(), **recurrent.builtin_surgeries()}
    return {module_type: Surgery(couple, rebuild) for module_type, (couple, rebuild) in pairs.items()}


def _known_library_surgeries() -> dict[type, Surgery]:
    """Surgeries for layers of libraries already imported (transformers' ``Conv1D``); never imports anything."""
    # Only a library the user imported can have built the model's layers: sys.modules costs a dict lookup.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if not isinstance(conv1d, type):
        return {}
    return {conv1d: Surgery(layers.couple_linear, layers.rebuild_linear)}
