"""Layer specs: which parameters of a layer type are prunable, and how each weight is laid out.

Every part of prunekit that looks at a weight's structure (N:M groups along the
inputs, blocks, channels, Wanda's per-output comparison, SparseGPT's rows,
structural surgery, the sparse runtime) sees it through one
:class:`WeightSpec`: which axis indexes the outputs, which the inputs, and that
every other axis is a kernel position. The *canonical* layout is
``(out, in, *kernel)``; its 2-D *matrix* view is ``(out, in * prod(kernel))``
with the kernel position varying fastest, exactly the ``(out, in*kh*kw)`` view
of an ``nn.Conv2d`` weight.

The registry maps layer types (looked up along the MRO, so every subclass of
``nn.Linear`` / ``nn.Conv2d`` is covered) to their prunable parameters.
Layers from libraries prunekit knows (transformers' ``Conv1D``) are recognised
on first sight without importing the library.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "WeightSpec",
    "register_prunable",
    "prunable_parameter_names",
    "weight_spec",
    "never_pruned_reason",
    "POSITION_MODULES",
]


@dataclass(frozen=True)
class WeightSpec:
    """How a weight tensor is laid out: its output axis, its input axis, the rest are kernel positions.

    Attributes:
        out_axis: the axis that indexes output units (rows of the matrix view).
        in_axis: the axis that indexes inputs.

    Example:
        >>> spec = WeightSpec(out_axis=1, in_axis=0)   # a (in, out) weight such as transformers' Conv1D
        >>> w = torch.arange(6.0).reshape(3, 2)        # 3 inputs, 2 outputs
        >>> spec.matrix(w)
        tensor([[0., 2., 4.],
                [1., 3., 5.]])
        >>> torch.equal(spec.from_matrix(spec.matrix(w), w.shape), w)
        True
    """

    out_axis: int = 0
    in_axis: int = 1

    def __post_init__(self) -> None:
        for arg in ("out_axis", "in_axis"):
            value = getattr(self, arg)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"WeightSpec: {arg} must be an int >= 0, got {value!r}")
        if self.out_axis == self.in_axis:
            raise ValueError(f"WeightSpec: out_axis and in_axis must differ, both are {self.out_axis}")

    @property
    def is_identity(self) -> bool:
        """True when the stored layout already is ``(out, in, *kernel)``."""
        return self.out_axis == 0 and self.in_axis == 1

    def _order(self, ndim: int) -> list[int]:
        if ndim < 2:
            raise ValueError(f"WeightSpec: a {ndim}-D tensor has no (out, in) layout")
        if max(self.out_axis, self.in_axis) >= ndim:
            raise ValueError(f"WeightSpec(out_axis={self.out_axis}, in_axis={self.in_axis}) does not fit a {ndim}-D tensor")
        rest = [d for d in range(ndim) if d not in (self.out_axis, self.in_axis)]
        return [self.out_axis, self.in_axis, *rest]

    def canonical(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` permuted to ``(out, in, *kernel)`` (a view; ``t`` itself when already so)."""
        return t if self.is_identity else t.permute(self._order(t.dim()))

    def from_canonical(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`canonical`: a ``(out, in, *kernel)`` tensor back in the stored layout."""
        if self.is_identity:
            return t
        order = self._order(t.dim())
        inverse = [order.index(d) for d in range(t.dim())]
        return t.permute(inverse)

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The 2-D ``(out, in * prod(kernel))`` view (a copy only when the layout needs one)."""
        c = self.canonical(t)
        return c.reshape(c.shape[0], -1)

    def from_matrix(self, m: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Inverse of :meth:`matrix` for a weight stored with ``shape``."""
        order = self._order(len(shape))
        canonical_shape = [shape[d] for d in order]
        return self.from_canonical(m.reshape(canonical_shape))

    def out_features(self, shape: Sequence[int]) -> int:
        """Number of output units of a weight stored with ``shape``."""
        return int(shape[self.out_axis])


DEFAULT_SPEC = WeightSpec()
_TRANSPOSED = WeightSpec(out_axis=1, in_axis=0)

Params = Union[Sequence[str], Mapping[str, WeightSpec]]
ParamSource = Union[Params, Callable[[nn.Module], Params]]

_REGISTRY: dict[type, ParamSource] = {}


def _normalise(params: Params, where: str) -> dict[str, WeightSpec]:
    if isinstance(params, Mapping):
        out = {}
        for name, spec in params.items():
            if not isinstance(name, str) or not isinstance(spec, WeightSpec):
                raise TypeError(f"{where}: a mapping must be {{parameter name: WeightSpec}}, got {name!r}: {spec!r}")
            out[name] = spec
        return out
    if isinstance(params, str) or not isinstance(params, Sequence):
        raise TypeError(f"{where}: params must be a list of parameter names or a callable module -> names "
                        f"(or a mapping {{name: WeightSpec}}), got {params!r}")
    if not all(isinstance(p, str) for p in params):
        raise TypeError(f"{where}: params must contain only strings, got {list(params)!r}")
    return {name: DEFAULT_SPEC for name in params}


def register_prunable(module_type: type, params: ParamSource) -> None:
    """Declare which parameters of ``module_type`` (and its subclasses) may be pruned, and their layout.

    Args:
        module_type: an ``nn.Module`` subclass.
        params: parameter names (laid out ``(out, in, *kernel)`` like ``nn.Linear``
            / ``nn.Conv2d``), a mapping ``{name: WeightSpec}`` for other layouts,
            or a function ``module -> names or mapping`` for layers whose
            parameters depend on configuration. An empty list marks a layer as
            known but never pruned (like normalisation layers).

    Example:
        >>> class Gate(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.kernel = nn.Parameter(torch.randn(4, 8))   # stored (in, out)
        >>> register_prunable(Gate, {"kernel": WeightSpec(out_axis=1, in_axis=0)})
        >>> weight_spec(Gate(), "kernel")
        WeightSpec(out_axis=1, in_axis=0)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_prunable: module_type must be an nn.Module subclass, got {module_type!r}")
    if callable(params) and not isinstance(params, Mapping):
        _REGISTRY[module_type] = params
        return
    _REGISTRY[module_type] = _normalise(params, "register_prunable")


def _lookup(module: nn.Module) -> dict[str, WeightSpec] | None:
    _register_known_libraries()
    for cls in type(module).__mro__:
        source = _REGISTRY.get(cls)
        if source is not None:
            params = source(module) if callable(source) and not isinstance(source, Mapping) else source
            return _normalise(params, f"prunable parameters of {type(module).__name__}")
    return None


def declared_specs(module: nn.Module) -> dict[str, WeightSpec] | None:
    """``{name: spec}`` declared for ``module``'s type (present or not), or ``None`` if the type is unknown."""
    return _lookup(module)


def prunable_parameter_names(module: nn.Module) -> list[str] | None:
    """Names of ``module``'s own prunable parameters, or ``None`` if its type is unknown.

    The most specific registered class in the module's MRO wins, so a
    registration for a subclass overrides the one for its base. A layer whose
    own parameters are all vectors (norm scales, biases, layer scales) is
    known and has none; so are position embeddings and class tokens.

    Example:
        >>> prunable_parameter_names(nn.Linear(2, 3))
        ['weight']
        >>> prunable_parameter_names(nn.LayerNorm(3))
        []
    """
    specs = _lookup(module)
    if specs is None:
        return [] if never_pruned_reason(module) is not None else None
    return [n for n in specs if isinstance(getattr(module, n, None), nn.Parameter)]


def weight_spec(module: nn.Module, param_name: str) -> WeightSpec | None:
    """The layout of ``module.<param_name>``, or ``None`` if it is not a prunable weight.

    Example:
        >>> weight_spec(nn.Conv2d(3, 8, 3), "weight")
        WeightSpec(out_axis=0, in_axis=1)
        >>> weight_spec(nn.ConvTranspose2d(3, 8, 3), "weight")
        WeightSpec(out_axis=1, in_axis=0)
        >>> weight_spec(nn.Linear(2, 3), "bias") is None
        True
    """
    specs = _lookup(module)
    if specs is None or param_name not in specs:
        return None
    return specs[param_name]


# Parameters that hold positions or special tokens, not input-output weights; pruning them
# zeroes whole positions or tokens. Matched on the parameter's own name.
_POSITION_PARAMS = ("cls_token", "mask_token", "dist_token", "distillation_token", "register_tokens",
                    "position_embeddings", "position_embedding", "pos_embed", "pos_embedding", "absolute_pos_embed")


# Embedding tables indexed by positions, not tokens (GPT-2's wpe, BERT/OPT's position embeddings, T5's
# relative attention bias): matched on the module's own name in its parent.
POSITION_MODULES = frozenset({"wpe", "position_embeddings", "embed_positions", "position_embedding",
                              "relative_attention_bias", "token_type_embeddings", "pos_embed", "pos_embedding"})


def never_pruned_reason(module: nn.Module) -> str | None:
    """Why an unregistered ``module`` is known and left dense, or ``None`` if it is simply unknown.

    Layers whose own parameters are all vectors (RMSNorm/LayerNorm variants of
    any library, layer scales) and parameters that hold positions or special
    tokens (ViT's ``position_embeddings`` and ``cls_token``) are never pruned.

    Example:
        >>> class RMSNorm(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(8))
        >>> never_pruned_reason(RMSNorm())
        'vector parameters only (normalisation / scale)'
    """
    own = list(module.named_parameters(recurse=False))
    if not own:
        return None
    if all(p.dim() <= 1 for _, p in own):
        return "vector parameters only (normalisation / scale)"
    if all(p.dim() <= 1 or n in _POSITION_PARAMS for n, p in own):
        return "position embeddings / special tokens"
    return None


def _rnn_weights(module: nn.Module) -> list[str]:
    return [n for n in module._flat_weights_names if n.startswith("weight_")]


def _mha_weights(module: nn.Module) -> list[str]:
    if module.in_proj_weight is not None:
        return ["in_proj_weight"]
    return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]


def _register_defaults() -> None:
    for cls in (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag):
        register_prunable(cls, ["weight"])
    # ConvTranspose weights are stored (in, out / groups, *kernel).
    for cls in (nn.modules.conv._ConvTransposeNd, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register_prunable(cls, {"weight": _TRANSPOSED})
    register_prunable(nn.modules.conv._ConvNd, ["weight"])  # other convolutions (lazy, quantized ports)
    register_prunable(nn.RNNBase, _rnn_weights)
    register_prunable(nn.RNNCellBase, ["weight_ih", "weight_hh"])
    register_prunable(nn.MultiheadAttention, _mha_weights)
    never = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.PReLU,
             parametrize.ParametrizationList)  # reported on the layer that owns the parametrization
    for cls in never:
        register_prunable(cls, [])


def _register_known_libraries() -> None:
    # Only libraries the user already imported can have produced their layers, so
    # looking in sys.modules never imports anything and costs a dict lookup.
    mod = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(mod, "Conv1D", None) if mod is not None else None
    if isinstance(conv1d, type) and conv1d not in _REGISTRY:
        register_prunable(conv1d, {"weight": _TRANSPOSED})  # stored (in, out): y = x @ W + b


_register_defaults()
