"""Gradual structural pruning: zero whole coupled units during training, remove them at the end.

Like :class:`prunekit.Pruner`, its masks are kept by the one
:class:`~prunekit.core.masks.MaskKeeper` (no wrappers, masks re-applied after
every ``optimizer.step()``, gradients masked, optimizer state cleaned, masks
synchronised across ranks), but a mask never splits a unit: every member of a removed
unit is zero (conv rows and biases, BatchNorm weight *and* bias, the next
layer's input columns, attention rows and columns). :meth:`StructuredPruner.finalize`
then removes them physically; the smaller model computes exactly what the
masked one did.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..._validate import check_choice, check_int, check_sparsity
from ...core.distributed import sync_keeps
from ...core.masks import MaskKeeper, check_unowned
from ...core.schedules import ConstantSparsity, Schedule
from .groups import find_groups, param_masks
from .importance import Importance, group_scores
from .prune import StructuralReport, _check_importance, remove, select_units
from .trace import build_graph

__all__ = ["StructuredPruner"]

_FORMAT = "prunekit.StructuredPruner"
_VERSION = 1  # states written before versioning carry no "version" and have the same layout


class StructuredPruner:
    """Prune whole channels, groups and heads on a schedule while training.

    Args:
        model: the model (pruned in place; its layers keep their sizes until :meth:`finalize`).
        example_input: a tensor or tuple of tensors for tracing.
        schedule: a :class:`~prunekit.core.schedules.Schedule` (e.g. ``PolynomialDecay``)
            giving the fraction of each group's units to remove, or a float for
            one mask computed at step 0.
        importance: ``"l1"``, ``"l2"``, ``"bn"`` or a callable (see
            :mod:`prunekit.methods.structural.importance`; ``"taylor"`` needs gradients
            at update time and is not offered here).
        reduction: ``"sum"`` or ``"mean"`` over a unit's members.
        round_to: keep a multiple of this many units per group.
        ignore: module paths or types whose channels are never pruned.
        optimizer: optional optimizer to :meth:`attach`.
        hooks: objects with ``before_update(pruner)`` and ``after_update(pruner)``, called around every
            scheduled mask update (e.g. :class:`prunekit.methods.budget.StopAtBudget`); :meth:`hold` stops
            the schedule.

    Example:
        >>> from prunekit import PolynomialDecay
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> pruner = StructuredPruner(net, torch.randn(1, 8), PolynomialDecay(0.0, 0.5, 0, 10, frequency=5),
        ...                           optimizer=opt)
        >>> for _ in range(10):
        ...     opt.zero_grad(); net(torch.randn(4, 8)).sum().backward(); opt.step()
        >>> net, report = pruner.finalize()
        >>> net[0].out_features, net[2].in_features
        (8, 8)
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor],
                 schedule: Schedule | float, *, importance: Importance = "l2", reduction: str = "sum",
                 round_to: int = 1, ignore: Iterable[str | type] | None = None,
                 optimizer: torch.optim.Optimizer | None = None, hooks: Sequence[Any] = ()) -> None:
        self.schedule = _as_schedule(schedule)
        _check_importance(importance)
        if importance == "taylor":
            raise ValueError("StructuredPruner: importance='taylor' is not supported here; use 'l1', 'l2', 'bn' "
                             "or a callable")
        self.importance, self.round_to = importance, check_int("StructuredPruner", "round_to", round_to, minimum=1)
        self.reduction = check_choice("StructuredPruner", "reduction", reduction, ("sum", "mean"))
        check_unowned("StructuredPruner", model.named_parameters())  # two engines would fight over the weights
        self.model, self.example_input = model, example_input
        self.graph = build_graph(model, example_input, ignore)
        self.groups = find_groups(self.graph)
        self.keeps = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        self._step = 0
        self.hooks, self._held = list(hooks), False
        # Every parameter some unit reaches (each loses entries when all units go) is kept by the keeper.
        members = param_masks(self.graph, self.groups, {g.name: torch.zeros(g.size, dtype=torch.bool)
                                                         for g in self.groups})
        self._keeper = MaskKeeper(model, list(members), owner="StructuredPruner", on_step=self.step)
        try:
            if optimizer is not None:
                self.attach(optimizer)
            self._update()
        except BaseException:
            self._keeper._release()
            raise

    @property
    def keeper(self) -> MaskKeeper:
        """The :class:`~prunekit.core.masks.MaskKeeper` holding this pruner's masks."""
        return self._keeper

    @property
    def current_step(self) -> int:
        """Steps taken so far."""
        return self._step

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-masks by parameter name (only parameters that lose entries)."""
        return {slot.name: ~slot.pruned for slot in self._keeper.slots if slot.active}

    def attach(self, optimizer: torch.optim.Optimizer) -> "StructuredPruner":
        """Advance after every ``optimizer.step()``; returns ``self``."""
        self._check_live()
        self._keeper.attach(optimizer)
        return self

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop following ``optimizer``.

        Raises:
            ValueError: ``optimizer`` is not attached.
        """
        self._keeper.detach(optimizer)

    def step(self) -> None:
        """Advance one step: recompute masks if the schedule says so, then re-apply them."""
        self._check_live()
        self._keeper.check_model("StructuredPruner.step")
        self._step += 1
        self._keeper.hook_grads()
        self._update()

    def _update(self) -> None:
        if not self._held and self.schedule.should_update(self._step):
            for hook in self.hooks:
                hook.before_update(self)
            self.update_masks(self.schedule.sparsity(self._step))
            for hook in self.hooks:
                hook.after_update(self)
        else:
            self._keeper.reapply()

    @property
    def held(self) -> bool:
        """Whether :meth:`hold` stopped the schedule."""
        return self._held

    def hold(self) -> None:
        """Stop the schedule: the kept units stay as they are at every later step (saved by :meth:`state_dict`)."""
        self._check_live()
        self._held = True

    def set_keeps(self, keeps: Mapping[str, torch.Tensor]) -> None:
        """Set the kept units (``{group name: bool per unit}``, as :attr:`keeps`) and apply their masks."""
        self._check_live()
        self.keeps = {k: v.clone() for k, v in keeps.items()}
        self._set_masks(sync=False)

    def pruned_copy(self, verify: bool = False) -> tuple[nn.Module, StructuralReport]:
        """A physically pruned copy of the model at the current masks (what :meth:`finalize` would give); the model stays.

        Example:
            >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            >>> copy_, report = StructuredPruner(net, torch.randn(1, 8), 0.25).pruned_copy()
            >>> copy_[0].out_features, net[0].out_features, report.macs_after
            (12, 16, 120)
        """
        self._check_live()
        graph, groups, keeps = copy.deepcopy((self.graph, self.groups, self.keeps))
        return remove(graph, groups, keeps, self.example_input, verify=verify)

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Recompute which units are kept at ``sparsity`` now (already removed units go first)."""
        self._check_live()
        sparsity = check_sparsity("update_masks", "sparsity", sparsity)
        for group in self.groups:
            scores = group_scores(self.model, group, self.importance, self.reduction)
            scores = scores.masked_fill(~self.keeps[group.name], float("-inf"))
            self.keeps[group.name] = select_units(scores, sparsity, self.round_to)
        self._set_masks()

    def _set_masks(self, sync: bool = True) -> None:
        if sync:
            # DDP: rank 0's kept units on every rank. The units are what finalize() removes,
            # so they are synchronised rather than the parameter masks derived from them.
            synced = sync_keeps([self.keeps[g.name] for g in self.groups])
            self.keeps = {g.name: keep for g, keep in zip(self.groups, synced)}
        masks = param_masks(self.graph, self.groups, self.keeps)
        full = {slot.name: masks.get(slot.name, torch.ones_like(slot.pruned)) for slot in self._keeper.slots}
        self._keeper.set_masks(full, sync=False)

    def apply_masks(self) -> None:
        """Zero every member of every removed unit, in place."""
        self._check_live()
        self._keeper.apply()

    def finalize(self) -> tuple[nn.Module, StructuralReport]:
        """Apply masks, drop every hook and remove the zeroed units physically; returns ``(model, report)``."""
        self._check_live()
        self._keeper.remove()
        return remove(self.graph, self.groups, self.keeps, self.example_input)

    def state_dict(self) -> dict[str, Any]:
        """Version, step and kept units (``torch.load(weights_only=True)`` safe)."""
        return {"format": _FORMAT, "version": _VERSION, "step": self._step, "held": self._held,
                "keeps": {k: v.clone() for k, v in self.keeps.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` and apply the masks (optimizer state of removed units is cleaned).

        Raises:
            ValueError: not a StructuredPruner state for this model's groups, or of another version.
        """
        self._check_live()
        keeps = state.get("keeps") if isinstance(state, Mapping) and state.get("format") == _FORMAT else None
        if not isinstance(keeps, Mapping) or set(keeps) != set(self.keeps):
            raise ValueError("load_state_dict: not a StructuredPruner state for this model's groups")
        if state.get("version", _VERSION) != _VERSION:
            raise ValueError(f"load_state_dict: unsupported StructuredPruner state version {state.get('version')!r}; "
                             f"this prunekit reads version {_VERSION}")
        for name, keep in keeps.items():
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != self.keeps[name].shape:
                raise ValueError(f"load_state_dict: keeps[{name!r}] must be bool of shape {tuple(self.keeps[name].shape)}")
        self._step = check_int("load_state_dict", "step", state.get("step"), minimum=0)
        self._held = bool(state.get("held", False))  # states written before holding existed: not held
        self.keeps = {k: v.clone() for k, v in keeps.items()}
        self._set_masks(sync=False)

    def _check_live(self) -> None:
        if self._keeper.removed:
            raise RuntimeError("this StructuredPruner was finalized (or stripped); create a new one to prune again")


def _as_schedule(value: Any) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ConstantSparsity(check_sparsity("StructuredPruner", "schedule", value), 0, 0, 1)
    raise TypeError(f"StructuredPruner: schedule must be a Schedule or a sparsity in [0, 1), got {type(value).__name__}")
