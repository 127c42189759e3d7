"""Symmetric per-output-channel integer quantization that keeps zeros exactly zero.

For a weight ``w`` of shape ``(C, ...)`` each output channel ``c`` (row along
axis 0) gets a scale ``s_c = max|w_c| / qmax`` with ``qmax = 2**(bits-1) - 1``,
and ``q = round(w / s_c)`` in ``[-qmax, qmax]``. No zero point, so ``0`` maps to
``0`` and back: pruned weights stay pruned. Scales are stored as bfloat16,
rounded *up*, and quantization uses the stored scale itself, so the error
bound ``|w - q*s_c| <= s_c / 2`` holds exactly for what the file restores.
``bits`` below 8 keeps the int8 container but uses fewer levels, which the
entropy coder turns into fewer bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from .._validate import check_int

__all__ = ["QuantizedTensor", "quantize_int8", "dequantize", "is_weight", "bf16_round_up"]


@dataclass(frozen=True)
class QuantizedTensor:
    """An integer-quantized tensor.

    Attributes:
        q: int8 codes, same shape as the original.
        scale: float32 scales, one per row along axis 0 (each exactly representable in bfloat16).
        bits: bit width of the grid (codes lie in ``[-(2**(bits-1)-1), 2**(bits-1)-1]``).
        dtype: the original floating dtype, restored by :meth:`dequantize`.
    """

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """The float tensor these codes stand for, in the original dtype."""
        return dequantize(self.q, self.scale, self.dtype)


def is_weight(tensor: torch.Tensor) -> bool:
    """Whether quantization applies: a floating tensor with at least 2 dims (biases and norms stay exact)."""
    return tensor.is_floating_point() and tensor.ndim >= 2


def bf16_round_up(scale: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 values up to the next bfloat16 value (returned as float32)."""
    bits = scale.float().contiguous().view(torch.int32)
    low = bits & 0xFFFF
    bits = (bits - low) + (low != 0).to(torch.int32) * 0x10000
    return bits.view(torch.float32)


def quantize_int8(weight: torch.Tensor, bits: int = 8) -> QuantizedTensor:
    """Quantize ``weight`` per output channel (axis 0), symmetric, zeros exact.

    Args:
        weight: a floating tensor with at least one dim (rows along axis 0).
        bits: 2..8; the grid has ``2**bits - 1`` levels.

    Returns:
        The codes and scales; ``|weight - result.dequantize()| <= scale/2`` per row.

    Raises:
        ValueError: ``weight`` is not floating, has no dims, or holds NaN/Inf.

    Example:
        >>> w = torch.tensor([[0.0, 1.0, -0.5]])
        >>> qt = quantize_int8(w)
        >>> qt.q.tolist(), bool(((w - qt.dequantize()).abs() <= qt.scale / 2).all())
        ([[0, 126, -63]], True)
    """
    bits = check_int("quantize_int8", "bits", bits, minimum=2)
    if bits > 8:
        raise ValueError(f"quantize_int8: bits must be in 2..8, got {bits}")
    if not weight.is_floating_point() or weight.ndim < 1:
        raise ValueError(f"quantize_int8: weight must be a floating tensor with >= 1 dim, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    work = weight.detach().cpu().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(work).all():
        raise ValueError("quantize_int8: weight contains NaN or Inf")
    qmax = 2 ** (bits - 1) - 1
    rows = _rows(work)
    peak = rows.abs().amax(dim=1) if rows.numel() else torch.zeros(rows.shape[0], dtype=work.dtype)
    scale = bf16_round_up(peak.float() / qmax)
    if not torch.isfinite(scale).all():
        raise ValueError("quantize_int8: weight magnitudes are too large for a bfloat16 scale")
    safe = torch.where(scale > 0, scale, 1.0).to(work.dtype)
    q = torch.round(rows / safe[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return QuantizedTensor(q.reshape(weight.shape), scale, bits, weight.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` per row along axis 0, cast to ``dtype``.

    The products are exact in float32 (7-bit codes times 8-bit bfloat16
    mantissas), so writer and reader compute identical bits.

    Example:
        >>> dequantize(torch.tensor([[2, -1], [0, 4]], dtype=torch.int8), torch.tensor([0.5, 0.25]), torch.float32)
        tensor([[ 1.0000, -0.5000],
                [ 0.0000,  1.0000]])
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    rows = _rows(q).to(work) * scale.to(work)[:, None]
    return rows.reshape(q.shape).to(dtype)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    # Explicit width: reshape(C, -1) fails for tensors with no elements.
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
