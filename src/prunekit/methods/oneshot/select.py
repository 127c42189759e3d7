"""Which layers ``prune_oneshot`` prunes: globs over module names, per-glob targets, tied weights.

A glob selects a module when it matches the module's name or the name of a
module around it (``"encoder"`` selects every layer inside the encoder), or one
of the names of its weight (all names of a tied parameter). A weight shared with
an embedding (a tied output head: GPT-2's and Llama's ``lm_head`` with
``tie_word_embeddings``) is left dense unless ``layers`` names it exactly (any of
its names, no wildcards): pruning it would prune the input embedding too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .layers import Layer, layer_kind
from .solvers import Target

__all__ = ["Selection", "globs", "select_layers"]


@dataclass
class Selection:
    """The layers to prune and what was left dense.

    Attributes:
        targets: ``{module name: (Layer, Target)}`` in model order.
        aliases: ``{module name: every name of its weight}`` for tied/shared weights.
        left: ``{module name: why it stays dense}`` (tied embeddings).
        unsupported: ``{module name: error}`` for selected layers one-shot cannot solve.
        by_glob: ``{module name: the key of the sparsity mapping that gave its target}`` (a mapping only).
    """

    targets: dict[str, tuple[Layer, Target]] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    by_glob: dict[str, str] = field(default_factory=dict)


def globs(name: str, value: Any) -> list[str] | None:
    """``value`` (a glob or a list of them) as a list; ``None`` stays ``None``."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(g, str) for g in items):
        raise TypeError(f"prune_oneshot: {name} must be a glob string or a list of them, got {value!r}")
    return list(items)


def _names(module_name: str, weight_names: tuple[str, ...]) -> list[str]:
    parts = module_name.split(".") if module_name else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + list(weight_names)


def _first(names: list[str], patterns: list[str], used: set[str]) -> str | None:
    for g in patterns:
        if any(fnmatch.fnmatchcase(n, g) for n in names):
            used.add(g)
            return g
    return None


def _weight_names(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``{id(parameter): [(full name, owning module), ...]}`` over every name of every parameter."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for full, param in model.named_parameters(remove_duplicate=False):
        module_name = full.rpartition(".")[0]
        owners.setdefault(id(param), []).append((full, modules[module_name]))
    return owners


def _per_glob(sparsity: Any) -> dict[str, Target]:
    if isinstance(sparsity, Mapping):
        if not sparsity or not all(isinstance(k, str) for k in sparsity):
            raise TypeError("prune_oneshot: a sparsity mapping must be non-empty with glob-string keys, "
                            f"got {sparsity!r}")
        return {g: Target.parse(v, f"sparsity[{g!r}]") for g, v in sparsity.items()}
    return {"*": Target.parse(sparsity)}


def select_layers(model: nn.Module, sparsity: Any, layers: list[str] | None,
                  exclude: list[str] | None) -> Selection:
    """The :class:`Selection` for ``prune_oneshot``'s ``sparsity``/``layers``/``exclude``.

    Raises:
        ValueError / TypeError: a glob that matches nothing, nothing selected, a bad sparsity.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> list(select_layers(net, 0.5, None, ["2"]).targets)
        ['0']
    """
    per_glob = _per_glob(sparsity)
    owners = _weight_names(model)
    used: set[str] = set()
    sel, seen = Selection(), set()
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        weight = getattr(module, "weight", None)
        all_names = tuple(n for n, _ in owners.get(id(weight), [])) or (f"{name}.weight",)
        names = _names(name, all_names)
        hits = [_first(names, g, used) for g in (layers or ["*"], exclude or [], list(per_glob))]
        if not hits[0] or hits[1] or not hits[2] or per_glob[hits[2]].fraction <= 0:
            continue
        if kind == "unsupported":
            sel.unsupported[name] = _unsupported_message(name, module)
            continue
        if id(weight) in seen:
            continue  # a weight shared by two layers is pruned once, under its first name
        seen.add(id(weight))
        if len(all_names) > 1:
            sel.aliases[name] = all_names
        tied = [n for n, m in owners.get(id(weight), []) if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
        if tied and not _named_exactly(layers, name, all_names):
            sel.left[name] = (f"its weight is the tied input embedding {tied[0]}; pruning it would prune the "
                              f"embedding too (select it by name, layers=[{name!r}], to prune it anyway)")
            continue
        sel.targets[name] = (Layer.of(name, module), per_glob[hits[2]])
        if isinstance(sparsity, Mapping):
            sel.by_glob[name] = hits[2]
    _check_used(layers, exclude, per_glob if isinstance(sparsity, Mapping) else {}, used)
    if not sel.targets and not sel.unsupported:
        raise ValueError("prune_oneshot: nothing to prune (no Linear/Conv layer selected with a sparsity > 0)")
    return sel


def _named_exactly(layers: list[str] | None, name: str, all_names: tuple[str, ...]) -> bool:
    candidates = {name, *all_names, *(n.rpartition(".")[0] for n in all_names)}
    return any(g in candidates for g in layers or [])


def _unsupported_message(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        why = "its projections are used through F.multi_head_attention_forward, not called as layers"
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        why = "transposed convolutions have no im2col view here"
    else:
        why = "one-shot solves Linear, transformers Conv1D and Conv1d/2d/3d layers only"
    return f"prune_oneshot: cannot solve {kind} at '{name}' ({why}); pass exclude=[{name!r}] to leave it dense"


def _check_used(layers, exclude, per_glob, used) -> None:
    unused = [g for g in (layers or []) + (exclude or []) + list(per_glob) if g not in used]
    if unused:
        raise ValueError(f"prune_oneshot: no prunable layer (Linear/Conv) matches {', '.join(map(repr, unused))}")
