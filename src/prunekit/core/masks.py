"""The mask keeper: boolean masks held outside the model and kept applied through training.

Every pruning engine of prunekit (:class:`~prunekit.Pruner`,
:class:`~prunekit.StructuredPruner`, lottery tickets, iterative pruning) keeps
its masks here; none keeps masks of its own. A :class:`MaskKeeper`

- zeroes a pruned weight's gradient as soon as it is accumulated;
- re-applies the masks after every ``optimizer.step()`` of an attached optimizer;
- cleans the optimizer's per-parameter state (momentum and first moments of
  pruned entries are zeroed; second moments only ever divide a zero first
  moment, so they are kept, except that zeros become 1.0, which keeps Adam's
  ``sqrt`` fast), including state the optimizer creates lazily at its first step;
- broadcasts rank 0's masks to every rank under ``torch.distributed``;
- works on FSDP2-sharded parameters (``fully_shard``; build the keeper after it):
  a sharded parameter's masks are DTensors laid out like it, so each rank holds
  (and applies, to weights, gradients and optimizer state) only the mask shard
  of its own parameter shard; full masks are assembled only to save them
  (:meth:`MaskKeeper.state_dict`, a collective) and are cut locally on load;
- owns its parameters: a second live keeper over any of them is refused, and a
  pruned layer or parameter replaced behind its back is detected at the next
  step, naming the parameter.

No wrapper layers and no renamed parameters: the model stays an ordinary
``nn.Module``; :func:`strip` removes whatever any engine installed.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import torch
from torch import nn

from .distributed import (count_true, full_tensor, is_sharded, local_like, local_tensor, reshard_fsdp, shard_like,
                          sync_keeps)
from .scope import Target, check_materialised

__all__ = ["MaskKeeper", "Slot", "check_unowned", "parameter_targets", "strip"]

_STATE_FORMAT = "prunekit.MaskKeeper"
_STATE_VERSION = 1
_LIVE: "weakref.WeakSet[MaskKeeper]" = weakref.WeakSet()
# Optimizer state entries that only ever scale a first moment or gradient (torch.optim names).
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})
# Per-parameter counters (torch.optim names): of a parameter's shape only when it is a scalar; never masked.
_COUNTERS = frozenset({"step", "mu_product"})

# How the model reaches a masked weight: ``table.get(key) is expected`` along the path
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


class Slot:
    """Mask state of one masked parameter (read-only outside this module).

    Attributes:
        target: the parameter's scope entry (name, owning module, layout, aliases).
        param: the parameter.
        pruned: bool tensor, ``True`` where the weight is pruned (a DTensor laid out as a sharded parameter).
        keep: the keep mask in the parameter's dtype (1 = kept), for fused multiplies.
        n_pruned: the number of pruned entries (over all shards: the same on every rank).
        active: whether any entry is pruned (all-ones masks are skipped on the hot path).
        target_sparsity: the engine's last target for it (informational).
    """

    __slots__ = ("target", "param", "shape", "pruned", "keep", "n_pruned", "active", "target_sparsity", "edges")

    def __init__(self, target: Target, edges: list[_Edge]) -> None:
        self.target = target
        self.param = target.param
        self.shape = self.param.shape
        self.pruned = torch.zeros_like(self.param, dtype=torch.bool)
        # The hot path multiplies by a mask in the parameter's dtype: an order of
        # magnitude faster than masked_fill_ with a bool mask on CPU.
        self.keep = torch.ones_like(self.param, requires_grad=False)
        self.n_pruned = 0
        self.active = False
        self.target_sparsity = 0.0
        self.edges = edges

    @property
    def name(self) -> str:
        """The parameter's full name."""
        return self.target.name

    def sync(self, owner: str) -> None:
        # model.to(device) / model.half() change a parameter's data in place of
        # its identity; the masks follow lazily.
        param = self.param
        if self.keep.device != param.device or self.keep.dtype != param.dtype:
            if param.shape != self.shape or param.is_meta:  # rare: checked only when the data changed
                raise ValueError(f"{owner}: {_stale_reason(self)} after this {owner} was built; {_rebuild(owner)}")
            self.keep = self.keep.to(device=param.device, dtype=param.dtype)
            self.pruned = self.pruned.to(param.device)

    def set_keep(self, keep: torch.Tensor, owner: str) -> None:
        """Take ``keep`` (full, or a DTensor of the parameter's layout for a sharded parameter)."""
        self.sync(owner)
        # Counted before sharding: a full mask is the same on every rank, so no collective is needed.
        self.n_pruned = keep.numel() - count_true(keep)
        if is_sharded(self.param):
            keep = keep.redistribute(self.param.device_mesh, self.param.placements) if is_sharded(keep) \
                else shard_like(keep, self.param)
        elif is_sharded(keep):  # a DTensor mask for an ordinary parameter: its shard would not fit
            keep = keep.full_tensor()
        keep = local_tensor(keep).to(self.pruned.device)
        torch.logical_not(keep, out=local_tensor(self.pruned))
        local_tensor(self.keep).copy_(keep)
        self.active = self.n_pruned > 0

    def full_keep(self) -> torch.Tensor:
        """The whole keep mask on CPU (for a sharded parameter an all-gather: every rank must call)."""
        return full_tensor(~self.pruned).cpu()


def _rebuild(owner: str) -> str:
    return (f"its masks no longer describe the model; call .remove() on it (or prunekit.strip(model)) "
            f"and build a new prunekit.{owner}(...) on the model as it is now")


def _stale_reason(slot: Slot) -> str | None:
    """What changed about ``slot``'s parameter since the keeper was built, or ``None``."""
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
        if is_sharded(now) and not is_sharded(expected):
            return f"parameter '{path}' was sharded by fully_shard"
        if is_sharded(expected) and isinstance(now, torch.Tensor) and now.shape == expected.shape:
            return (f"parameter '{path}' is held unsharded, not as FSDP2's sharded parameter "
                    "(model.reshard() did not restore it)")
        return (f"parameter '{path}' was replaced by another tensor (a new nn.Parameter, "
                "load_state_dict(assign=True) or a conversion that creates new parameters)")
    param = slot.param
    if param.shape != slot.shape:
        return (f"parameter '{name}' changed shape from {tuple(slot.shape)} to {tuple(param.shape)} "
                "(its .data was reassigned)")
    if param.is_meta:
        return f"parameter '{name}' was moved to the meta device"
    return None


def parameter_targets(model: nn.Module, names: Iterable[str]) -> list[Target]:
    """Scope targets for arbitrary parameters of ``model`` by full name (biases and norms too), tied ones once.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> [t.name for t in parameter_targets(net, ["0.bias", "0.weight"])]
        ['0.bias', '0.weight']
    """
    places: dict[int, list[str]] = {}
    by_name: dict[str, tuple[str, nn.Module, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(prefix="", recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            places.setdefault(id(param), []).append(full)
            by_name[full] = (module_name, module, pname)
    targets: dict[str, Target] = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"MaskKeeper: parameter names must be str, got {type(name).__name__}")
        if name not in by_name:
            raise ValueError(f"MaskKeeper: {name!r} is not a parameter of the model "
                             "(give full names as in model.named_parameters())")
        module_name, module, pname = by_name[name]
        aliases = tuple(places[id(getattr(module, pname))])
        first = aliases[0]
        if first not in targets:  # two names of one tied weight: one mask
            module_name, module, pname = by_name[first]
            targets[first] = Target(first, module_name, module, pname, aliases=aliases)
    return list(targets.values())


class MaskKeeper:
    """Hold boolean masks for parameters of ``model`` and keep them applied while it trains.

    This is the manual mode of pruning: you set the masks (:meth:`set_masks`),
    the keeper keeps pruned weights at exactly zero through every step of
    every attached optimizer. Engines with a schedule (:class:`prunekit.Pruner`,
    :class:`prunekit.StructuredPruner`) are built on it and pass ``on_step``.

    Args:
        model: the model; its parameters are masked in place.
        params: full parameter names (any parameter: weights, biases, norms;
            a tied weight by any of its names), or ``None`` for every prunable
            weight (as :class:`prunekit.Pruner` with no ``layers``).
        optimizer: optional optimizer to :meth:`attach` right away.
        owner: the engine's name, used in error messages.
        on_step: called after each ``optimizer.step()`` of an attached
            optimizer instead of :meth:`step` (an engine advances its schedule
            there and calls :meth:`reapply` or :meth:`set_masks`).

    Raises:
        ValueError: no parameter, an unknown name, a parameter on the meta
            device, or a parameter already masked by another live keeper.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> keeper = MaskKeeper(net, ["0.weight"], optimizer=opt)
        >>> keeper.set_masks({"0.weight": torch.tensor([[True, False] * 2] * 2)})
        >>> for _ in range(3):
        ...     opt.zero_grad(); net(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> bool((net[0].weight[:, 1::2] == 0).all())
        True
    """

    def __init__(self, model: nn.Module, params: Iterable[str] | Sequence[Target] | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, owner: str = "MaskKeeper",
                 on_step: Callable[[], None] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        reshard_fsdp(model)  # FSDP2: the masks are made for the sharded parameters, not a forward's full copies
        if params is None:
            from .scope import resolve_scope  # the default scope: every prunable weight

            targets = list(resolve_scope(model).targets)
        else:
            params = list(params)
            targets = params if params and all(isinstance(p, Target) for p in params) else parameter_targets(model, params)
        if not targets:
            raise ValueError(f"{owner}: no parameter to mask")
        check_materialised(owner, targets)
        check_unowned(owner, ((t.name, t.param) for t in targets))
        self.model, self.owner, self.on_step = model, owner, on_step
        self.slots = [Slot(t, _target_edges(model, t)) for t in targets]
        self._by_name = {alias: slot for slot in self.slots for alias in slot.target.aliases or (slot.name,)}
        self._edges = _unique_edges(self.slots)
        self._optimizers: list[torch.optim.Optimizer] = []
        self._opt_handles: list[Any] = []
        self._handles: list[Any] = []
        self._unhooked = list(self.slots)
        self._state_pending = False
        self.removed = False
        try:
            self.hook_grads()
            _LIVE.add(self)
            if optimizer is not None:
                self.attach(optimizer)
        except BaseException:
            self._release()  # a half-built keeper must not keep hooks on (or ownership of) the parameters
            raise

    # -- masks ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Full names of the masked parameters, in the order given."""
        return [slot.name for slot in self.slots]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Copies of the boolean keep-masks (``True`` = kept), by parameter name.

        For an FSDP2-sharded parameter the mask is a DTensor laid out like it (no communication);
        ``.full_tensor()`` gives the whole mask, :meth:`state_dict` all of them.
        """
        return {slot.name: ~slot.pruned for slot in self.slots}

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The attached optimizers, in the order they were attached."""
        return tuple(self._optimizers)

    def slot(self, name: str) -> Slot:
        """The mask state of parameter ``name`` (any of its names).

        Raises:
            KeyError: ``name`` is not masked by this keeper.
        """
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.owner}: {name!r} is not masked here; masked: {self.names}") from None

    def set_masks(self, masks: Mapping[str, torch.Tensor], *, sync: bool = True) -> None:
        """Set keep-masks (``True`` = kept) for some or all parameters, clean optimizer state, apply them.

        Under ``torch.distributed`` every rank takes rank 0's masks (``sync=False``
        when the masks are known to agree already, e.g. a checkpoint every rank loaded).
        For an FSDP2-sharded parameter give the full mask (every rank keeps its
        own shard of it) or a DTensor mask (taken as it is: it is one tensor already).

        Raises:
            ValueError: an unknown name, or a mask that is not bool of the parameter's shape.
        """
        self.check_live()
        self.check_model(f"{self.owner}.set_masks")
        slots, keeps = [], []
        for name, keep in masks.items():
            slot = self.slot(name)
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != slot.param.shape:
                raise ValueError(f"{self.owner}: the mask for '{name}' must be a bool tensor of shape "
                                 f"{tuple(slot.param.shape)}, got {getattr(keep, 'dtype', type(keep).__name__)} "
                                 f"{tuple(getattr(keep, 'shape', ()))}")
            slots.append(slot)
            keeps.append(keep)
        full = [i for i, keep in enumerate(keeps) if not is_sharded(keep)]
        if sync and full:  # DDP/FSDP2: every rank takes rank 0's masks (see prunekit.core.distributed)
            for i, keep in zip(full, sync_keeps([keeps[i] for i in full])):
                keeps[i] = keep
        for slot, keep in zip(slots, keeps):
            slot.set_keep(keep, self.owner)
        self.clean_optimizer_state()
        self.apply()

    def apply(self) -> None:
        """Write zeros (``+0.0``) into every pruned weight, in place; storage and identity unchanged."""
        self._apply(self.slots)

    @torch.no_grad()
    def _apply(self, slots: Sequence[Slot]) -> None:
        for slot in slots:
            if slot.active:
                slot.sync(self.owner)
                local_tensor(slot.param).masked_fill_(local_tensor(slot.pruned), 0)

    @torch.no_grad()
    def reapply(self) -> None:
        """Re-apply masks after an ordinary step (one fused multiply over the pruned tensors)."""
        # Pruned weights are still zero after an ordinary step (their gradients and
        # optimizer state are zero); this guards against optimizers that move them anyway.
        active = [s for s in self.slots if s.active]
        for slot in active:
            slot.sync(self.owner)
        if active:  # a sharded parameter's shard times its mask shard: no communication
            torch._foreach_mul_([local_tensor(s.param) for s in active], [local_tensor(s.keep) for s in active])

    # -- hooks ------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "MaskKeeper":
        """Keep masks applied after every ``optimizer.step()``; returns ``self``.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: it updates none of the masked parameters, or is already attached.
        """
        self.check_live()
        self.check_model(f"{self.owner}.attach")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(s.param) in owned for s in self.slots):
            raise ValueError("attach: the optimizer updates none of the pruned parameters")
        if any(o is optimizer for o in self._optimizers):
            raise ValueError("attach: this optimizer is already attached")
        self._optimizers.append(optimizer)
        self._opt_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self.clean_optimizer_state()
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
        """What follows each optimizer step without ``on_step``: check the model, hook new parameters, re-apply."""
        self.check_live()
        self.check_model(f"{self.owner}.step")
        self.hook_grads()
        self.reapply()

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._state_pending:
            self._state_pending = False
            self.clean_optimizer_state()
        (self.on_step or self.step)()

    def hook_grads(self) -> None:
        """Hook the gradients of masked parameters that can take a gradient now (called at every step)."""
        # A frozen parameter (requires_grad=False) cannot take a gradient hook: it gets
        # one at the first step after it is unfrozen, when the masks and optimizer state
        # that its unmasked gradient may have touched are cleaned up.
        if not self._unhooked:
            return
        fresh = [s for s in self._unhooked if s.param.requires_grad]
        if not fresh:
            return
        for slot in fresh:
            self._handles.append(slot.param.register_post_accumulate_grad_hook(partial(_mask_grad, self, slot)))
        self._unhooked = [s for s in self._unhooked if not s.param.requires_grad]
        self.clean_optimizer_state()
        self.apply()

    @torch.no_grad()
    def clean_optimizer_state(self) -> None:
        """Zero momentum and first moments of pruned entries in every attached optimizer (idempotent)."""
        # Momentum and first moments of pruned entries would otherwise keep pushing
        # them. Second moments only divide a first moment that is now exactly zero,
        # so they are left alone, except that zeros become 1.0: sqrt(0.0) is several
        # times slower than sqrt(1.0) on common x86 CPUs and would slow every Adam step.
        # Both rules are idempotent, so cleaning again (after load_state_dict, or on the
        # first step after attach) changes nothing and a resumed run stays bit-identical.
        for optimizer in self._optimizers:
            for slot in self.slots:
                state = optimizer.state.get(slot.param)
                if not state or not slot.active:
                    continue
                pruned = local_tensor(slot.pruned)
                for key, value in state.items():
                    if key not in _COUNTERS and isinstance(value, torch.Tensor) and value.shape == slot.param.shape:
                        value = local_like(value, slot.param, f"{self.owner}: optimizer state '{key}' of '{slot.name}'")
                        if key in _SECOND_MOMENTS:
                            value.masked_fill_(pruned & (value == 0), 1.0)
                        else:
                            value.masked_fill_(pruned, 0.0)

    # -- liveness ---------------------------------------------------------------------------

    def check_live(self) -> None:
        """Raise ``RuntimeError`` if this keeper was removed."""
        if self.removed:
            raise RuntimeError(f"this {self.owner} was removed (strip/remove); create a new one to prune again")

    def check_model(self, where: str) -> None:
        """Raise ``ValueError`` naming the parameter if a masked layer or parameter was replaced."""
        # Runs after every optimizer step: one dict lookup per module and parameter
        # on the way to each masked weight, and one shape comparison per weight.
        for table, key, expected, _ in self._edges:
            if table.get(key) is not expected:
                # FSDP2 after a forward without backward: put the sharded parameters back, then look again.
                if not reshard_fsdp(self.model) or any(t.get(k) is not e for t, k, e, _ in self._edges):
                    self.raise_stale(where)
                break
        for slot in self.slots:
            param = slot.param
            if param.shape != slot.shape or param.is_meta:
                self.raise_stale(where)

    def raise_stale(self, where: str) -> NoReturn:
        """Raise the ``ValueError`` that names what changed in the model."""
        for slot in self.slots:
            reason = _stale_reason(slot)
            if reason is not None:
                raise ValueError(f"{where}: {reason} after this {self.owner} was built; {_rebuild(self.owner)}")
        raise ValueError(f"{where}: the model changed after this {self.owner} was built; {_rebuild(self.owner)}")

    def remove(self) -> nn.Module:
        """Apply masks one last time, remove every hook, release the parameters; returns the model.

        Parameters replaced since the keeper was built are left alone (the
        model no longer uses the tensors the masks were made for).
        """
        if not self.removed:
            self._apply([s for s in self.slots if _stale_reason(s) is None])
            self._release()
        return self.model

    def _release(self) -> None:
        for handle in self._handles + self._opt_handles:
            handle.remove()
        self._handles.clear()
        self._opt_handles.clear()
        self._optimizers.clear()
        self.removed = True
        _LIVE.discard(self)

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The masks, versioned (``torch.load(weights_only=True)`` safe).

        Masks are full ordinary tensors, FSDP2-sharded ones too (gathered: then every rank
        must call; any rank can save the result, and every rank can load it).

        Example:
            >>> MaskKeeper(nn.Linear(2, 1), ["weight"]).state_dict()["format"]
            'prunekit.MaskKeeper'
        """
        self.check_model(f"{self.owner}.state_dict")
        return {"format": _STATE_FORMAT, "version": _STATE_VERSION,
                "masks": {slot.name: slot.full_keep() for slot in self.slots}}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore masks from :meth:`state_dict` and apply them.

        Raises:
            ValueError: not a keeper state, an unsupported version, or masks that do not fit.
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"{self.owner}.load_state_dict: not a prunekit MaskKeeper state (missing format marker)")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{self.owner}.load_state_dict: unsupported MaskKeeper state version "
                             f"{state.get('version')!r}; this prunekit reads version {_STATE_VERSION}")
        self.check_live()
        self.set_masks(self.validate_masks(state.get("masks"), strict, where=f"{self.owner}.load_state_dict"), sync=False)

    def validate_masks(self, masks: Any, strict: bool, where: str) -> dict[str, torch.Tensor]:
        """Saved masks (hostile input) checked against the masked parameters; returns those that apply.

        Raises:
            ValueError: not a dict of bool tensors of the parameters' shapes, or (``strict``) other names.
        """
        if not isinstance(masks, Mapping):
            raise ValueError(f"{where}: 'masks' must be a dict of boolean tensors")
        mine = {slot.name for slot in self.slots}
        missing, unexpected = sorted(mine - set(masks)), sorted(set(masks) - mine)
        if strict and (missing or unexpected):
            raise ValueError(f"{where}: masks do not match the pruned parameters; missing {missing}, "
                             f"unexpected {unexpected}")
        chosen = {}
        for name, mask in masks.items():
            if name not in mine:
                continue
            shape = tuple(self.slot(name).param.shape)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
                raise ValueError(f"{where}: mask for '{name}' must be a bool tensor of shape {shape}, "
                                 f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
            chosen[name] = mask
        return chosen

    def __repr__(self) -> str:
        return f"MaskKeeper({len(self.slots)} tensors, {len(self._optimizers)} optimizers, owner={self.owner!r})"


def _unique_edges(slots: Sequence[Slot]) -> list[_Edge]:
    unique: dict[tuple[int, str], _Edge] = {}
    for slot in slots:
        for edge in slot.edges:
            unique.setdefault((id(edge[0]), edge[1]), edge)
    return list(unique.values())


def _mask_grad(keeper: MaskKeeper, slot: Slot, param: torch.Tensor) -> None:
    if slot.active and param.grad is not None:
        if param.shape != slot.shape:  # .data reassigned: the mask no longer fits (it could even broadcast)
            keeper.raise_stale(f"{keeper.owner} (in backward)")
        slot.sync(keeper.owner)
        # FSDP2 calls this on the sharded parameter after the reduce-scatter: its gradient shard times the mask shard.
        local_like(param.grad, param, f"{keeper.owner}: the gradient of '{slot.name}'").mul_(local_tensor(slot.keep))


def check_unowned(owner: str, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse ``(name, parameter)`` pairs that a live keeper already masks: two engines would fight over the masks.

    Example:
        >>> check_unowned("demo", nn.Linear(2, 2).named_parameters())  # nothing masked: no error
    """
    mine = {id(p): n for n, p in named}  # both sides hold the tensors, so ids are not reused
    taken = [(mine[id(slot.param)], slot.name, other.owner) for other in list(_LIVE) if not other.removed
             for slot in other.slots if id(slot.param) in mine]
    if taken:
        names = [f"'{n}'" if n == theirs else f"'{n}' (as '{theirs}')" for n, theirs, _ in taken]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(f"{owner}: {shown} already pruned by another live {taken[0][2]}; call .remove() on that one "
                         "(or prunekit.strip(model)) before building a new one")


def strip(model: nn.Module) -> nn.Module:
    """Finish pruning: apply masks, remove every prunekit hook from ``model`` (any engine's), return it.

    The result is a plain ``nn.Module`` whose pruned weights are exact zeros,
    with the same ``state_dict`` keys as before. Calling it on a model without
    pruners is a no-op. An engine whose keeper was stripped refuses further steps.

    Example:
        >>> model = strip(model)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"strip: model must be an nn.Module, got {type(model).__name__}")
    params = {id(p) for p in model.parameters()}
    for keeper in list(_LIVE):
        if any(id(s.param) in params for s in keeper.slots):
            keeper.remove()
    return model
