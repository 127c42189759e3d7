"""Scope: which parameters of a model are pruned.

A registry maps layer types to the names of their prunable parameters
(weights; never biases or normalisation parameters). :func:`resolve_scope`
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
by exact name or type, which is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Mapping, Sequence, Union

from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "register_prunable",
    "prunable_parameter_names",
    "resolve_scope",
    "Selector",
    "Target",
    "Scope",
]

Selector = Union[str, type, Callable[[str, nn.Module], bool]]
ParamSpec = Union[Sequence[str], Callable[[nn.Module], Sequence[str]]]

_REGISTRY: dict[type, ParamSpec] = {}


def register_prunable(module_type: type, params: ParamSpec) -> None:
    """Declare which parameters of ``module_type`` (and its subclasses) may be pruned.

    Args:
        module_type: an ``nn.Module`` subclass.
        params: parameter names, or a function ``module -> names`` for layers
            whose parameter names depend on configuration. An empty list
            marks a layer as known but never pruned (like normalisation layers).

    Example:
        >>> class Gate(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.kernel = nn.Parameter(torch.randn(4, 4))
        >>> register_prunable(Gate, ["kernel"])
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_prunable: module_type must be an nn.Module subclass, got {module_type!r}")
    if isinstance(params, str) or not (callable(params) or isinstance(params, Sequence)):
        raise TypeError("register_prunable: params must be a list of parameter names or a callable module -> names")
    if not callable(params) and not all(isinstance(p, str) for p in params):
        raise TypeError(f"register_prunable: params must contain only strings, got {list(params)!r}")
    _REGISTRY[module_type] = params if callable(params) else tuple(params)


def prunable_parameter_names(module: nn.Module) -> list[str] | None:
    """Names of ``module``'s own prunable parameters, or ``None`` if its type is unknown.

    The most specific registered class in the module's MRO wins, so a
    registration for a subclass overrides the one for its base.

    Example:
        >>> prunable_parameter_names(nn.Linear(2, 3))
        ['weight']
        >>> prunable_parameter_names(nn.LayerNorm(3))
        []
    """
    names = _declared_names(module)
    if names is None:
        return None
    return [n for n in names if isinstance(getattr(module, n, None), nn.Parameter)]


def _declared_names(module: nn.Module) -> list[str] | None:
    for cls in type(module).__mro__:
        spec = _REGISTRY.get(cls)
        if spec is not None:
            return list(spec(module) if callable(spec) else spec)
    return None


def _parametrized_names(module: nn.Module) -> list[str]:
    # A parametrized weight is computed on every access from `original`; zeroing
    # `original` would not make the weight zero (weight norm, orthogonal, ...).
    if not parametrize.is_parametrized(module):
        return []
    return [n for n in (_declared_names(module) or []) if parametrize.is_parametrized(module, n)]


def _rnn_weights(module: nn.Module) -> list[str]:
    return [n for n in module._flat_weights_names if n.startswith("weight_")]


def _mha_weights(module: nn.Module) -> list[str]:
    if module.in_proj_weight is not None:
        return ["in_proj_weight"]
    return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def _register_defaults() -> None:
    for cls in (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag):
        register_prunable(cls, ["weight"])
    register_prunable(nn.RNNBase, _rnn_weights)
    register_prunable(nn.RNNCellBase, ["weight_ih", "weight_hh"])
    register_prunable(nn.MultiheadAttention, _mha_weights)
    never = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.PReLU,
             parametrize.ParametrizationList)  # reported on the layer that owns the parametrization
    for cls in never:
        register_prunable(cls, [])


_register_defaults()


@dataclass(frozen=True)
class Target:
    """One parameter in scope.

    Attributes:
        name: full parameter name as in ``model.state_dict()``.
        module_name: name of the owning module (``""`` for the root).
        module: the owning module.
        param_name: attribute name on the module.
        override: the user's per-layer sparsity override (a float or a schedule), if any.
    """

    name: str
    module_name: str
    module: nn.Module
    param_name: str
    override: Any = None

    @property
    def param(self) -> nn.Parameter:
        """The live parameter object."""
        return getattr(self.module, self.param_name)


@dataclass
class Scope:
    """The result of :func:`resolve_scope`: targets in model order, and what was skipped."""

    targets: list[Target] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
        A :class:`Scope`. Tied parameters appear once, under their first name.

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
    scope, seen, by_name = Scope(), set(), {}
    for module_name, module in model.named_modules():
        by_name[module_name] = module
        names = prunable_parameter_names(module)
        if names is None:
            _handle_unknown(scope, module_name, module, layers, used)
            continue
        ancestors = _ancestors(module_name, by_name)
        for pname in _parametrized_names(module):
            scope.skipped.append((module_name, f"'{pname}' is parametrized (torch.nn.utils.parametrize); "
                                               "remove the parametrization to prune it"))
        for pname in names:
            param = getattr(module, pname)
            full = f"{module_name}.{pname}" if module_name else pname
            if id(param) in seen or not _selected(module_name, full, module, ancestors, layers, exclude, used):
                continue
            seen.add(id(param))
            override = _find_override(full, module_name, module, ancestors, overrides, used)
            scope.targets.append(Target(full, module_name, module, pname, override))
    _check_all_used(layers, exclude, overrides, used)
    return scope


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


def _selected(module_name, full, module, ancestors, layers, exclude, used) -> bool:
    chosen = layers is None
    for i, sel in enumerate(layers or ()):
        if _matches(sel, module_name, full, module, ancestors):
            used.add(("layers", i))
            chosen = True
    if not chosen:
        return False
    hit = [i for i, sel in enumerate(exclude or ()) if _matches(sel, module_name, full, module, ancestors)]
    used.update(("exclude", i) for i in hit)
    return not hit


def _find_override(full, module_name, module, ancestors, overrides, used) -> Any:
    if not overrides:
        return None
    hits = [(i, key) for i, key in enumerate(overrides) if _matches(key, module_name, full, module, ancestors)]
    if len(hits) > 1:
        keys = [key for _, key in hits]
        raise ValueError(f"overrides: parameter '{full}' is matched by several patterns {keys}; make them disjoint")
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
