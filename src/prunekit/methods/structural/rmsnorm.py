"""RMS-type norms: the one kind of normalization a channel can be removed from without changing the function.

An RMS norm computes ``y = s(w) * x / sqrt(mean(x^2) + eps)`` over the last dim
(``s(w) = w`` for Llama, Qwen2, Mistral, T5 and ``torch.nn.RMSNorm``;
``s(w) = 1 + w`` for Gemma). With ``d`` of its ``D`` channels kept and the
others zero (the masked model: every producer of a removed channel is zeroed),
``mean(x^2)`` over ``D`` is ``sum_kept(x^2) / D``, and at the smaller width it
is ``sum_kept(x^2) / d``. The two agree exactly when the pruned norm uses

* ``eps' = eps * D / d`` (then ``sum/d + eps' = (D/d) * (sum/D + eps)``), and
* ``s(w') = s(w) * sqrt(D / d)`` (to cancel the ``sqrt(D/d)`` that appears),

so ``w' = w * sqrt(D/d)``, or ``w' = (1 + w) * sqrt(D/d) - 1`` for Gemma. A
mean-centering LayerNorm has no such rewrite (the mean over the zeros differs),
so its channels stay frozen.

Norms are recognised by what they compute, not by their class name: a module
with one 1-D ``weight`` and a float ``variance_epsilon``/``eps``/``epsilon``
attribute whose output matches the formula on a random input, for two values of
that attribute (so its ``forward`` really reads it). These norms are followed
only when hidden-size pruning is asked for (``build_graph(..., hidden=True)``);
otherwise their statistics freeze the channels as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .flow import Flow
from .graph import Context
from .layers import slice_inplace
from .registry import Keep, Surgery, find_surgery

__all__ = ["RMSNormInfo", "rms_norm_info", "rms_surgery", "rescale_rms"]

_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


@dataclass(frozen=True)
class RMSNormInfo:
    """How one RMS norm reads its parameters: the eps attribute and the weight offset (0, or 1 for ``1 + w``)."""

    eps_attr: str
    offset: float


def _candidate(module: nn.Module) -> tuple[str, torch.Tensor] | None:
    """``(eps attribute, weight)`` of a module shaped like an RMS norm, else ``None``."""
    if find_surgery(type(module)) is not None or next(module.children(), None) is not None:
        return None
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if set(params) != {"weight"} or weight.ndim != 1 or not weight.is_floating_point() or weight.numel() < 2:
        return None
    for attr in _EPS_ATTRS:
        value = getattr(module, attr, "missing")
        if value is None or (isinstance(value, float) and not isinstance(value, bool)):
            return attr, weight
    return None


def _eps_value(module: nn.Module, info: RMSNormInfo, dtype: torch.dtype) -> float:
    value = getattr(module, info.eps_attr)
    return torch.finfo(dtype).eps if value is None else float(value)  # torch.nn.RMSNorm: None = machine eps


@torch.no_grad()
def _matches(module: nn.Module, info: RMSNormInfo, weight: torch.Tensor, x: torch.Tensor) -> bool:
    y = module(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return False
    x64 = x.double()
    eps = _eps_value(module, info, x.dtype)
    ref = (weight.double() + info.offset) * x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps)
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    return bool(((y.double() - ref).abs() <= tol * (1 + ref.abs())).all())


@torch.no_grad()
def rms_norm_info(module: nn.Module) -> RMSNormInfo | None:
    """How ``module`` normalizes if it is an RMS norm over its last dim, else ``None`` (probed, then restored).

    Example:
        >>> rms_norm_info(torch.nn.RMSNorm(8, eps=1e-6))
        RMSNormInfo(eps_attr='eps', offset=0.0)
        >>> rms_norm_info(torch.nn.LayerNorm(8)) is None
        True
    """
    found = _candidate(module)
    if found is None:
        return None
    attr, weight = found
    saved_weight, saved_eps, was_training = weight.detach().clone(), getattr(module, attr), module.training
    generator = torch.Generator().manual_seed(0)
    try:
        module.eval()
        weight.copy_(torch.randn(weight.shape, generator=generator).to(weight))  # any scale: w vs 1 + w differ
        x = (torch.randn((2, 3, weight.numel()), generator=generator) * 0.5).to(weight)
        for offset in (0.0, 1.0):
            info = RMSNormInfo(attr, offset)
            setattr(module, attr, 1e-6 if saved_eps is None else saved_eps)
            if not _matches(module, info, weight, x):
                continue
            setattr(module, attr, 0.5)  # comparable to mean(x^2): proves forward reads the attribute
            if _matches(module, info, weight, x):
                return info
    except Exception:  # a module that cannot run on a plain tensor is not a norm we know
        return None
    finally:
        weight.copy_(saved_weight)
        setattr(module, attr, saved_eps)
        module.train(was_training)
    return None


def couple_rms(module: nn.Module, ctx: Context, x: Flow, *rest: Any, info: RMSNormInfo, **kwargs: Any) -> Flow:
    """Channels on the normalized (last) dim pass through with the weight; others pass untouched."""
    if not isinstance(x, Flow) or not x.tracked:
        return ctx.untracked()
    if tuple(ctx.value.shape) != x.shape:
        ctx.fail(f"changes the shape {x.shape} -> {tuple(ctx.value.shape)}")
    if x.dim == len(x.shape) - 1:
        ctx.member("weight", 0, x.atoms)
    return Flow(x.shape, x.dim, x.atoms)  # per-head q/k norms: heads on another dim just pass


def rescale_rms(module: nn.Module, info: RMSNormInfo, old: int, new: int, weights: bool = True) -> None:
    """Make ``module`` (already cut from ``old`` to ``new`` channels) compute what the masked norm computed.

    ``eps`` becomes ``eps * old / new``; with ``weights``, ``s(w)`` is multiplied by
    ``sqrt(old / new)`` (computed in float64, then stored in the weight's dtype).
    """
    if new == old:
        return
    ratio = old / new
    weight = module.weight
    setattr(module, info.eps_attr, _eps_value(module, info, weight.dtype) * ratio)
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple) and len(shape) == 1:
        module.normalized_shape = (new,)
    if weights:
        with torch.no_grad():
            scaled = (weight.double() + info.offset) * math.sqrt(ratio) - info.offset
            weight.copy_(scaled.to(weight.dtype))


def rebuild_rms(module: nn.Module, keep: Keep, info: RMSNormInfo) -> nn.Module:
    """Cut the weight in place, then rescale ``eps`` and the weight (see the module docstring)."""
    old = module.weight.shape[0]
    slice_inplace(module, keep)
    rescale_rms(module, info, old, module.weight.shape[0])
    return module


def rms_surgery(info: RMSNormInfo) -> Surgery:
    """The surgery of one RMS norm (its eps attribute and weight offset bound in)."""
    return Surgery(partial(couple_rms, info=info), partial(rebuild_rms, info=info))
