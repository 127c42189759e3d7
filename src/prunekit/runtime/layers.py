"""Which layers :func:`prunekit.accelerate` can replace, and how each one's ``forward`` is reproduced.

Layers are found by ``isinstance`` and by their layer spec
(:func:`prunekit.core.layerspec.weight_spec`), never by exact type:

- every ``nn.Linear`` subclass, and any registered layer with a 2-D weight laid
  out ``(out, in)``: ``y = x @ W.T + b``;
- transformers' ``Conv1D`` and any registered layer with a 2-D weight laid out
  ``(in, out)``: ``y = x @ W + b`` (the sparse module holds the transposed view);
- every ``nn.Conv2d`` subclass (see :func:`~prunekit.runtime.conv.conv_padding` for
  subclasses that pad in their own ``forward``).

A layer whose class keeps the base ``forward`` is reproduced by construction. A
class with its own ``forward`` is run on probe inputs (the layer's captured input
and random ones of other shapes) and replaced only where it equals the base
computation on all of them; otherwise it stays dense and the report says why.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layerspec import weight_spec
from .conv import PrePad, SparseConv2d, conv_padding, conv_supported, outputs_match
from .modules import SparseLinear

__all__ = ["LayerPlan", "build_sparse", "layer_plan", "runtime_layers", "static_reason", "weight_matrix"]


@dataclass(frozen=True)
class LayerPlan:
    """How the sparse module reproduces a layer.

    Attributes:
        kind: ``"linear"`` (``x @ W.T + b``), ``"transposed"`` (``x @ W + b``, weight stored ``(in, out)``)
            or ``"conv2d"``.
        pre_pad: for ``"conv2d"``, the padding the layer's forward applies first (see
            :class:`~prunekit.runtime.SparseConv2d`).
    """

    kind: str
    pre_pad: PrePad = None


def _conv1d_class() -> type | None:
    # Only an imported transformers can have built Conv1D layers; never import it here.
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"transposed"``, ``"conv2d"`` or ``None`` (not a layer the runtime replaces)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or hasattr(module, "parametrizations"):
        return None
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd)) or weight.dim() != 2:
        return None
    conv1d = _conv1d_class()
    spec = weight_spec(module, "weight")
    if (conv1d is not None and isinstance(module, conv1d)) or (spec is not None and spec.out_axis == 1
                                                               and spec.in_axis == 0):
        return "transposed"
    return "linear" if spec is not None and spec.is_identity else None


def runtime_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every distinct layer the runtime may replace (with a plain weight parameter), in model order.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.Embedding(5, 2))
        >>> [name for name, _ in runtime_layers(net)]
        ['0', '2']
    """
    return [(name or "(model)", m) for name, m in model.named_modules() if _kind(m) is not None]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the ``(out, in * kernel)`` matrix the sparse formats store (detached).

    Example:
        >>> tuple(weight_matrix(nn.Conv2d(3, 8, 3)).shape)
        (8, 27)
    """
    weight = module.weight.detach()
    if _kind(module) == "transposed":
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def _static_reason(module: nn.Module, kind: str) -> str | None:
    """Why the layer can never be replaced, judged without running it (``None``: it may be)."""
    if kind == "conv2d":
        spec = weight_spec(module, "weight")
        if spec is not None and not spec.is_identity:
            return f"weight registered with {spec} (nn.Conv2d weights are (out, in, kh, kw))"
        return conv_supported(module)
    bias = getattr(module, "bias", None)
    out = weight_matrix(module).shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out,)):
        return f"bias of shape {tuple(getattr(bias, 'shape', ()))} (expected ({out},) or None)"
    return None


def _base_forward(module: nn.Module, kind: str) -> bool:
    """Whether the class runs its base class's forward unchanged."""
    cls = type(module)
    if kind == "linear":
        return cls.forward is nn.Linear.forward
    conv1d = _conv1d_class()
    return conv1d is not None and cls.forward is conv1d.forward


def _linear_reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight_matrix(module), getattr(module, "bias", None))


def _linear_probes(module: nn.Module, x: torch.Tensor | None) -> list[torch.Tensor]:
    w = module.weight
    n_in = weight_matrix(module).shape[1]
    g = torch.Generator().manual_seed(0)
    probes = [torch.randn(2, 3, n_in, generator=g).to(w.dtype).to(w.device),
              torch.randn(5, n_in, generator=g).to(w.dtype).to(w.device)]
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == n_in:
        probes.insert(0, x.detach())
    return probes


def _linear_plan(module: nn.Module, kind: str, x: torch.Tensor | None) -> tuple[LayerPlan | None, str | None]:
    plan = LayerPlan(kind)
    if _base_forward(module, kind):
        return plan, None
    name = type(module).__name__
    base = "nn.Linear.forward" if kind == "linear" else "x @ weight + bias"
    try:
        with torch.no_grad():
            pairs = [(module(p), _linear_reference(module, p)) for p in _linear_probes(module, x)]
    except Exception as exc:  # a forward that fails on a probe cannot be checked: keep it dense
        return None, (f"{name}.forward differs from {base} and fails on a probe input "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})")
    if all(outputs_match(out, ref) for out, ref in pairs):
        return plan, None
    return None, f"{name}.forward differs from {base} on probe inputs"


def layer_plan(module: nn.Module, x: torch.Tensor | None = None) -> tuple[LayerPlan | None, str | None]:
    """How to reproduce ``module``: ``(plan, None)``, or ``(None, why it must stay dense)``.

    ``x`` is an input the layer received (one of the probes when the class has its own forward).

    Example:
        >>> layer_plan(nn.Linear(4, 2))
        (LayerPlan(kind='linear', pre_pad=None), None)
        >>> class Scaled(nn.Linear):
        ...     def forward(self, x):
        ...         return 0.5 * super().forward(x)
        >>> layer_plan(Scaled(4, 2))
        (None, 'Scaled.forward differs from nn.Linear.forward on probe inputs')
    """
    kind = _kind(module)
    if kind is None:
        return None, f"{type(module).__name__} is not a layer the runtime replaces"
    why = _static_reason(module, kind)
    if why is not None:
        return None, why
    if kind == "conv2d":
        pre_pad, why = conv_padding(module, x)
        return (None, why) if why is not None else (LayerPlan(kind, pre_pad), None)
    return _linear_plan(module, kind, x)


def static_reason(module: nn.Module) -> str | None:
    """Why ``module`` can never be replaced, judged without running it, or ``None``."""
    kind = _kind(module)
    if kind is None:
        return f"{type(module).__name__} is not a layer the runtime replaces"
    return _static_reason(module, kind)


def build_sparse(module: nn.Module, plan: LayerPlan, fmt: str, blocksize: int | None = None,
                 pattern: tuple[int, int] | None = None) -> nn.Module:
    """The sparse module that computes what ``module`` does, as :func:`layer_plan` found it.

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> type(build_sparse(lin, layer_plan(lin)[0], "csr")).__name__
        'SparseLinear'
    """
    if plan.kind == "conv2d":
        return SparseConv2d(module, fmt, blocksize, pattern, pre_pad=plan.pre_pad)
    if plan.kind == "transposed":
        return SparseLinear.from_conv1d(module, fmt, blocksize, pattern)
    if isinstance(module, nn.Linear):
        return SparseLinear.from_linear(module, fmt, blocksize, pattern)
    return SparseLinear(weight_matrix(module), getattr(module, "bias", None), fmt, blocksize, pattern)
