"""Lottery masks, computed and enforced by a manual :class:`prunekit.Pruner` (no masking logic of its own).

A manual Pruner (:meth:`prunekit.Pruner.manual`) never prunes on a schedule:
masks change only when :meth:`~prunekit.Pruner.update_masks` or
:meth:`~prunekit.Pruner.set_masks` is called. It carries two targets at once:
the main rate, given to ``update_masks``, and the output layer's own rate as a
fixed override, which also ranks the output layer alone under global ranking.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ...core.criteria import Criterion, Magnitude, Random
from ...core.granularity import prune_count
from ...core.pruner import Pruner
from ...core.scope import resolve_scope
from .config import LotteryConfig, round_sparsity

__all__ = ["Targets", "Masks", "pruned_names", "output_name", "imp_targets", "rank_masks", "random_masks_like",
           "set_masks", "masking_pruner",
           "check_counts", "kept_counts", "full_masks"]

Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Targets:
    """Target sparsities of one mask computation.

    Attributes:
        main: sparsity of every pruned tensor without its own target (ranked
            together under global ranking).
        own: ``{parameter name: sparsity}`` for tensors with their own target,
            each ranked alone.
    """

    main: float
    own: Mapping[str, float] = field(default_factory=dict)

    def of(self, name: str) -> float:
        """The target sparsity of ``name``."""
        return self.own.get(name, self.main)


def pruned_names(model: nn.Module, config: LotteryConfig) -> list[str]:
    """Names of the parameters a run prunes (``config.layers`` / ``config.exclude``), in model order.

    Example:
        >>> from prunekit.methods.lottery import LotteryConfig, TrainSpec
        >>> pruned_names(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LotteryConfig(TrainSpec(10), rounds=1))
        ['0.weight', '1.weight']
    """
    layers = None if config.layers is None else list(config.layers)
    return [t.name for t in resolve_scope(model, layers, list(config.exclude)).targets]


def output_name(names: list[str], config: LotteryConfig) -> str:
    """The output layer's parameter: ``config.output_layer`` or the last pruned parameter."""
    if not names:
        raise ValueError("lottery: no prunable parameter in scope (check config.layers / config.exclude)")
    name = config.output_layer if config.output_layer is not None else names[-1]
    if name not in names:
        raise ValueError(f"lottery: output_layer {name!r} is not a pruned parameter; pruned: {names}")
    return name


def imp_targets(names: list[str], config: LotteryConfig, round_index: int) -> Targets:
    """Round ``round_index``'s targets: ``1 - (1 - p)**r``, with ``p / 2`` (or ``output_rate``) for the output layer.

    Example:
        >>> from prunekit.methods.lottery import LotteryConfig, TrainSpec
        >>> t = imp_targets(["fc1.weight", "fc2.weight"], LotteryConfig(TrainSpec(10), rounds=2, rate=0.2), 2)
        >>> round(t.of("fc1.weight"), 4), round(t.of("fc2.weight"), 4)
        (0.36, 0.19)
    """
    out = output_name(names, config)
    return Targets(round_sparsity(config.rate, round_index),
                   {out: round_sparsity(config.output_rate_or_default, round_index)})


def full_masks(model: nn.Module, names: list[str]) -> Masks:
    """All-``True`` keep masks (the dense round)."""
    params = dict(model.named_parameters())
    return {name: torch.ones_like(params[name], dtype=torch.bool) for name in names}


def set_masks(pruner: Pruner, masks: Mapping[str, torch.Tensor]) -> None:
    """Set keep ``masks`` in ``pruner`` and apply them to the weights (optimizer state is cleaned)."""
    pruner.set_masks({name: mask.to(torch.bool) for name, mask in masks.items()})


def masking_pruner(model: nn.Module, names: list[str], targets: Targets | None = None, *,
                   criterion: Criterion | None = None, ranking: str = "layerwise") -> Pruner:
    """A manual Pruner over exactly ``names``, with ``targets.own`` as fixed per-tensor targets."""
    targets = targets or Targets(0.0)
    escaped = [glob.escape(name) for name in names]  # scope selectors are glob patterns
    overrides = {glob.escape(name): value for name, value in targets.own.items()}
    return Pruner.manual(model, criterion=criterion, ranking=ranking, layers=escaped, overrides=overrides or None)


def rank_masks(model: nn.Module, names: list[str], targets: Targets, *, prior: Mapping[str, torch.Tensor] | None = None,
               criterion: Criterion | None = None, ranking: str = "layerwise") -> Masks:
    """Keep masks at ``targets``, ranked by ``criterion`` on ``model``'s current weights.

    Weights pruned in ``prior`` stay pruned (masks only grow). Newly pruned
    weights of ``model`` are set to zero.

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
        >>> masks = rank_masks(net, ["0.weight", "1.weight"], Targets(0.5, {"1.weight": 0.25}))
        >>> int((~masks["0.weight"]).sum()), int((~masks["1.weight"]).sum())
        (50, 5)
    """
    pruner = masking_pruner(model, names, targets, criterion=criterion or Magnitude(), ranking=ranking)
    try:
        if prior is not None:
            set_masks(pruner, prior)
        pruner.update_masks(targets.main)
        return pruner.masks
    finally:
        pruner.remove()


def kept_counts(masks: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{name: (kept, numel)}`` of keep masks.

    Example:
        >>> kept_counts({"fc.weight": torch.tensor([[True, False], [True, True]])})
        {'fc.weight': (3, 4)}
    """
    return {name: (int(mask.sum()), mask.numel()) for name, mask in masks.items()}


def random_masks_like(model: nn.Module, masks: Mapping[str, torch.Tensor], seed: int) -> Masks:
    """Uniformly random keep masks with exactly the per-tensor kept counts of ``masks``.

    Ranked by :class:`prunekit.Random` (``seed``), each tensor on its own.

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 10))
        >>> ref = {"0.weight": torch.arange(100).reshape(10, 10) < 30}
        >>> int(random_masks_like(net, ref, seed=1)["0.weight"].sum())
        30
    """
    counts = kept_counts(masks)
    targets = Targets(0.0, {name: (numel - kept) / numel for name, (kept, numel) in counts.items()})
    out = rank_masks(model, list(masks), targets, criterion=Random(seed), ranking="layerwise")
    if kept_counts(out) != counts:  # (n - k) / n * n rounds back to n - k for any realistic n
        raise RuntimeError(f"random_masks_like: kept counts {kept_counts(out)} differ from {counts}")
    return out


def check_counts(masks: Mapping[str, torch.Tensor], targets: Targets, ranking: str, where: str) -> None:
    """Raise ``ValueError`` unless ``masks`` prune exactly ``round(n * s)`` per ranked group.

    Layer-wise, every tensor is its own group; globally, the tensors without
    their own target form one group.
    """
    counts = kept_counts(masks)
    groups = [[name] for name in counts if name in targets.own or ranking == "layerwise"]
    shared = [name for name in counts if name not in targets.own]
    if ranking == "global" and shared:
        groups.append(shared)
    for group in groups:
        numel = sum(counts[n][1] for n in group)
        pruned = sum(counts[n][1] - counts[n][0] for n in group)
        expected = prune_count(numel, targets.of(group[0]))
        if pruned != expected:
            raise ValueError(f"{where}: {group} prune {pruned} of {numel} weights, expected {expected} "
                             f"(sparsity {targets.of(group[0]):.6f})")
