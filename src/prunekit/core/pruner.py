"""The Pruner: schedule + criterion + granularity + scope, on the one mask keeper.

No wrapper layers and no renamed parameters: masks live in a
:class:`~prunekit.core.masks.MaskKeeper`, which masks gradients, cleans
optimizer state and re-applies masks after every optimizer step. The Pruner
decides *which* weights: it advances the schedule, scores with the criterion
and turns scores into masks with the granularity.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .._validate import check_choice, check_int, check_sparsity
from .criteria import Criterion, Magnitude, ScoreContext
from .distributed import full_tensor
from .granularity import Granularity, Unstructured, rank_units
from .masks import MaskKeeper, Slot, strip
from .report import SparsityReport, sparsity_report
from .schedules import ConstantSparsity, Schedule, schedule_from_dict
from .scope import Selector, Target, check_materialised, resolve_scope

__all__ = ["Pruner", "strip"]

_STATE_FORMAT = "prunekit.Pruner"
_STATE_VERSION = 1
_MANUAL = object()  # the schedule of a manual Pruner: masks change only when asked


def _check_bound_model(criterion: Criterion, model: nn.Module, targets: Sequence[Target]) -> None:
    """Refuse a data-driven criterion bound to another model now, before any hook is set (it would fail at scoring)."""
    bound = getattr(criterion, "model", None)
    if not callable(getattr(criterion, "bind", None)) or not isinstance(bound, nn.Module) or bound is model:
        return
    own = dict(bound.named_parameters())
    for target in targets:
        theirs = own.get(target.name)
        if theirs is None or theirs.data_ptr() != target.param.data_ptr():
            raise ValueError(f"Pruner: {criterion!r} is bound to a different model than the one being pruned "
                             f"(no parameter '{target.name}' sharing storage); bind it to the pruned model")


class _Group:
    """Parameters ranked together, and their schedule (``None``: manual mode) or fixed target."""

    __slots__ = ("slots", "schedule", "fixed")

    def __init__(self, slots: list[Slot], schedule: Schedule | None, fixed: float | None = None) -> None:
        self.slots, self.schedule, self.fixed = slots, schedule, fixed

    def due(self, step: int) -> bool:
        return self.schedule is not None and self.schedule.should_update(step)

    def target(self, step: int) -> float | None:
        return self.schedule.sparsity(step) if self.schedule is not None else self.fixed


class Pruner:
    """Prune a model during training, on a schedule, without changing the model or the loop.

    Args:
        model: the model; its parameters are pruned in place.
        schedule: a :class:`~prunekit.core.schedules.Schedule`, or a float ``s`` for
            one-shot pruning to ``s`` at step 0 (``ConstantSparsity(s, 0, 0, 1)``).
            For masks without a schedule, see :meth:`manual`.
        criterion: saliency criterion (default :class:`~prunekit.core.criteria.Magnitude`).
        granularity: unit of pruning (default :class:`~prunekit.core.granularity.Unstructured`).
        layers: ``None`` for the whole model, or selectors (glob patterns on
            module/parameter names, module types, predicates ``(name, module) -> bool``).
        exclude: selectors to leave unpruned.
        overrides: ``{pattern: sparsity or Schedule}``; a float follows the main
            schedule's timing at a constant target.
        ranking: ``"layerwise"`` (each tensor reaches the target) or ``"global"``
            (one ranking across all tensors without an override).
        optimizer: optional optimizer to :meth:`attach` right away.
        hooks: objects with ``before_update(pruner)`` and ``after_update(pruner)``,
            called around every *scheduled* mask update (the one at construction
            included; not :meth:`update_masks` / :meth:`set_masks`), e.g.
            :class:`prunekit.StopWhen`. The list is :attr:`hooks`.

    Masks are kept by a :class:`~prunekit.core.masks.MaskKeeper` (gradients
    masked, optimizer state cleaned, masks re-applied). After each
    ``optimizer.step()`` of an attached optimizer (or each manual
    :meth:`step`), the step counter advances, masks are recomputed when the
    schedule says so, and masks are re-applied. The first masks are computed
    at construction if the schedule updates at step 0 (so, to resume, build the
    Pruner before loading checkpoint weights). Masks follow the model
    across ``model.to(device)`` and dtype casts. A NaN or Inf gradient (a
    diverging run) can leave NaN in pruned entries; the next mask update then
    raises a ``ValueError`` naming the parameter.

    A Pruner owns its parameters until :meth:`remove` (or :func:`strip`): a
    second Pruner over any of them is refused. Replacing a pruned layer or
    parameter afterwards (``model.fc = nn.Linear(...)``, ``model.fc.weight =
    nn.Parameter(...)``, ``load_state_dict(..., assign=True)``, a new shape
    through ``.data``) is detected at the next :meth:`step`, mask update,
    :meth:`apply_masks`, :meth:`attach`, :meth:`state_dict` or :meth:`report`,
    which raise ``ValueError`` naming the parameter: remove this Pruner and
    build a new one. In-place changes (``load_state_dict``, ``model.to(...)``,
    ``model.half()``) keep the parameters and are fine.

    Raises:
        ValueError: nothing in scope, a parameter on the ``meta`` device, or a
            parameter already pruned by another live Pruner.
        TypeError: a schedule, criterion or granularity of the wrong kind.

    Example:
        >>> from prunekit import PolynomialDecay
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pruner = Pruner(model, PolynomialDecay(0.5, 0.8, 0, 100, frequency=10), optimizer=opt)
        >>> float((model[0].weight == 0).float().mean())
        0.5
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule | float,
        *,
        criterion: Criterion | None = None,
        granularity: Granularity | None = None,
        layers: Sequence[Selector] | None = None,
        exclude: Sequence[Selector] | None = None,
        overrides: Mapping[str, float | Schedule] | None = None,
        ranking: str = "layerwise",
        optimizer: torch.optim.Optimizer | None = None,
        hooks: Sequence[Any] = (),
    ) -> None:
        self.hooks = list(hooks)
        self.schedule = None if schedule is _MANUAL else _as_schedule("schedule", schedule)
        self.criterion = criterion if criterion is not None else Magnitude()
        self.granularity = granularity if granularity is not None else Unstructured()
        _check_kind("criterion", self.criterion, Criterion)
        _check_kind("granularity", self.granularity, Granularity)
        self.ranking = check_choice("Pruner", "ranking", ranking, ("layerwise", "global"))
        if ranking == "global" and not self.granularity.supports_global:
            raise ValueError(f"Pruner: ranking='global' is not possible with {self.granularity!r}; use 'layerwise'")
        scope = resolve_scope(model, layers, exclude, overrides)
        if not scope.targets:
            raise ValueError("Pruner: no prunable parameter in scope (check layers/exclude)")
        check_materialised("Pruner", scope.targets)
        _check_bound_model(self.criterion, model, scope.targets)
        self.model = model
        self.skipped = scope.skipped
        self._step = 0
        self._keeper = MaskKeeper(model, scope.targets, owner="Pruner", on_step=self.step)
        try:
            bind = getattr(self.criterion, "bind", None)
            if callable(bind) and getattr(self.criterion, "model", None) is None:
                bind(model)  # data-driven criteria (OBD, Taylor) estimate on the model being pruned
            self._groups = self._make_groups()
            if optimizer is not None:
                self.attach(optimizer)
            self._update()
        except BaseException:
            self._keeper._release()  # a half-built Pruner must not keep hooks on (or ownership of) the parameters
            raise

    @classmethod
    def manual(cls, model: nn.Module, **kwargs: Any) -> "Pruner":
        """A Pruner without a schedule: masks change only through :meth:`update_masks` and :meth:`set_masks`.

        Takes the same keyword arguments as the constructor. Steps are still
        counted and masks kept through every attached optimizer's step. A float
        in ``overrides`` is that parameter's fixed target: ``update_masks(s)``
        sets ``s`` for the others. Lottery tickets and iterative pruning use it.

        Example:
            >>> net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
            >>> pruner = Pruner.manual(net, overrides={"1": 0.25})
            >>> pruner.update_masks(0.5)
            >>> [round(float((~m).float().mean()), 2) for m in pruner.masks.values()]
            [0.5, 0.25]
        """
        return cls(model, _MANUAL, **kwargs)

    # -- construction helpers -------------------------------------------------------------

    def _override(self, target: Target) -> tuple[Schedule | None, float | None]:
        if target.override is None:
            return self.schedule, None
        if isinstance(target.override, Schedule):
            if self.schedule is None:
                raise ValueError(f"Pruner.manual: overrides[{target.name!r}] is a schedule; a manual Pruner takes "
                                 "fixed float targets only")
            return target.override, None
        value = check_sparsity("Pruner", f"overrides[{target.name!r}]", target.override)
        s = self.schedule
        if s is None:  # manual mode: a fixed target for update_masks()
            return None, value
        return ConstantSparsity(value, getattr(s, "begin_step", 0), getattr(s, "end_step", -1),
                                getattr(s, "frequency", 1)), None

    def _make_groups(self) -> list[_Group]:
        slots = self._keeper.slots
        if self.ranking == "layerwise":
            return [_Group([s], *self._override(s.target)) for s in slots]
        shared = [s for s in slots if s.target.override is None]
        alone = [_Group([s], *self._override(s.target)) for s in slots if s.target.override is not None]
        return ([_Group(shared, self.schedule)] if shared else []) + alone

    # -- public API -----------------------------------------------------------------------

    @property
    def keeper(self) -> MaskKeeper:
        """The :class:`~prunekit.core.masks.MaskKeeper` holding this pruner's masks."""
        return self._keeper

    @property
    def current_step(self) -> int:
        """Number of steps taken (optimizer steps of attached optimizers plus manual :meth:`step` calls)."""
        return self._step

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The attached optimizers, in the order they were attached."""
        return self._keeper.optimizers

    @property
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return self._keeper._optimizers

    @property
    def _slots(self) -> list[Slot]:
        return self._keeper.slots

    @property
    def _removed(self) -> bool:
        return self._keeper.removed

    @property
    def names(self) -> list[str]:
        """Full names of the pruned parameters, in model order."""
        return self._keeper.names

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Copies of the boolean keep-masks (``True`` = kept), by parameter name."""
        return self._keeper.masks

    def attach(self, optimizer: torch.optim.Optimizer) -> "Pruner":
        """Advance this pruner after every ``optimizer.step()``; returns ``self``.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: it updates none of the pruned parameters.
        """
        self._keeper.attach(optimizer)
        return self

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop following ``optimizer`` (e.g. before training with a fresh one).

        Raises:
            ValueError: ``optimizer`` is not attached.
        """
        self._keeper.detach(optimizer)

    def step(self) -> None:
        """Advance one step: recompute masks if the schedule says so, then re-apply them.

        Called automatically after ``optimizer.step()`` of attached optimizers;
        call it yourself after each update if you attach none.

        Raises:
            ValueError: a pruned layer or parameter was replaced since the Pruner was built.
        """
        self._keeper.check_live()
        self._keeper.check_model("Pruner.step")
        self._step += 1
        self._keeper.hook_grads()
        self._update()

    def update_masks(self, sparsity: float | Mapping[str, float] | None = None) -> None:
        """Recompute masks now, whatever the schedule says.

        Args:
            sparsity: ``None`` for each schedule's current target; a float for
                every ranked group (in manual mode: every group without a
                float override; those keep their override); or ``{parameter
                name: sparsity}`` to recompute only those parameters (each
                must be ranked on its own, i.e. layer-wise or overridden).

        Raises:
            ValueError: in manual mode, no sparsity for a group that has no fixed target.

        Example:
            >>> pruner.update_masks(0.9)  # doctest: +SKIP
            >>> pruner.update_masks({"fc3.weight": 0.45})  # doctest: +SKIP
        """
        self._keeper.check_live()
        self._keeper.check_model("Pruner.update_masks")
        if isinstance(sparsity, Mapping):
            self._recompute(self._targets_by_name(sparsity))
            return
        if sparsity is not None:
            sparsity = check_sparsity("update_masks", "sparsity", sparsity)
        targets = {}
        for i, group in enumerate(self._groups):
            goal = group.fixed if self.schedule is None and group.fixed is not None else sparsity
            goal = goal if goal is not None else group.target(self._step)
            if goal is None:
                raise ValueError("update_masks: this Pruner is manual (Pruner.manual) and has no target here: "
                             "pass a sparsity")
            targets[i] = goal
        self._recompute(targets)

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Set keep-masks (``True`` = kept) directly, e.g. a lottery ticket's; optimizer state is cleaned.

        Raises:
            ValueError: an unknown name, or a mask that is not bool of the parameter's shape.

        Example:
            >>> pruner.set_masks({"fc1.weight": keep})  # doctest: +SKIP
        """
        self._keeper.set_masks(masks)
        for name in masks:
            slot = self._keeper.slot(name)
            slot.target_sparsity = float(slot.pruned.float().mean()) if slot.pruned.numel() else 0.0

    def hold(self) -> None:
        """Stop the schedules: keep the current masks at every later step (``update_masks()`` keeps their sparsity).

        Not saved by :meth:`state_dict`: call it again after loading (``StopWhen.attach`` does).
        """
        self._keeper.check_live()
        for group in self._groups:
            pruned = sum(s.n_pruned for s in group.slots)
            group.schedule, group.fixed = None, pruned / max(sum(s.param.numel() for s in group.slots), 1)

    def _targets_by_name(self, mapping: Mapping[str, float]) -> dict[int, float]:
        group_of = {slot.target.name: i for i, g in enumerate(self._groups) for slot in g.slots}
        out = {}
        for name, value in mapping.items():
            if name not in group_of:
                raise ValueError(f"update_masks: {name!r} is not pruned by this pruner; pruned: {self.names}")
            index = group_of[name]
            if len(self._groups[index].slots) > 1:
                raise ValueError(f"update_masks: {name!r} is ranked globally with other parameters; "
                                 "pass one float for the whole group")
            out[index] = check_sparsity("update_masks", f"sparsity[{name!r}]", value)
        return out

    def apply_masks(self) -> None:
        """Write zeros (``+0.0``) into every pruned weight, in place; storage and identity unchanged.

        Raises:
            ValueError: a pruned layer or parameter was replaced since the Pruner was built.
        """
        self._keeper.check_model("Pruner.apply_masks")
        self._keeper.apply()

    def remove(self) -> nn.Module:
        """Apply masks one last time, remove every hook and return the plain model.

        Parameters replaced since the Pruner was built are left alone (the
        model no longer uses the tensors the masks were made for).

        Example:
            >>> model = pruner.remove()  # doctest: +SKIP
        """
        return self._keeper.remove()

    def report(self) -> SparsityReport:
        """Per-layer and total sparsity of the pruned parameters (see :func:`prunekit.sparsity_report`).

        Raises:
            ValueError: a pruned layer or parameter was replaced since the Pruner was built.
        """
        return sparsity_report(self.model, pruner=self)

    def rows(self) -> list[tuple[Target, float]]:
        """``(target, last target sparsity)`` of every pruned parameter, in model order (for reports).

        Raises:
            ValueError: a pruned layer or parameter was replaced since the Pruner was built.
        """
        self._keeper.check_model("sparsity_report")  # a replaced layer would otherwise be reported with its old target
        return [(slot.target, slot.target_sparsity) for slot in self._keeper.slots]

    def target_sparsity(self, name: str) -> float:
        """The target sparsity last applied to parameter ``name``."""
        for slot in self._keeper.slots:
            if slot.target.name == name:
                return slot.target_sparsity
        raise KeyError(f"target_sparsity: {name!r} is not pruned by this pruner; pruned: {self.names}")

    # -- mask computation -----------------------------------------------------------------

    def _update(self) -> None:
        step = self._step
        due = {i: g.target(step) for i, g in enumerate(self._groups) if g.due(step)}
        if due:
            for hook in self.hooks:
                hook.before_update(self)
            self._recompute(due)
            for hook in self.hooks:
                hook.after_update(self)
        else:
            self._keeper.reapply()

    def _recompute(self, targets: dict[int, float]) -> None:
        masks: dict[str, torch.Tensor] = {}
        for index, sparsity in targets.items():
            group = self._groups[index].slots
            masks.update(zip((s.name for s in group), self._compute_group(group, sparsity)))
            for slot in group:
                slot.target_sparsity = sparsity
        if masks:
            self._keeper.set_masks(masks)

    def _compute_group(self, group: list[Slot], sparsity: float) -> list[torch.Tensor]:
        # Granularities see every weight as (out, in, *kernel): N:M groups run along
        # the inputs and channels are outputs whatever the stored layout (Conv1D, ConvTranspose).
        specs = [slot.target.spec for slot in group]
        scores = [spec.canonical(self._scores(slot)) for spec, slot in zip(specs, group)]
        priors = [spec.canonical(full_tensor(~slot.pruned)) if slot.active else None
                  for spec, slot in zip(specs, group)]
        try:
            if len(group) == 1 and not self.granularity.supports_global:
                keeps = [self.granularity.mask(scores[0], sparsity, priors[0])]
            else:
                keeps = rank_units(self.granularity, scores, priors, sparsity)
        except ValueError as exc:  # e.g. a shape the pattern does not tile: say which parameter
            names = ", ".join(f"'{slot.target.name}'" for slot in group)
            raise ValueError(f"cannot prune {names} with {self.granularity!r}: {exc}") from None
        out = []
        for slot, spec, keep in zip(group, specs, keeps):
            if keep.dim() == slot.param.dim() >= 2:
                keep = spec.from_canonical(keep)
            if keep.shape != slot.param.shape or keep.dtype != torch.bool:
                raise ValueError(f"{self.granularity!r} returned a mask of shape {tuple(keep.shape)} / {keep.dtype} "
                                 f"for '{slot.target.name}' of shape {tuple(slot.param.shape)}; expected bool of that shape")
            out.append(keep)
        return out

    def _scores(self, slot: Slot) -> torch.Tensor:
        # FSDP2: scored on the whole parameter (an all-gather), so that ranking is exactly one process's.
        name, param = slot.target.name, full_tensor(slot.param.detach())
        if not torch.isfinite(param).all():
            raise ValueError(f"parameter '{name}' contains NaN or Inf at step {self._step}; cannot rank its weights "
                             "(check the learning rate and the loss)")
        scores = self.criterion.score(param.detach(), ScoreContext(name, slot.target.module, self._step))
        if not isinstance(scores, torch.Tensor) or scores.shape != param.shape or not scores.is_floating_point():
            raise ValueError(f"{self.criterion!r} must return floating scores of shape {tuple(param.shape)} "
                             f"for '{name}', got {getattr(scores, 'shape', type(scores).__name__)}")
        if not torch.isfinite(scores).all():
            raise ValueError(f"{self.criterion!r} returned NaN or Inf scores for parameter '{name}' at step {self._step}")
        return scores

    def _check_model(self, owner: str) -> None:
        self._keeper.check_model(owner)

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks and schedule position, as tensors and plain values (``torch.load(weights_only=True)`` safe).

        Example:
            >>> torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, "ckpt.pt")  # doctest: +SKIP
        """
        self._keeper.check_model("Pruner.state_dict")
        slots = self._keeper.slots
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "step": self._step,
            "ranking": self.ranking,
            "schedule": None if self.schedule is None else self.schedule.to_dict(),
            "masks": {s.target.name: s.full_keep() for s in slots},
            "target_sparsity": {s.target.name: s.target_sparsity for s in slots},
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore masks and step from :meth:`state_dict`, and apply the masks.

        Args:
            state: the dict from :meth:`state_dict`.
            strict: require the same schedule, ranking and parameter names.

        Raises:
            ValueError: the state is malformed, of another version, or does not fit this pruner.
        """
        self._keeper.check_live()
        self._keeper.check_model("Pruner.load_state_dict")
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError("load_state_dict: not a prunekit Pruner state (missing format marker)")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"load_state_dict: unsupported version {state.get('version')!r}; expected {_STATE_VERSION}")
        masks = self._keeper.validate_masks(state.get("masks"), strict, where="load_state_dict")
        if strict:
            mine = None if self.schedule is None else self.schedule.to_dict()
            for key, value in (("schedule", mine), ("ranking", self.ranking)):
                if state.get(key) != value:
                    raise ValueError(f"load_state_dict: saved {key} {state.get(key)!r} differs from this pruner's "
                                     f"{value!r} (pass strict=False to load anyway)")
        self._step = check_int("load_state_dict", "step", state.get("step"), minimum=0)
        self._keeper.set_masks(masks, sync=False)
        targets = state.get("target_sparsity", {})
        for slot in self._keeper.slots:
            if slot.target.name in masks:
                slot.target_sparsity = float(targets.get(slot.target.name, 0.0))

    def __repr__(self) -> str:
        return (f"Pruner({len(self._keeper.slots)} tensors, schedule={self.schedule!r}, criterion={self.criterion!r}, "
                f"granularity={self.granularity!r}, ranking={self.ranking!r}, step={self._step})")


def _as_schedule(arg: str, value: Any) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ConstantSparsity(check_sparsity("Pruner", arg, value), begin_step=0, end_step=0, frequency=1)
    if isinstance(value, dict):
        return schedule_from_dict(value)
    raise TypeError(f"Pruner: {arg} must be a Schedule, a dict from Schedule.to_dict() or a sparsity in [0, 1) "
                    f"(for masks without a schedule: Pruner.manual(model, ...)), got {type(value).__name__}")


def _check_kind(arg: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"Pruner: {arg} must be a prunekit {kind.__name__} instance, got {type(value).__name__}")
