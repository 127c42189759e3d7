"""Sizes to compare against: dense fp32, gzip of fp32, and the entropy bound.

The bound for one tensor of ``n`` entries with ``k`` nonzeros whose values take
``b`` bits each is ``n·H(k/n) + k·b`` bits, ``H`` the binary entropy: the cost
of saying *where* the nonzeros are, if positions were random, plus storing the
values raw. A coder can beat it when positions are not random or values are
not uniform (entropy-coded int8 codes take ~7 bits, not 8).
"""

from __future__ import annotations

import gzip
import math
from typing import Any, Mapping

import safetensors.torch
import torch
from torch import nn

from .container import as_state_dict, encode_state, pack, tied_aliases
from .encoding import TensorSpec, parse_quantize
from .quantize import is_weight

__all__ = ["binary_entropy", "entropy_bound_bits", "spec_bound_bits", "fp32_bytes", "gzip_fp32_bytes", "size_summary"]


def binary_entropy(p: float) -> float:
    """``H(p) = -p·log2(p) - (1-p)·log2(1-p)``, with ``H(0) = H(1) = 0``."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def entropy_bound_bits(numel: int, nnz: int, value_bits: float) -> float:
    """``n·H(k/n) + k·value_bits``: bits to store a sparse tensor with random positions and raw values.

    Example:
        >>> round(entropy_bound_bits(1000, 100, 8) / 1000, 3)  # 90% sparse int8: bits per weight
        1.269
    """
    if numel == 0:
        return 0.0
    return numel * binary_entropy(nnz / numel) + nnz * value_bits


def spec_bound_bits(spec: TensorSpec) -> float:
    """The bound for a tensor as stored: ``bits`` per value when quantized, else the value dtype's width (0 for bool)."""
    if spec.bits is not None:
        width = spec.bits
    else:
        width = 0 if spec.values.name == "bool" else 8 * spec.values.itemsize
    return entropy_bound_bits(spec.numel, spec.nnz, width)


def fp32_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Raw bytes with every floating tensor as float32 (others at their own width)."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in state.values())


def gzip_fp32_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of ``gzip -9`` of the state as an fp32 safetensors file (the usual "just gzip it" baseline)."""
    fp32 = {k: (t.float() if t.is_floating_point() else t).detach().cpu().contiguous().clone() for k, t in state.items()}
    return len(gzip.compress(safetensors.torch.save(fp32), compresslevel=9, mtime=0))


def size_summary(obj: nn.Module | Mapping[str, torch.Tensor], quantize: str = "int8") -> dict[str, Any]:
    """Sizes of one model's weights, side by side.

    Returns:
        ``numel``, ``weight_sparsity`` (zeros among floating tensors with >= 2 dims),
        ``fp32_bytes``, ``gzip_fp32_bytes``, ``prunekit_bytes`` (lossless file),
        ``bound_bytes`` (its entropy bound), ``quantize``, ``prunekit_q_bytes``
        (file with ``quantize``) and ``bound_q_bytes``.

    Example:
        >>> s = size_summary(torch.nn.Linear(100, 100))
        >>> s["prunekit_q_bytes"] < s["prunekit_bytes"] < s["fp32_bytes"] + 300
        True
    """
    parse_quantize(quantize)
    state = as_state_dict(obj)
    aliases = tied_aliases(state)
    aliased = {alias for alias, _ in aliases}
    state = {k: v for k, v in state.items() if k not in aliased}  # tied weights count once, as they are stored
    weights = [t for t in state.values() if is_weight(t)]
    lossless, quantized = encode_state(state), encode_state(state, quantize)
    return {
        "numel": sum(t.numel() for t in state.values()),
        "weight_sparsity": sum(int((t == 0).sum()) for t in weights) / max(1, sum(t.numel() for t in weights)),
        "fp32_bytes": fp32_bytes(state),
        "gzip_fp32_bytes": gzip_fp32_bytes(state),
        "prunekit_bytes": len(pack(lossless, aliases=aliases)),
        "bound_bytes": sum(spec_bound_bits(e.spec) for e in lossless) / 8,
        "quantize": quantize,
        "prunekit_q_bytes": len(pack(quantized, aliases=aliases)),
        "bound_q_bytes": sum(spec_bound_bits(e.spec) for e in quantized) / 8,
    }
