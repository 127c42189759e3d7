"""Scope: which parameters of a model are pruned.

The layer registry (:mod:`prunekit.core.layerspec`) says which parameters of each
layer type are prunable weights and how they are laid out. :func:`resolve_scope`
walks a model and applies the user's selection:

* ``layers``: ``None`` (the whole model) or a list of selectors;
* ``exclude``: selectors removed from that set;
* ``overrides``: ``{pattern: value}`` giving some parameters their own sparsity.

A selector is a glob pattern matched against module names and full parameter
names (``"features.*"``, ``"lstm.weight_hh_*"``), a module type (``nn.Conv2d``,
matched with ``isinstance``), or a predicate ``(name, module) -> bool``. Names
and types also select everything inside a matching module (``"encoder"``,
``nn.TransformerEncoderLayer``); predicates are asked about each module alone.
Layers of unknown types are skipped and reported, unless the user named them
by exact name or type, which is an error. A tied or shared parameter is one
target with all its names (``aliases``): a selector, exclusion or override
that names any of them applies to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Mapping, Sequence, Union

from torch import nn
from torch.nn.utils import parametrize

from .layerspec import (
    _REGISTRY,  # noqa: F401 - the one layer registry, also reachable as scope._REGISTRY
    DEFAULT_SPEC,
    POSITION_MODULES,
    WeightSpec,
    declared_specs,
    prunable_parameter_names,
    register_prunable,
)

__all__ = [
    "register_prunable",
    "prunable_parameter_names",
    "resolve_scope",
    "check_materialised",
    "Selector",
    "Target",
    "Scope",
]

Selector = Union[str, type, Callable[[str, nn.Module], bool]]


def _parametrized_names(module: nn.Module) -> list[str]:
    # A parametrized weight is computed on every access from `original`; zeroing
    # `original` would not make the weight zero (weight norm, orthogonal, ...).
    if not parametrize.is_parametrized(module):
        return []
    return [n for n in (declared_specs(module) or {}) if parametrize.is_parametrized(module, n)]


@dataclass(frozen=True)
class Target:
    """One parameter in scope.

    Attributes:
        name: full parameter name as in ``model.state_dict()``.
        module_name: name of the owning module (``""`` for the root).
        module: the owning module.
        param_name: attribute name on the module.
        override: the user's per-layer sparsity override (a float or a schedule), if any.
        spec: the weight's layout (output and input axes), see :class:`~prunekit.core.layerspec.WeightSpec`.
        aliases: every name of the parameter, ``name`` first (more than one when it is tied or shared).
    """

    name: str
    module_name: str
    module: nn.Module
    param_name: str
    override: Any = None
    spec: WeightSpec = DEFAULT_SPEC
    aliases: tuple[str, ...] = ()

    @property
    def param(self) -> nn.Parameter:
        """The live parameter object."""
        return getattr(self.module, self.param_name)


@dataclass
class Scope:
    """The result of :func:`resolve_scope`: targets in model order, and what was skipped."""

    targets: list[Target] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def check_materialised(owner: str, targets: Sequence[Target]) -> None:
    """Raise ``ValueError`` naming the first target on the ``meta`` device (shapes only, no values).

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     net = nn.Sequential(nn.Linear(4, 2))
        >>> check_materialised("Pruner", resolve_scope(net).targets)
        Traceback (most recent call last):
        ...
        ValueError: Pruner: parameter '0.weight' is on the meta device (shapes only, no values); materialise the model first: model.to_empty(device="cpu"), then load its weights
    """
    for target in targets:
        if target.param.is_meta:
            raise ValueError(f"{owner}: parameter '{target.name}' is on the meta device (shapes only, no values); "
                             'materialise the model first: model.to_empty(device="cpu"), then load its weights')


def _is_explicit(sel: Selector) -> bool:
    return isinstance(sel, type) or (isinstance(sel, str) and not any(c in sel for c in "*?["))


def _matches(sel: Selector, module_name: str, param_full: str | None, module: nn.Module,
             ancestors: Sequence[tuple[str, nn.Module]] = ()) -> bool:
    # Names and types also match through an enclosing module, so "encoder" or
    # TransformerEncoderLayer select the layers inside; predicates see each module alone.
    if isinstance(sel, str):
        names = [module_name, *(n for n, _ in ancestors if n)]
        return any(fnmatchcase(n, sel) for n in names) or (param_full is not None and fnmatchcase(param_full, sel))
    if isinstance(sel, type):
        return isinstance(module, sel) or any(isinstance(m, sel) for _, m in ancestors)
    return bool(sel(module_name, module))


def _check_selectors(arg: str, selectors: Any) -> list[Selector] | None:
    if selectors is None:
        return None
    if isinstance(selectors, (str, type)) or callable(selectors):
        selectors = [selectors]
    if not isinstance(selectors, (list, tuple)):
        raise TypeError(f"{arg} must be a list of name patterns, module types or predicates, got {selectors!r}")
    for sel in selectors:
        # Types and module instances are callable too: only nn.Module types and plain callables are selectors.
        predicate = callable(sel) and not isinstance(sel, (type, nn.Module))
        if not (isinstance(sel, str) or (isinstance(sel, type) and issubclass(sel, nn.Module)) or predicate):
            raise TypeError(f"{arg}: each entry must be a name pattern (str), an nn.Module type or a predicate (name, module) -> bool; got {sel!r}")
    return list(selectors)


def resolve_scope(
    model: nn.Module,
    layers: Sequence[Selector] | None = None,
    exclude: Sequence[Selector] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Scope:
    """Find the parameters of ``model`` to prune.

    Args:
        model: the model.
        layers: ``None`` for every known layer, or selectors to choose from.
        exclude: selectors removed from the chosen set.
        overrides: ``{pattern: value}``; the value is attached to each matched target.

    Returns:
        A :class:`Scope`. A tied or shared parameter appears once, under its first
        name, with every name in ``Target.aliases``.

    Raises:
        TypeError: a selector of the wrong kind.
        ValueError: a selector or override that matches nothing, a layer of
            unknown type named explicitly, or a parameter matched by two overrides.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> [t.name for t in resolve_scope(net, exclude=["2"]).targets]
        ['0.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = _check_selectors("layers", layers)
    exclude = _check_selectors("exclude", exclude)
    overrides = _check_overrides(overrides)
    used: set[tuple[str, int]] = set()
    scope = Scope()
    for places in _weights_by_identity(model, scope, layers, used):
        if not _selected(places, layers, exclude, used):
            continue
        override = _find_override(places, overrides, used)
        first = places[0]
        aliases = tuple(p.full for p in places)
        scope.targets.append(Target(first.full, first.module_name, first.module, first.param_name, override,
                                    first.spec, aliases))
    _check_all_used(layers, exclude, overrides, used)
    return scope


@dataclass(frozen=True)
class _Place:
    """One name under which a prunable weight is reachable."""

    full: str
    module_name: str
    module: nn.Module
    param_name: str
    spec: WeightSpec
    ancestors: tuple[tuple[str, nn.Module], ...]


def _weights_by_identity(model, scope, layers, used) -> list[list[_Place]]:
    # Tied weights (an embedding shared with an output head) are one parameter
    # reached under several names: group them, in model order of first sight.
    groups: dict[int, list[_Place]] = {}
    by_name: dict[str, nn.Module] = {}
    seen_modules: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        first_sight = id(module) not in seen_modules
        seen_modules.add(id(module))
        by_name[module_name] = module
        specs = declared_specs(module)
        names = prunable_parameter_names(module)
        if names is None:
            if first_sight:
                _handle_unknown(scope, module_name, module, layers, used)
            continue
        ancestors = tuple(_ancestors(module_name, by_name))
        if first_sight:
            for pname in _parametrized_names(module):
                scope.skipped.append((module_name, f"'{pname}' is parametrized (torch.nn.utils.parametrize); "
                                                   "remove the parametrization to prune it"))
        if names and _is_position_table(module_name, module) and not _named_explicitly(module_name, module, layers):
            if first_sight:
                scope.skipped.append((module_name, "position / token-type embedding, never pruned by default "
                                                   f"(name '{module_name}' in layers= to prune it)"))
            continue
        for pname in names:
            full = f"{module_name}.{pname}" if module_name else pname
            places = groups.setdefault(id(getattr(module, pname)), [])
            if all(p.full != full for p in places):
                spec = (specs or {}).get(pname, DEFAULT_SPEC)
                places.append(_Place(full, module_name, module, pname, spec, ancestors))
    return list(groups.values())


def _check_overrides(overrides: Any) -> dict[str, Any] | None:
    if overrides is None:
        return None
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a dict {{name pattern: sparsity or schedule}}, got {type(overrides).__name__}")
    for key in overrides:
        if not isinstance(key, str):
            raise TypeError(f"overrides: keys must be name patterns (str), got {key!r}")
    return dict(overrides)


def _ancestors(module_name: str, by_name: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    # named_modules() is pre-order, so every enclosing module is already in by_name.
    if not module_name:
        return []
    parts = module_name.split(".")
    prefixes = [""] + [".".join(parts[:i]) for i in range(1, len(parts))]
    return [(p, by_name[p]) for p in prefixes if p in by_name]


def _is_position_table(module_name: str, module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module_name.rsplit(".", 1)[-1] in POSITION_MODULES


def _named_explicitly(module_name: str, module: nn.Module, layers) -> bool:
    return any(_is_explicit(sel) and _matches(sel, module_name, None, module) for sel in layers or ())


def _selected(places: list[_Place], layers, exclude, used) -> bool:
    def hits(selectors):
        return [i for i, sel in enumerate(selectors or ())
                if any(_matches(sel, p.module_name, p.full, p.module, p.ancestors) for p in places)]

    chosen = hits(layers)
    used.update(("layers", i) for i in chosen)
    if layers is not None and not chosen:
        return False
    excluded = hits(exclude)
    used.update(("exclude", i) for i in excluded)
    return not excluded


def _find_override(places: list[_Place], overrides, used) -> Any:
    if not overrides:
        return None
    hits = [(i, key) for i, key in enumerate(overrides)
            if any(_matches(key, p.module_name, p.full, p.module, p.ancestors) for p in places)]
    if len(hits) > 1:
        keys = [key for _, key in hits]
        names = " / ".join(f"'{p.full}'" for p in places)
        raise ValueError(f"overrides: parameter {names} is matched by several patterns {keys}; make them disjoint")
    if not hits:
        return None
    used.add(("overrides", hits[0][0]))
    return overrides[hits[0][1]]


def _handle_unknown(scope, module_name, module, layers, used) -> None:
    if not any(True for _ in module.parameters(recurse=False)):
        return
    kind = type(module).__name__
    fulls = [None] + [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
    for sel in layers or ():
        if _is_explicit(sel) and any(_matches(sel, module_name, full, module) for full in fulls):
            raise ValueError(
                f"layers: {sel!r} selects '{module_name}' of type {kind}, whose prunable parameters are unknown; "
                f"declare them with prunekit.register_prunable({kind}, [names])"
            )
    scope.skipped.append((module_name, f"unknown layer type {kind} (see prunekit.register_prunable)"))


def _check_all_used(layers, exclude, overrides, used) -> None:
    for arg, sels in (("layers", layers), ("exclude", exclude), ("overrides", list(overrides or ()))):
        for i, sel in enumerate(sels or ()):
            if (arg, i) not in used:
                raise ValueError(f"{arg}: {sel!r} matched no prunable parameter of the model")
