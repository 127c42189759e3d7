"""Importance of each unit of a group, aggregated over every member of the unit.

Per member (a parameter slice along one dim) and per unit:

* ``"l1"``: ``sum |w|`` over the unit's entries;
* ``"l2"``: ``sqrt(sum w^2)`` over the unit's entries (the member's norm);
* ``"taylor"``: ``sum |w * grad|`` (first-order Taylor estimate of the loss
  change; needs gradients, see :func:`~prunekit.methods.structural.prune_channels`'s
  ``loss_fn``);
* ``"bn"``: ``|gamma|`` of the unit's BatchNorm channels; only BatchNorm
  weights count (a group without one falls back to ``"l2"``);
* a callable ``(tensor, dim) -> 1-D scores`` of length ``tensor.shape[dim]``,
  summed over each unit's indices.

The unit's score is the ``"sum"`` (default) or ``"mean"`` over its members.
Only parameters count, never buffers such as running statistics.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from ...core.distributed import full_tensor
from .groups import Group, canonical_names

__all__ = ["METHODS", "Importance", "group_scores"]

Importance = Union[str, Callable[[torch.Tensor, int], torch.Tensor]]
METHODS = ("l1", "l2", "taylor", "bn")


def _per_index(tensor: torch.Tensor, dim: int, power: int) -> torch.Tensor:
    other = [d for d in range(tensor.ndim) if d != dim]
    values = tensor.abs() if power == 1 else tensor.square()
    return values.sum(dim=other) if other else values


def _member_scores(method: Importance, tensor: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    if callable(method):
        scores = method(full_tensor(tensor.detach()), dim)
        if not isinstance(scores, torch.Tensor) or scores.shape != (tensor.shape[dim],):
            raise ValueError(f"importance callable must return a 1-D tensor of length {tensor.shape[dim]} "
                             f"for '{name}', got {getattr(scores, 'shape', type(scores).__name__)}")
        return scores.detach().float()
    if method == "taylor":
        if tensor.grad is None:
            raise ValueError(f"importance='taylor' needs gradients, and '{name}' has none: pass loss_fn")
        return _per_index(full_tensor(tensor.detach() * tensor.grad).float(), dim, 1)
    # FSDP2: scored on the whole parameter (an all-gather), as in one process.
    return _per_index(full_tensor(tensor.detach()).float(), dim, 1 if method == "l1" else 2)


def group_scores(model: nn.Module, group: Group, method: Importance = "l2", reduction: str = "sum") -> torch.Tensor:
    """One score per unit of ``group`` (higher = keep).

    Example:
        >>> from prunekit.methods.structural.trace import build_graph
        >>> from prunekit.methods.structural.groups import find_groups
        >>> net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 0], [0, 2], [0, 0]])); _ = net[1].weight.fill_(0)
        >>> group_scores(net, find_groups(build_graph(net, torch.randn(1, 2)))[0], "l1")
        tensor([1., 2., 0.])
    """
    params = dict(model.named_parameters())
    canonical = canonical_names(model)
    seen: set[tuple[str, int]] = set()  # a tied weight reached twice (embedding and head) counts once
    use_bn = method == "bn" and any(_is_bn_weight(model, s.member) for s in group.slots)
    total = torch.zeros(group.size)
    count = 0
    for slot in group.slots:
        m = slot.member
        name = canonical.get(f"{m.path}.{m.param}" if m.path else m.param, "")
        if name not in params or (name, m.dim) in seen or (use_bn and not _is_bn_weight(model, m)):
            continue
        seen.add((name, m.dim))
        method_here = "l2" if method == "bn" else method
        per_index = _member_scores(method_here if not use_bn else "l1", params[name], m.dim, name).cpu()
        if per_index.shape[0] != slot.unit.shape[0]:
            raise ValueError(f"'{name}' changed shape since the graph was built; build it again")
        live = slot.unit >= 0
        unit = torch.zeros(group.size).index_add_(0, slot.unit[live], per_index[live])
        total += unit.sqrt() if method_here == "l2" and not use_bn else unit
        count += 1
    if not torch.isfinite(total).all():
        raise ValueError(f"non-finite importance in group {group.name!r} (NaN or Inf weights or gradients)")
    return total / max(count, 1) if reduction == "mean" else total


def _is_bn_weight(model: nn.Module, member: object) -> bool:
    return member.param == "weight" and isinstance(model.get_submodule(member.path),
                                                   nn.modules.batchnorm._BatchNorm)
