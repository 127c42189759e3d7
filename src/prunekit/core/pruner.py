"""The Pruner: schedule + criterion + granularity + scope, with masks kept outside the model.

No wrapper layers and no renamed parameters: masks live in the Pruner and are
re-applied in place after every optimizer step (``register_step_post_hook``).
Gradients of pruned weights are zeroed as soon as they are accumulated, and the
optimizer's per-parameter state (momentum, Adam moments) is zeroed where a
weight is pruned, so no optimizer can revive a pruned weight.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Iterable, Mapping, NoReturn, Sequence

import torch
from torch import nn

from .._validate import check_choice, check_int, check_sparsity
from .criteria import Criterion, Magnitude, ScoreContext
from .distributed import sync_keeps
from .granularity import Granularity, Unstructured, rank_units
from .schedules import ConstantSparsity, Schedule, schedule_from_dict
from .scope import Selector, Target, check_materialised, resolve_scope

__all__ = ["Pruner", "strip"]

_STATE_FORMAT = "prunekit.Pruner"
_STATE_VERSION = 1
_LIVE: "weakref.WeakSet[Pruner]" = weakref.WeakSet()
# Optimizer state entries that only ever scale a first moment or gradient (torch.optim names).
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})


_REBUILD = ("its masks no longer describe the model; call .remove() on it (or prunekit.strip(model)) "
            "and build a new prunekit.Pruner(...) on the model as it is now")
# How the model reaches a pruned weight: ``table.get(key) is expected`` along the path
# (``model._modules``, ..., ``module._parameters``) while the model is unchanged.
_Edge = tuple[Any, str, Any, str]  # (table, key, expected object, dotted path)


class _Attrs:
    """A module's attributes behind the ``get`` of a dict, for a weight not held in ``_parameters``."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def get(self, key: str) -> Any:
        return getattr(self.obj, key, None)


def _target_edges(model: nn.Module, target: Target) -> list[_Edge]:
    """The path to ``target``'s parameter under each of its names (a tied weight has several)."""
    edges = []
    for alias in target.aliases or (target.name,):
        *parts, pname = alias.split(".")
        obj, path = model, ""
        for part in parts:
            path = f"{path}.{part}" if path else part
            table = obj._modules if isinstance(obj, nn.Module) and part in obj._modules else _Attrs(obj)
            obj = table.get(part)
            edges.append((table, part, obj, path))
        params = getattr(obj, "_parameters", {})
        table = params if params.get(pname) is target.param else _Attrs(obj)
        edges.append((table, pname, target.param, alias))
    return edges


def _unique_edges(slots: Sequence[_Slot]) -> list[_Edge]:
    unique: dict[tuple[int, str], _Edge] = {}
    for slot in slots:
        for edge in slot.edges:
            unique.setdefault((id(edge[0]), edge[1]), edge)
    return list(unique.values())


def _stale_reason(slot: _Slot) -> str | None:
    """What changed about ``slot``'s parameter since the Pruner was built, or ``None``."""
    name = slot.target.name
    for table, key, expected, path in slot.edges:
        now = table.get(key)
        if now is expected:
            continue
        if expected is not slot.param:  # a module on the way to the parameter
            how = "was removed from the model" if now is None else f"was replaced (now a {type(now).__name__} object)"
            return f"module '{path}' holding pruned parameter '{name}' {how}"
        if now is None:
            return f"parameter '{path}' was removed from the model (or parametrized)"
        return (f"parameter '{path}' was replaced by another tensor (a new nn.Parameter, "
                "load_state_dict(assign=True) or a conversion that creates new parameters)")
    param = slot.param
    if param.shape != slot.shape:
        return (f"parameter '{name}' changed shape from {tuple(slot.shape)} to {tuple(param.shape)} "
                "(its .data was reassigned)")
    if param.is_meta:
        return f"parameter '{name}' was moved to the meta device"
    return None


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


def _check_unowned(owner: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse parameters that a live (not removed) Pruner already prunes: two would fight over the masks.

    ``named`` is ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``
    (another pruning engine can call this too).
    """
    mine = {id(p): n for n, p in named}  # both sides hold the tensors, so ids are not reused
    taken = [(mine[id(slot.param)], slot.target.name) for other in list(_LIVE) if not other._removed
             for slot in other._slots if id(slot.param) in mine]
    if taken:
        names = [f"'{n}'" if n == theirs else f"'{n}' (as '{theirs}')" for n, theirs in taken]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(f"{owner}: {shown} already pruned by another live Pruner; call .remove() on that one "
                         "(or prunekit.strip(model)) before building a new one")


class _Slot:
    """Mask state of one pruned parameter."""

    __slots__ = ("target", "param", "shape", "schedule", "pruned", "keep", "active", "target_sparsity", "edges")

    def __init__(self, target: Target, schedule: Schedule, edges: list[_Edge]) -> None:
        self.target = target
        self.param = target.param
        self.shape = self.param.shape
        self.schedule = schedule
        self.pruned = torch.zeros_like(self.param, dtype=torch.bool)
        # The hot path multiplies by a mask in the parameter's dtype: an order of
        # magnitude faster than masked_fill_ with a bool mask on CPU.
        self.keep = torch.ones_like(self.param, requires_grad=False)
        self.active = False  # any entry pruned: skip all-ones masks on the hot path
        self.target_sparsity = 0.0
        self.edges = edges  # how the model reaches this parameter, under each of its names

    def sync(self) -> None:
        # model.to(device) / model.half() change a parameter's data in place of
        # its identity; the masks follow lazily.
        param = self.param
        if self.keep.device != param.device or self.keep.dtype != param.dtype:
            if param.shape != self.shape or param.is_meta:  # rare: checked only when the data changed
                raise ValueError(f"Pruner: {_stale_reason(self)} after this Pruner was built; {_REBUILD}")
            self.keep = self.keep.to(device=param.device, dtype=param.dtype)
            self.pruned = self.pruned.to(param.device)

    def set_keep(self, keep: torch.Tensor) -> None:
        self.sync()
        torch.logical_not(keep, out=self.pruned)
        self.keep.copy_(keep)
        self.active = bool(self.pruned.any())


class Pruner:
    """Prune a model during training, on a schedule, without changing the model or the loop.

    Args:
        model: the model; its parameters are pruned in place.
        schedule: a :class:`~prunekit.core.schedules.Schedule`, or a float ``s`` for
            one-shot pruning to ``s`` at step 0 (``ConstantSparsity(s, 0, 0, 1)``).
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

    After each ``optimizer.step()`` of an attached optimizer (or each manual
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
    ) -> None:
        self.schedule = _as_schedule("schedule", schedule)
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
        _check_unowned("Pruner", ((t.name, t.param) for t in scope.targets))
        self.model = model
        self.skipped = scope.skipped
        bind = getattr(self.criterion, "bind", None)
        if callable(bind) and getattr(self.criterion, "model", None) is None:
            bind(model)  # data-driven criteria (OBD, Taylor) estimate on the model being pruned
        self._slots = [_Slot(t, self._override_schedule(t), _target_edges(model, t)) for t in scope.targets]
        self._edges = _unique_edges(self._slots)
        self._groups = self._make_groups()
        self._step = 0
        self._optimizers: list[torch.optim.Optimizer] = []
        self._opt_handles: list[Any] = []
        self._state_pending = False
        self._handles: list[Any] = []
        self._unhooked = list(self._slots)
        self._removed = False
        try:
            self._hook_grads()
            _LIVE.add(self)
            if optimizer is not None:
                self.attach(optimizer)
            self._update()
        except BaseException:
            self._release()  # a half-built Pruner must not keep hooks on (or ownership of) the parameters
            raise

    # -- construction helpers -------------------------------------------------------------

    def _override_schedule(self, target: Target) -> Schedule:
        if target.override is None:
            return self.schedule
        if isinstance(target.override, Schedule):
            return target.override
        value = check_sparsity("Pruner", f"overrides[{target.name!r}]", target.override)
        s = self.schedule
        return ConstantSparsity(value, getattr(s, "begin_step", 0), getattr(s, "end_step", -1), getattr(s, "frequency", 1))

    def _make_groups(self) -> list[list[_Slot]]:
        if self.ranking == "layerwise":
            return [[s] for s in self._slots]
        shared = [s for s in self._slots if s.target.override is None]
        alone = [[s] for s in self._slots if s.target.override is not None]
        return ([shared] if shared else []) + alone

    # -- public API -----------------------------------------------------------------------

    @property
    def current_step(self) -> int:
        """Number of steps taken (optimizer steps of attached optimizers plus manual :meth:`step` calls)."""
        return self._step

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The attached optimizers, in the order they were attached."""
        return tuple(self._optimizers)

    @property
    def names(self) -> list[str]:
        """Full names of the pruned parameters, in model order."""
        return [s.target.name for s in self._slots]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Copies of the boolean keep-masks (``True`` = kept), by parameter name."""
        return {s.target.name: ~s.pruned for s in self._slots}

    def attach(self, optimizer: torch.optim.Optimizer) -> "Pruner":
        """Advance this pruner after every ``optimizer.step()``; returns ``self``.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: it updates none of the pruned parameters.
        """
        self._check_live()
        self._check_model("Pruner.attach")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(s.param) in owned for s in self._slots):
            raise ValueError("attach: the optimizer updates none of the pruned parameters")
        if any(o is optimizer for o in self._optimizers):
            raise ValueError("attach: this optimizer is already attached")
        self._optimizers.append(optimizer)
        self._opt_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._clear_optimizer_state()
        self._state_pending = True  # optimizers create their state lazily, on the first step
        return self

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop following ``optimizer`` (e.g. before training with a fresh one).

        Raises:
            ValueError: ``optimizer`` is not attached.
        """
        for i, attached in enumerate(self._optimizers):
            if attached is optimizer:
                self._opt_handles.pop(i).remove()
                self._optimizers.pop(i)
                return
        raise ValueError("detach: this optimizer is not attached to the pruner")

    def step(self) -> None:
        """Advance one step: recompute masks if the schedule says so, then re-apply them.

        Called automatically after ``optimizer.step()`` of attached optimizers;
        call it yourself after each update if you attach none.

        Raises:
            ValueError: a pruned layer or parameter was replaced since the Pruner was built.
        """
        self._check_live()
        self._check_model("Pruner.step")
        self._step += 1
        if self._unhooked:
            self._hook_grads()
        self._update()

    def _hook_grads(self) -> None:
        # A frozen parameter (requires_grad=False) cannot take a gradient hook: it gets
        # one at the first step after it is unfrozen, when the masks and optimizer state
        # that its unmasked gradient may have touched are cleaned up.
        fresh = [s for s in self._unhooked if s.param.requires_grad]
        if not fresh:
            return
        for slot in fresh:
            self._handles.append(slot.param.register_post_accumulate_grad_hook(partial(_mask_grad, self, slot)))
        self._unhooked = [s for s in self._unhooked if not s.param.requires_grad]
        self._clear_optimizer_state()
        self._apply_masks()

    def update_masks(self, sparsity: float | Mapping[str, float] | None = None) -> None:
        """Recompute masks now, whatever the schedule says.

        Args:
            sparsity: ``None`` for each schedule's current target; a float for
                every ranked group; or ``{parameter name: sparsity}`` to recompute
                only those parameters (each must be ranked on its own, i.e.
                layer-wise or overridden).

        Example:
            >>> pruner.update_masks(0.9)  # doctest: +SKIP
            >>> pruner.update_masks({"fc3.weight": 0.45})  # doctest: +SKIP
        """
        self._check_live()
        self._check_model("Pruner.update_masks")
        if isinstance(sparsity, Mapping):
            self._recompute(self._targets_by_name(sparsity))
            return
        if sparsity is not None:
            sparsity = check_sparsity("update_masks", "sparsity", sparsity)
        step = self._step
        self._recompute({i: sparsity if sparsity is not None else g[0].schedule.sparsity(step)
                         for i, g in enumerate(self._groups)})

    def _targets_by_name(self, mapping: Mapping[str, float]) -> dict[int, float]:
        group_of = {slot.target.name: i for i, g in enumerate(self._groups) for slot in g}
        out = {}
        for name, value in mapping.items():
            if name not in group_of:
                raise ValueError(f"update_masks: {name!r} is not pruned by this pruner; pruned: {self.names}")
            index = group_of[name]
            if len(self._groups[index]) > 1:
                raise ValueError(f"update_masks: {name!r} is ranked globally with other parameters; "
                                 "pass one float for the whole group")
            out[index] = check_sparsity("update_masks", f"sparsity[{name!r}]", value)
        return out

    def apply_masks(self) -> None:
        """Write zeros (``+0.0``) into every pruned weight, in place; storage and identity unchanged.

        Raises:
            ValueError: a pruned layer or parameter was replaced since the Pruner was built.
        """
        self._check_model("Pruner.apply_masks")
        self._apply_masks()

    @torch.no_grad()
    def _apply_masks(self, slots: Sequence[_Slot] | None = None) -> None:
        for slot in self._slots if slots is None else slots:
            if slot.active:
                slot.sync()
                slot.param.masked_fill_(slot.pruned, 0)

    @torch.no_grad()
    def _reapply_fast(self) -> None:
        # After an ordinary optimizer step pruned weights are still zero (their
        # gradients and optimizer state are zero); one fused multiply guards
        # against optimizers that move them anyway.
        active = [s for s in self._slots if s.active]
        for slot in active:
            slot.sync()
        if active:
            torch._foreach_mul_([s.param for s in active], [s.keep for s in active])

    def remove(self) -> nn.Module:
        """Apply masks one last time, remove every hook and return the plain model.

        Parameters replaced since the Pruner was built are left alone (the
        model no longer uses the tensors the masks were made for).

        Example:
            >>> model = pruner.remove()  # doctest: +SKIP
        """
        if not self._removed:
            self._apply_masks([s for s in self._slots if _stale_reason(s) is None])
            self._release()
        return self.model

    def _release(self) -> None:
        for handle in self._handles + self._opt_handles:
            handle.remove()
        self._handles.clear()
        self._opt_handles.clear()
        self._optimizers.clear()
        self._removed = True
        _LIVE.discard(self)

    def report(self) -> "SparsityReport":
        """Per-layer and total sparsity of the pruned parameters (see :func:`prunekit.sparsity_report`).

        Raises:
            ValueError: a pruned layer or parameter was replaced since the Pruner was built.
        """
        from .report import sparsity_report

        return sparsity_report(self.model, pruner=self)

    def target_sparsity(self, name: str) -> float:
        """The target sparsity last applied to parameter ``name``."""
        for slot in self._slots:
            if slot.target.name == name:
                return slot.target_sparsity
        raise KeyError(f"target_sparsity: {name!r} is not pruned by this pruner; pruned: {self.names}")

    # -- mask computation -----------------------------------------------------------------

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._state_pending:
            self._state_pending = False
            self._clear_optimizer_state()
        self.step()

    def _update(self) -> None:
        step = self._step
        due = {i: g[0].schedule.sparsity(step) for i, g in enumerate(self._groups) if g[0].schedule.should_update(step)}
        if due:
            self._recompute(due)
        else:
            self._reapply_fast()

    def _recompute(self, targets: dict[int, float]) -> None:
        for index, sparsity in targets.items():
            self._compute_group(self._groups[index], sparsity)
        if targets:
            self._clear_optimizer_state()
            self._apply_masks()

    def _compute_group(self, group: list[_Slot], sparsity: float) -> None:
        # Granularities see every weight as (out, in, *kernel): N:M groups run along
        # the inputs and channels are outputs whatever the stored layout (Conv1D, ConvTranspose).
        specs = [slot.target.spec for slot in group]
        scores = [spec.canonical(self._scores(slot)) for spec, slot in zip(specs, group)]
        priors = [spec.canonical(~slot.pruned) if slot.active else None for spec, slot in zip(specs, group)]
        try:
            if len(group) == 1 and not self.granularity.supports_global:
                keeps = [self.granularity.mask(scores[0], sparsity, priors[0])]
            else:
                keeps = rank_units(self.granularity, scores, priors, sparsity)
        except ValueError as exc:  # e.g. a shape the pattern does not tile: say which parameter
            names = ", ".join(f"'{slot.target.name}'" for slot in group)
            raise ValueError(f"cannot prune {names} with {self.granularity!r}: {exc}") from None
        keeps = sync_keeps(keeps)  # DDP: every rank takes rank 0's masks (see prunekit.core.distributed)
        for slot, spec, keep in zip(group, specs, keeps):
            if keep.dim() == slot.param.dim() >= 2:
                keep = spec.from_canonical(keep)
            if keep.shape != slot.param.shape or keep.dtype != torch.bool:
                raise ValueError(f"{self.granularity!r} returned a mask of shape {tuple(keep.shape)} / {keep.dtype} "
                                 f"for '{slot.target.name}' of shape {tuple(slot.param.shape)}; expected bool of that shape")
            slot.set_keep(keep)
            slot.target_sparsity = sparsity

    def _scores(self, slot: _Slot) -> torch.Tensor:
        name, param = slot.target.name, slot.param
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

    @torch.no_grad()
    def _clear_optimizer_state(self) -> None:
        # Momentum and first moments of pruned entries would otherwise keep pushing
        # them. Second moments only divide a first moment that is now exactly zero,
        # so they are left alone, except that zeros become 1.0: sqrt(0.0) is several
        # times slower than sqrt(1.0) on common x86 CPUs and would slow every Adam step.
        # Both rules are idempotent, so clearing again (after load_state_dict, or on the
        # first step after attach) changes nothing and a resumed run stays bit-identical.
        for optimizer in self._optimizers:
            for slot in self._slots:
                state = optimizer.state.get(slot.param)
                if not state or not slot.active:
                    continue
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == slot.param.shape:
                        if key in _SECOND_MOMENTS:
                            value.masked_fill_(slot.pruned & (value == 0), 1.0)
                        else:
                            value.masked_fill_(slot.pruned, 0.0)

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this Pruner was removed (strip/remove); create a new one to prune again")

    def _check_model(self, owner: str) -> None:
        # Runs after every optimizer step: one dict lookup per module and parameter
        # on the way to each pruned weight, and one shape comparison per weight.
        for table, key, expected, _ in self._edges:
            if table.get(key) is not expected:
                self._raise_stale(owner)
        for slot in self._slots:
            param = slot.param
            if param.shape != slot.shape or param.is_meta:
                self._raise_stale(owner)

    def _raise_stale(self, owner: str) -> NoReturn:
        for slot in self._slots:
            reason = _stale_reason(slot)
            if reason is not None:
                raise ValueError(f"{owner}: {reason} after this Pruner was built; {_REBUILD}")
        raise ValueError(f"{owner}: the model changed after this Pruner was built; {_REBUILD}")

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks and schedule position, as tensors and plain values (``torch.load(weights_only=True)`` safe).

        Example:
            >>> torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, "ckpt.pt")  # doctest: +SKIP
        """
        self._check_model("Pruner.state_dict")
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "step": self._step,
            "ranking": self.ranking,
            "schedule": self.schedule.to_dict(),
            "masks": {s.target.name: (~s.pruned).cpu() for s in self._slots},
            "target_sparsity": {s.target.name: s.target_sparsity for s in self._slots},
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore masks and step from :meth:`state_dict`, and apply the masks.

        Args:
            state: the dict from :meth:`state_dict`.
            strict: require the same schedule, ranking and parameter names.

        Raises:
            ValueError: the state is malformed or does not fit this pruner.
        """
        self._check_live()
        self._check_model("Pruner.load_state_dict")
        masks = _validated_masks(state, {s.target.name: s for s in self._slots}, strict)
        if strict:
            for key, mine in (("schedule", self.schedule.to_dict()), ("ranking", self.ranking)):
                if state.get(key) != mine:
                    raise ValueError(f"load_state_dict: saved {key} {state.get(key)!r} differs from this pruner's "
                                     f"{mine!r} (pass strict=False to load anyway)")
        self._step = check_int("load_state_dict", "step", state.get("step"), minimum=0)
        targets = state.get("target_sparsity", {})
        for slot in self._slots:
            if slot.target.name in masks:
                slot.set_keep(masks[slot.target.name].to(slot.param.device))
                slot.target_sparsity = float(targets.get(slot.target.name, 0.0))
        self._clear_optimizer_state()
        self._apply_masks()

    def __repr__(self) -> str:
        return (f"Pruner({len(self._slots)} tensors, schedule={self.schedule!r}, criterion={self.criterion!r}, "
                f"granularity={self.granularity!r}, ranking={self.ranking!r}, step={self._step})")


def _mask_grad(pruner: Pruner, slot: _Slot, param: torch.Tensor) -> None:
    if slot.active and param.grad is not None:
        if param.shape != slot.shape:  # .data reassigned: the mask no longer fits (it could even broadcast)
            pruner._raise_stale("Pruner (in backward)")
        slot.sync()
        param.grad.mul_(slot.keep)


def _as_schedule(arg: str, value: Any) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ConstantSparsity(check_sparsity("Pruner", arg, value), begin_step=0, end_step=0, frequency=1)
    if isinstance(value, dict):
        return schedule_from_dict(value)
    raise TypeError(f"Pruner: {arg} must be a Schedule, a dict from Schedule.to_dict() or a sparsity in [0, 1), "
                    f"got {type(value).__name__}")


def _check_kind(arg: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"Pruner: {arg} must be a prunekit {kind.__name__} instance, got {type(value).__name__}")


def _validated_masks(state: Any, slots: dict[str, _Slot], strict: bool) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
        raise ValueError("load_state_dict: not a prunekit Pruner state (missing format marker)")
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"load_state_dict: unsupported version {state.get('version')!r}; expected {_STATE_VERSION}")
    masks = state.get("masks")
    if not isinstance(masks, Mapping):
        raise ValueError("load_state_dict: 'masks' must be a dict of boolean tensors")
    missing, unexpected = sorted(set(slots) - set(masks)), sorted(set(masks) - set(slots))
    if strict and (missing or unexpected):
        raise ValueError(f"load_state_dict: masks do not match the pruned parameters; missing {missing}, unexpected {unexpected}")
    out = {}
    for name, mask in masks.items():
        if name not in slots:
            continue
        shape = tuple(slots[name].param.shape)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(f"load_state_dict: mask for '{name}' must be a bool tensor of shape {shape}, "
                             f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        out[name] = mask
    return out


def strip(model: nn.Module) -> nn.Module:
    """Finish pruning: apply masks, remove every prunekit hook from ``model``, return it.

    The result is a plain ``nn.Module`` whose pruned weights are exact zeros,
    with the same ``state_dict`` keys as before. Calling it on a model without
    pruners is a no-op.

    Example:
        >>> model = strip(model)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"strip: model must be an nn.Module, got {type(model).__name__}")
    params = {id(p) for p in model.parameters()}
    for pruner in list(_LIVE):
        if any(id(s.param) in params for s in pruner._slots):
            pruner.remove()
    return model


from .report import SparsityReport  # noqa: E402  (type reference for report())
