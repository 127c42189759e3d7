"""The dtypes a prunekit file may hold, and conversions between tensors and little-endian bytes.

Every conversion goes through numpy with explicit little-endian dtypes, so files
are the same on any host. ``bfloat16`` has no numpy type: its bits travel as ``<u2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DType", "DTYPES", "by_name", "by_torch", "to_numpy", "to_torch", "nonzero_mask"]


@dataclass(frozen=True)
class DType:
    """One allowed dtype.

    Attributes:
        name: the name written in manifests (``"float32"``).
        torch: the torch dtype.
        numpy: the numpy dtype holding its bits, little-endian.
        bits: unsigned integer dtype of the same width, to test bit patterns for zero.
    """

    name: str
    torch: torch.dtype
    numpy: np.dtype
    bits: np.dtype

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.numpy.itemsize

    @property
    def is_floating(self) -> bool:
        """Whether this is a floating-point dtype."""
        return self.torch.is_floating_point


def _dt(name: str, tdtype: torch.dtype, np_code: str, bits_code: str) -> DType:
    return DType(name, tdtype, np.dtype(np_code), np.dtype(bits_code))


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _dt("float64", torch.float64, "<f8", "<u8"),
        _dt("float32", torch.float32, "<f4", "<u4"),
        _dt("float16", torch.float16, "<f2", "<u2"),
        _dt("bfloat16", torch.bfloat16, "<u2", "<u2"),
        _dt("int64", torch.int64, "<i8", "<u8"),
        _dt("int32", torch.int32, "<i4", "<u4"),
        _dt("int16", torch.int16, "<i2", "<u2"),
        _dt("int8", torch.int8, "i1", "u1"),
        _dt("uint8", torch.uint8, "u1", "u1"),
        _dt("bool", torch.bool, "?", "u1"),
    )
}
_BY_TORCH = {d.torch: d for d in DTYPES.values()}


def by_name(name: str) -> DType:
    """The allowed dtype called ``name``; ``KeyError`` if there is none."""
    return DTYPES[name]


def by_torch(dtype: torch.dtype) -> DType:
    """The allowed dtype for a torch dtype.

    Raises:
        ValueError: the dtype cannot be stored (complex, float8, ...).
    """
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        allowed = ", ".join(DTYPES)
        raise ValueError(f"dtype {dtype} cannot be stored; supported: {allowed}") from None


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A flat little-endian numpy copy of ``tensor`` in its :class:`DType`'s numpy dtype.

    Example:
        >>> to_numpy(torch.tensor([1.0, 2.0])).dtype
        dtype('float32')
    """
    dt = by_torch(tensor.dtype)
    flat = tensor.detach().cpu().resolve_neg().contiguous().reshape(-1)  # a negative-bit view holds -values
    if dt.name == "bfloat16":
        flat = flat.view(torch.int16)  # same bits, a dtype numpy understands
    return flat.numpy().view(dt.numpy.newbyteorder("=")).astype(dt.numpy, copy=True)


def to_torch(array: np.ndarray, dt: DType, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of dtype ``dt`` and ``shape`` whose flat little-endian data is ``array``."""
    native = np.ascontiguousarray(array.astype(dt.numpy.newbyteorder("="), copy=False))
    if dt.name == "bfloat16":
        return torch.from_numpy(native.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(native.copy()).reshape(shape)


def nonzero_mask(values: np.ndarray) -> np.ndarray:
    """Entries whose bit pattern is not all zeros (so ``-0.0`` and NaN count as nonzero).

    Testing bits, not ``!= 0``, keeps every round trip bit-exact.
    """
    width = values.dtype.itemsize
    return values.view(np.dtype(f"u{width}") if width > 1 else np.uint8) != 0
