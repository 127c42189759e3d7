"""Groups: units that touch the same set of parameter slices, ranked and pruned together.

A *unit* is a class of coupled channel atoms (one channel of a conv and of the
BatchNorm after it and the input column of the next conv; one attention head;
one whole convolution group). Units that touch exactly the same members form a
:class:`Group` (e.g. all output channels of one conv, or every channel of a
residual stream); a sparsity applies to each group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .graph import DependencyGraph, Member

__all__ = ["Group", "find_groups", "param_masks", "kept_indices", "canonical_names"]


@dataclass(frozen=True)
class Slot:
    """One member as seen by one group: ``unit[i]`` is the group-local unit of index ``i``, or -1."""

    member: Member
    unit: torch.Tensor


@dataclass(frozen=True)
class Group:
    """Coupled units pruned together.

    Attributes:
        name: the first member, e.g. ``"conv1.weight[0]"``.
        size: number of units.
        slots: the members with their index-to-unit maps.
    """

    name: str
    size: int
    slots: tuple[Slot, ...]

    def describe(self) -> str:
        """One line: name, units, members."""
        members = ", ".join(f"{s.member.path}.{s.member.param}[{s.member.dim}]" for s in self.slots)
        return f"{self.name}: {self.size} units over {members}"


def find_groups(graph: DependencyGraph) -> list[Group]:
    """Every prunable group of ``graph`` (frozen units are left out), in model order.

    Example:
        >>> from prunekit.methods.structural.trace import build_graph
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> [g.describe() for g in find_groups(build_graph(net, torch.randn(1, 4)))]
        ['0.weight[0]: 6 units over 0.weight[0], 0.bias[0], 2.weight[1]']
    """
    touching: dict[int, list[int]] = {}
    for index, member in enumerate(graph.members):
        for atom in member.atoms:
            unit = graph.unit_of(atom)
            if unit is not None:
                seen = touching.setdefault(unit, [])
                if not seen or seen[-1] != index:
                    seen.append(index)
    by_key: dict[tuple[int, ...], list[int]] = {}
    for unit, members in touching.items():
        by_key.setdefault(tuple(members), []).append(unit)
    groups = []
    for members, units in sorted(by_key.items(), key=lambda kv: (kv[0], min(kv[1]))):
        local = {unit: i for i, unit in enumerate(units)}
        slots = []
        for index in members:
            member = graph.members[index]
            roots = [graph.unit_of(a) for a in member.atoms]
            slots.append(Slot(member, torch.tensor([local.get(r, -1) if r is not None else -1 for r in roots])))
        first = slots[0].member
        name = f"{first.path}.{first.param}[{first.dim}]"
        taken = sum(g.name == name or g.name.startswith(name + "#") for g in groups)
        groups.append(Group(f"{name}#{taken}" if taken else name, len(units), tuple(slots)))
    return groups


def _removed(groups: list[Group], keeps: Mapping[str, torch.Tensor]) -> dict[tuple[str, str, int], torch.Tensor]:
    removed: dict[tuple[str, str, int], torch.Tensor] = {}
    for group in groups:
        keep = keeps[group.name]
        if keep.shape != (group.size,) or keep.dtype != torch.bool:
            raise ValueError(f"keep mask of group {group.name!r} must be bool of shape ({group.size},)")
        for slot in group.slots:
            m = slot.member
            key = (m.path, m.param, m.dim)
            gone = (slot.unit >= 0) & ~keep[slot.unit.clamp(min=0)]
            removed[key] = removed[key] | gone if key in removed else gone
    return removed


def kept_indices(groups: list[Group], keeps: Mapping[str, torch.Tensor]) -> dict[str, dict[str, dict[int, torch.Tensor]]]:
    """``{module path: {tensor: {dim: kept indices}}}`` for every dim that loses an index."""
    out: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for (path, param, dim), gone in _removed(groups, keeps).items():
        if gone.any():
            out.setdefault(path, {}).setdefault(param, {})[dim] = torch.nonzero(~gone).flatten()
    return out


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every name of every parameter -> its first name (the one ``named_parameters()`` lists for a tied weight)."""
    first: dict[int, str] = {}
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(param), name)
    return out


def param_masks(graph: DependencyGraph, groups: list[Group],
                keeps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (``True`` = kept) by full parameter name, for every parameter that loses entries.

    Every member of a removed unit is zeroed: conv rows, BatchNorm weight and
    bias, the next layer's input columns, biases, attention rows and columns.
    Buffers (running statistics) are left alone: they do not change the output.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from prunekit.methods.structural import build_graph, find_groups
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> graph = build_graph(net, torch.randn(1, 4))
        >>> groups = find_groups(graph)
        >>> masks = param_masks(graph, groups, {g.name: torch.tensor([True, False, True]) for g in groups})
        >>> sorted(masks), masks["2.weight"][0].tolist()
        (['0.bias', '0.weight', '2.weight'], [True, False, True])
    """
    params = dict(graph.model.named_parameters())
    canonical = canonical_names(graph.model)
    masks: dict[str, torch.Tensor] = {}
    for (path, param, dim), gone in _removed(groups, keeps).items():
        name = canonical.get(f"{path}.{param}" if path else param)  # a tied weight: under its first name
        if name not in params or not gone.any():
            continue
        tensor = params[name]
        mask = masks.setdefault(name, torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device))
        mask.index_fill_(dim, torch.nonzero(gone).flatten().to(tensor.device), False)
    return masks
