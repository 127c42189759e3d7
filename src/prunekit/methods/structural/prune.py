"""One-shot structural pruning: rank the units of every group, remove the weakest for real."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..._modes import in_mode
from ..._validate import check_choice, check_int, check_sparsity
from ...core.granularity import lowest_k, prune_count
from .flow import GraphError
from .graph import DependencyGraph, call_model
from .groups import Group, find_groups, kept_indices, param_masks
from .hf import input_embeddings, sync_transformers
from .importance import METHODS, Importance, group_scores
from .macs import count_macs, count_params
from .surgery import Shapes, shrink
from .trace import build_graph

__all__ = ["GroupResult", "StructuralReport", "prune_channels", "select_units", "score_groups"]


@dataclass(frozen=True)
class GroupResult:
    """Units kept out of ``total`` in group ``name``."""

    name: str
    kept: int
    total: int


@dataclass(frozen=True)
class StructuralReport:
    """What structural pruning removed.

    Attributes:
        params_before / params_after: parameter entries.
        macs_before / macs_after: multiply-accumulates of one forward on the example input.
        groups: per-group units kept.
        shapes: ``{module path: {tensor: shape}}`` of every rebuilt layer (JSON-able);
            :func:`~prunekit.methods.structural.apply_shapes` rebuilds the architecture from it.
        notes: what the model's ``config`` could not express (transformers
            models), so that ``apply_shapes`` is the way to reload it.
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: tuple[GroupResult, ...]
    shapes: Shapes = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def mac_reduction(self) -> float:
        """``macs_before / macs_after`` (how many times fewer MACs)."""
        return self.macs_before / max(self.macs_after, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "groups": [vars(g) for g in self.groups], "shapes": self.shapes, "notes": list(self.notes)}

    def __str__(self) -> str:
        return (f"params {self.params_before:,} -> {self.params_after:,}, MACs {self.macs_before:,} -> "
                f"{self.macs_after:,} ({self.mac_reduction:.2f}x fewer), {len(self.groups)} groups")


def select_units(scores: torch.Tensor, sparsity: float, round_to: int = 1) -> torch.Tensor:
    """Keep-vector over units: drop ``round(n * sparsity)`` lowest, keep a multiple of ``round_to`` (>= 1).

    The kept count is rounded *up* to a multiple of ``round_to`` (never above ``n``).

    Example:
        >>> select_units(torch.tensor([4.0, 1.0, 3.0, 2.0, 5.0]), 0.5)  # prune round(2.5) = 2
        tensor([ True, False,  True, False,  True])
        >>> select_units(torch.tensor([4.0, 1.0, 3.0, 2.0, 5.0]), 0.5, round_to=2)  # keep 3 -> 4
        tensor([ True, False,  True,  True,  True])
    """
    n = scores.numel()
    keep_n = max(1, n - prune_count(n, sparsity))
    keep_n = min(n, math.ceil(keep_n / round_to) * round_to)
    return lowest_k(scores, n - keep_n)


def score_groups(model: nn.Module, groups: Sequence[Group], importance: Importance = "l2",
                 reduction: str = "sum") -> dict[str, torch.Tensor]:
    """``{group name: unit scores}`` (see :mod:`prunekit.methods.structural.importance`)."""
    return {g.name: group_scores(model, g, importance, reduction) for g in groups}


def _check_importance(importance: Importance) -> None:
    if not callable(importance):
        check_choice("prune_channels", "importance", importance, METHODS)


def _gradients(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("prune_channels: loss_fn(model) must return a scalar tensor")
    loss.backward()


def prune_channels(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    sparsity: float = 0.5,
    *,
    importance: Importance = "l2",
    reduction: str = "sum",
    round_to: int = 1,
    ignore: Iterable[str | type] | None = None,
    loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    verify: bool = True,
    hidden_sparsity: float | None = None,
) -> tuple[nn.Module, StructuralReport]:
    """Remove the least important ``sparsity`` fraction of every group's units, physically, in place.

    Channels, convolution groups, attention heads and LSTM hidden units coupled
    by the model's dataflow (see :func:`~prunekit.methods.structural.build_graph`) are
    removed together; the model's inputs and outputs never change shape.

    Args:
        model: the model; its layers are replaced by smaller ones of the same
            kind, under the same names (``copy.deepcopy`` it first to keep the original).
        example_input: a tensor or tuple of tensors for tracing and MAC counting.
        sparsity: fraction of each group's units to remove, in [0, 1).
        importance: ``"l1"``, ``"l2"``, ``"bn"``, ``"taylor"`` or a callable
            ``(tensor, dim) -> scores`` (see :mod:`prunekit.methods.structural.importance`).
        reduction: ``"sum"`` or ``"mean"`` of a unit's scores over its members.
        round_to: keep a multiple of this many units per group (rounded up).
        ignore: module paths or types whose channels are never pruned.
        loss_fn: ``model -> scalar loss`` whose gradients feed ``"taylor"``.
        verify: check on ``example_input`` that the pruned model computes what the
            model with the removed units zeroed computes (one extra forward);
            a :class:`GraphError` if not. A transformers model's attributes and
            ``config`` are updated too (see :mod:`prunekit.methods.structural.hf`).
        hidden_sparsity: opt-in hidden-size (residual stream) pruning: the
            fraction of the channels normalized by RMS-type norms (Llama, Qwen2,
            Mistral, Gemma, T5, ``nn.RMSNorm``) to remove, as one group over the
            token embedding (and a tied output head: one parameter, cut once),
            every norm on the stream (``eps`` and weights rescaled so the function
            is unchanged, see :mod:`prunekit.methods.structural.rmsnorm`), every layer
            reading from or writing to it, the final norm and the head. ``None``
            (default) keeps the hidden size, as before. A stream normalized by a
            mean-centering LayerNorm (GPT-2, BERT, ViT, OPT) stays frozen and
            ``report.notes`` says why. ``config.hidden_size`` (and the norms'
            eps) follow when a model built from the config has the pruned shapes
            and constants; otherwise a note says to reload with ``apply_shapes``.

    Returns:
        ``(model, report)``; ``report.shapes`` rebuilds the architecture later.

    Raises:
        GraphError: an op or layer the graph cannot follow (names op and module path).
        ValueError / TypeError: bad arguments.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
        >>> net, report = prune_channels(net, torch.randn(1, 3, 8, 8), 0.5)
        >>> net[0].out_channels, net[1].num_features, net[3].in_channels
        (8, 8, 8)
    """
    sparsity = check_sparsity("prune_channels", "sparsity", sparsity)
    round_to = check_int("prune_channels", "round_to", round_to, minimum=1)
    check_choice("prune_channels", "reduction", reduction, ("sum", "mean"))
    _check_importance(importance)
    if importance == "taylor" and loss_fn is None:
        raise ValueError("prune_channels: importance='taylor' needs loss_fn (model -> scalar loss)")
    if hidden_sparsity is not None:
        hidden_sparsity = check_sparsity("prune_channels", "hidden_sparsity", hidden_sparsity)
    graph = build_graph(model, example_input, ignore, hidden=hidden_sparsity is not None)
    groups = find_groups(graph)
    if loss_fn is not None:
        _gradients(model, loss_fn)
    scores = score_groups(model, groups, importance, reduction)
    hidden = {g.name for g in hidden_groups(graph, groups)}
    keeps = {name: select_units(s, hidden_sparsity if name in hidden else sparsity, round_to)
             for name, s in scores.items()}
    notes = hidden_notes(graph, groups) if hidden_sparsity is not None else ()
    model, report = remove(graph, groups, keeps, example_input, verify=verify)
    return model, dataclasses.replace(report, notes=notes + report.notes)


def remove(graph: DependencyGraph, groups: Sequence[Group], keeps: dict[str, torch.Tensor],
           example_input: Any, verify: bool = True) -> tuple[nn.Module, StructuralReport]:
    """Physically remove the units not kept (``keeps``: ``{group name: bool per unit}``)."""
    model = graph.model
    macs_before, params_before = count_macs(model, example_input), count_params(model)
    model.zero_grad(set_to_none=True)
    expected = _masked_outputs(graph, groups, keeps, example_input) if verify else None
    aliases = _aliases(model)
    model, shapes = shrink(model, kept_indices(list(groups), keeps), graph.surgeries)
    _retie(model, aliases)
    _set_size_attributes(graph, groups, keeps)
    notes = tuple(sync_transformers(model))
    if expected is not None:
        _check_outputs(model, example_input, expected)
    results = tuple(GroupResult(g.name, int(keeps[g.name].sum()), g.size) for g in groups)
    report = StructuralReport(params_before, count_params(model), macs_before, count_macs(model, example_input),
                              results, shapes, notes)
    return model, report


def hidden_groups(graph: DependencyGraph, groups: Sequence[Group]) -> list[Group]:
    """The groups whose channels an RMS norm normalizes (the residual stream of a Llama-like model)."""
    return [g for g in groups if any(s.member.path in graph.surgeries and s.member.param == "weight"
                                     for s in g.slots)]


def hidden_notes(graph: DependencyGraph, groups: Sequence[Group]) -> tuple[str, ...]:
    """Why the hidden size stays, when ``hidden_sparsity`` was asked for and no stream group exists."""
    if hidden_groups(graph, groups):
        return ()
    embed = input_embeddings(graph.model)
    norms = {p for p, m in graph.model.named_modules() if isinstance(m, nn.LayerNorm)} | set(graph.surgeries)
    weight = getattr(embed, "weight", None)  # T5's stacks call their own embeddings holding the shared weight
    stream = next((m for m in graph.members if weight is not None and m.dim == 1 and m.param == "weight" and
                   getattr(graph.module(m.path), "weight", None) is weight), None)
    stream = stream or next((m for m in graph.members if m.path in norms and m.dim == 0), None)
    if stream is None:
        return ("hidden size kept: no token embedding or norm carries prunable channels in this model",)
    reasons = graph.uf.all_reasons(stream.atoms[0])
    if not reasons:
        return ()
    centering = [] if "mean-centering" in reasons[0] else [r for r in reasons if "mean-centering" in r][:1]  # the reason that holds even if the first goes
    return (f"hidden size kept: {stream.path}.{stream.param}[{stream.dim}] is frozen ({reasons[0]})"
            + "".join(f"; also ({r})" for r in centering),)


def _aliases(model: nn.Module) -> list[tuple[nn.Parameter, list[str]]]:
    """Every parameter reached under more than one name (tied embeddings), with its names."""
    names: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), (param, []))[1].append(name)
    return [entry for entry in names.values() if len(entry[1]) > 1]


def _retie(model: nn.Module, aliases: list[tuple[nn.Parameter, list[str]]]) -> None:
    """After slicing, every name of a tied parameter points at one new parameter again (one tensor, one cut).

    Names whose module never ran (T5's ``shared`` next to the stacks' own
    embeddings) were not sliced: they get the new tensor and their sizes.
    """
    for original, names in aliases:
        owners = []
        for name in names:
            path, _, leaf = name.rpartition(".")
            module = model.get_submodule(path) if path else model
            owners.append((name, module, leaf, module._parameters[leaf]))
        cut = [entry for entry in owners if entry[3] is not original]
        if not cut:
            continue
        new = cut[0][3]
        for name, module, leaf, tensor in owners:
            if tensor is not original and tensor is not new and (tensor.shape != new.shape or
                                                                  not torch.equal(tensor, new)):
                raise GraphError(f"internal: tied parameters {cut[0][0]!r} and {name!r} were cut differently")
            module._parameters[leaf] = new
            if tensor is original:
                _follow_sizes(module, leaf, new)


def _follow_sizes(module: nn.Module, leaf: str, weight: torch.Tensor) -> None:
    """Size attributes of an embedding or linear layer that was not called but shares a cut weight."""
    if leaf != "weight" or weight.ndim != 2:
        return
    sizes = {"embedding_dim": 1, "num_embeddings": 0} if isinstance(module, nn.Embedding) else \
        {"in_features": 1, "out_features": 0} if isinstance(module, nn.Linear) else {}
    for attr, axis in sizes.items():
        setattr(module, attr, weight.shape[axis])


def _outputs(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    with in_mode(model, training=False), torch.no_grad():
        out = call_model(model, example_input)
    leaves: list[torch.Tensor] = []
    _tensor_leaves(out, leaves)
    return leaves


def _tensor_leaves(obj: Any, into: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        into.append(obj.detach())
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _tensor_leaves(item, into)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensor_leaves(item, into)


@torch.no_grad()
def _masked_outputs(graph: DependencyGraph, groups: Sequence[Group], keeps: dict[str, torch.Tensor],
                    example_input: Any) -> list[torch.Tensor]:
    """Outputs with every member of every removed unit zeroed (they are removed next, so zeroing costs nothing)."""
    params = dict(graph.model.named_parameters())
    for name, mask in param_masks(graph, list(groups), keeps).items():
        params[name].mul_(mask.to(params[name].dtype))
    return _outputs(graph.model, example_input)


def _check_outputs(model: nn.Module, example_input: Any, expected: list[torch.Tensor]) -> None:
    try:
        got = _outputs(model, example_input)
    except Exception as exc:
        raise GraphError(f"the pruned model fails on the example input ({type(exc).__name__}: {exc}); some code "
                         "uses a constant channel count that pruning cannot see. The model was modified: start "
                         "again from a copy and pass that module in ignore=") from None
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        raise GraphError("the pruned model's outputs changed shape; start again from a copy and pass the "
                         "module responsible in ignore=")
    for g, e in zip(got, expected):
        if e.is_floating_point():
            scale = float(e.double().abs().max().clamp_min(1e-6))
            err = float((g.double() - e.double()).abs().max()) / scale
            if err > 1e-3:
                raise GraphError(f"the pruned model differs from the model with the removed units zeroed "
                                 f"(relative error {err:.2e}); some op couples channels in a way prunekit does not "
                                 "see. The model was modified: start again from a copy and pass that module in "
                                 "ignore= (or verify=False to accept)")


def _set_size_attributes(graph: DependencyGraph, groups: Sequence[Group], keeps: dict[str, torch.Tensor]) -> None:
    """Int attributes the forward uses as sizes (e.g. a split size) become the kept count."""
    if not graph.size_attrs:
        return
    kept: dict[int, bool] = {}
    for group in groups:
        for slot in group.slots:
            for atom, unit in zip(slot.member.atoms, slot.unit.tolist()):
                if unit >= 0:
                    kept[graph.uf.find(atom)] = bool(keeps[group.name][unit])
    for path, attr, atoms in graph.size_attrs:
        count = sum(kept.get(graph.uf.find(a), True) for a in atoms)
        setattr(graph.model.get_submodule(path), attr, count)
