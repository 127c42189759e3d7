"""Gradual structural pruning: zero whole coupled units during training, remove them at the end.

Like :class:`prunekit.Pruner` (no wrappers, masks kept outside the model,
re-applied after every ``optimizer.step()``, gradients and momentum of pruned
entries zeroed), but a mask never splits a unit: every member of a removed
unit is zero (conv rows and biases, BatchNorm weight *and* bias, the next
layer's input columns, attention rows and columns). :meth:`StructuredPruner.finalize`
then removes them physically; the smaller model computes exactly what the
masked one did.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..._validate import check_choice, check_int, check_sparsity
from ...core.pruner import _check_unowned
from ...core.schedules import ConstantSparsity, Schedule
from .graph import build_graph
from .groups import find_groups, param_masks
from .importance import Importance, group_scores
from .prune import StructuralReport, _check_importance, remove, select_units

__all__ = ["StructuredPruner"]

_FORMAT = "prunekit.StructuredPruner"
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})


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
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.schedule = _as_schedule(schedule)
        _check_importance(importance)
        if importance == "taylor":
            raise ValueError("StructuredPruner: importance='taylor' is not supported here; use 'l1', 'l2', 'bn' "
                             "or a callable")
        self.importance, self.round_to = importance, check_int("StructuredPruner", "round_to", round_to, minimum=1)
        self.reduction = check_choice("StructuredPruner", "reduction", reduction, ("sum", "mean"))
        _check_unowned("StructuredPruner", model.named_parameters())  # two engines would fight over the weights
        self.model, self.example_input = model, example_input
        self.graph = build_graph(model, example_input, ignore)
        self.groups = find_groups(self.graph)
        self.keeps = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        self._params = dict(model.named_parameters())
        self._masks: dict[str, torch.Tensor] = {}
        self._step, self._optimizers, self._handles, self._done = 0, [], [], False
        for name, param in self._params.items():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(partial(self._mask_grad, name)))
        if optimizer is not None:
            self.attach(optimizer)
        self._update()

    @property
    def current_step(self) -> int:
        """Steps taken so far."""
        return self._step

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-masks by parameter name (only parameters that lose entries)."""
        return {name: mask.bool() for name, mask in self._masks.items()}

    def attach(self, optimizer: torch.optim.Optimizer) -> "StructuredPruner":
        """Advance after every ``optimizer.step()``; returns ``self``."""
        self._check_live()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizers.append(optimizer)
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.step()))
        return self

    def step(self) -> None:
        """Advance one step: recompute masks if the schedule says so, then re-apply them."""
        self._check_live()
        self._step += 1
        self._update()

    def _update(self) -> None:
        if self.schedule.should_update(self._step):
            self.update_masks(self.schedule.sparsity(self._step))
        else:
            self.apply_masks()

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Recompute which units are kept at ``sparsity`` now (already removed units go first)."""
        self._check_live()
        sparsity = check_sparsity("update_masks", "sparsity", sparsity)
        for group in self.groups:
            scores = group_scores(self.model, group, self.importance, self.reduction)
            scores = scores.masked_fill(~self.keeps[group.name], float("-inf"))
            self.keeps[group.name] = select_units(scores, sparsity, self.round_to)
        masks = param_masks(self.graph, self.groups, self.keeps)
        self._masks = {n: m.to(self._params[n].dtype) for n, m in masks.items()}
        self._clear_optimizer_state()
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every member of every removed unit, in place."""
        for name, mask in self._masks.items():
            param = self._params[name]
            param.mul_(mask.to(device=param.device, dtype=param.dtype))

    def finalize(self) -> tuple[nn.Module, StructuralReport]:
        """Apply masks, drop every hook and remove the zeroed units physically; returns ``(model, report)``."""
        self._check_live()
        self.apply_masks()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._done = True
        return remove(self.graph, self.groups, self.keeps, self.example_input)

    def state_dict(self) -> dict[str, Any]:
        """Step and kept units (``torch.load(weights_only=True)`` safe)."""
        return {"format": _FORMAT, "step": self._step, "keeps": {k: v.clone() for k, v in self.keeps.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` and apply the masks."""
        self._check_live()
        keeps = state.get("keeps") if isinstance(state, Mapping) and state.get("format") == _FORMAT else None
        if not isinstance(keeps, Mapping) or set(keeps) != set(self.keeps):
            raise ValueError("load_state_dict: not a StructuredPruner state for this model's groups")
        for name, keep in keeps.items():
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != self.keeps[name].shape:
                raise ValueError(f"load_state_dict: keeps[{name!r}] must be bool of shape {tuple(self.keeps[name].shape)}")
        self._step = check_int("load_state_dict", "step", state.get("step"), minimum=0)
        self.keeps = {k: v.clone() for k, v in keeps.items()}
        masks = param_masks(self.graph, self.groups, self.keeps)
        self._masks = {n: m.to(self._params[n].dtype) for n, m in masks.items()}
        self.apply_masks()

    def _mask_grad(self, name: str, param: torch.Tensor) -> None:
        mask = self._masks.get(name)
        if mask is not None and param.grad is not None:
            param.grad.mul_(mask.to(param.grad.device))

    @torch.no_grad()
    def _clear_optimizer_state(self) -> None:
        # Momentum would otherwise push removed entries back; second moments only divide
        # a first moment that is now zero.
        by_id = {id(p): n for n, p in self._params.items()}
        for optimizer in self._optimizers:
            for param, state in optimizer.state.items():
                mask = self._masks.get(by_id.get(id(param), ""))
                if mask is None:
                    continue
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape and key not in _SECOND_MOMENTS:
                        value.mul_(mask.to(value.device, value.dtype))

    def _check_live(self) -> None:
        if self._done:
            raise RuntimeError("this StructuredPruner was finalized; create a new one to prune again")


def _as_schedule(value: Any) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ConstantSparsity(check_sparsity("StructuredPruner", "schedule", value), 0, 0, 1)
    raise TypeError(f"StructuredPruner: schedule must be a Schedule or a sparsity in [0, 1), got {type(value).__name__}")
