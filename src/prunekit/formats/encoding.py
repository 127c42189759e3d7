"""Per-tensor encodings: how one tensor becomes a few byte streams, and back.

A tensor's values are first *represented* (exactly, as float16, or as int8
codes with per-channel scales, see :mod:`.quantize`), then laid out in one of
three encodings, each stream compressed by :mod:`.codecs`:

* ``dense``:   ``data`` (every value);
* ``bitmask``: ``mask`` (one bit per entry, LSB first) + ``values`` (the nonzeros);
* ``gaps``:    ``gaps`` (zero-run lengths before each nonzero, one byte each, 255
  meaning "255 more zeros, continue") + ``values``.

Quantized tensors add a ``scales`` stream first; bool tensors need no ``values``.
The writer measures every encoding and keeps the smallest. "Zero" means an
all-zero bit pattern, so ``-0.0`` and NaN survive and round trips are bit-exact.
"""

from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import codecs
from .dtypes import DType, by_torch, nonzero_mask, to_numpy
from .quantize import is_weight, quantize_int8

__all__ = ["ENCODINGS", "ESCAPE", "SAMPLE", "Stream", "TensorSpec", "Encoded", "encode", "stream_roles",
           "raw_size_bounds", "parse_quantize", "checksum", "checksum_head"]

ENCODINGS = ("dense", "bitmask", "gaps")
SAMPLE = 1 << 18  # entries; larger tensors choose their encoding on a slice of this size
_LITTLE = sys.byteorder == "little"
ESCAPE = 255  # a gap byte of 255 means "255 zeros, and the run continues"


@dataclass(frozen=True)
class Stream:
    """One byte stream of a tensor: its role, codec, decoded size and stored bytes."""

    role: str
    codec: str
    raw_size: int
    stored: bytes


class TensorSpec(NamedTuple):
    """Everything the manifest says about one tensor (already validated); a tuple, cheap to build by the 10⁵.

    Attributes:
        name: the state_dict key.
        dtype: dtype of the restored tensor.
        shape: its shape.
        nnz: entries with a nonzero stored value.
        encoding: one of :data:`ENCODINGS`.
        values: dtype of the stored values (``int8`` when quantized).
        bits: quantization bit width, or ``None`` when values are stored as floats/exact.
        crc32: checksum of the restored tensor (see :func:`checksum`).
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    nnz: int
    encoding: str
    values: DType
    bits: int | None
    crc32: int

    @property
    def numel(self) -> int:
        """Number of entries."""
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Length of axis 0 (number of per-channel scales when quantized)."""
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True)
class Encoded:
    """The writer's result for one tensor: its spec, its streams and the tensor a reader will restore."""

    spec: TensorSpec
    streams: tuple[Stream, ...]
    restored: torch.Tensor

    @property
    def stored_size(self) -> int:
        """Bytes the streams take in the file."""
        return sum(len(s.stored) for s in self.streams)


def parse_quantize(quantize: str | None) -> tuple[str | None, int | None]:
    """``None`` | ``"fp16"`` | ``"int8"`` ... ``"int2"`` -> ``(kind, bits)``.

    Example:
        >>> parse_quantize("int6")
        ('int', 6)
    """
    if quantize is None:
        return None, None
    if quantize == "fp16":
        return "fp16", None
    if isinstance(quantize, str) and quantize.startswith("int") and quantize[3:] in {str(b) for b in range(2, 9)}:
        return "int", int(quantize[3:])
    raise ValueError(f"quantize must be None, 'fp16' or 'int8' (or 'int2'..'int7' for coarser grids), got {quantize!r}")


def stream_roles(encoding: str, values: DType, quantized: bool) -> tuple[str, ...]:
    """The streams an encoding has, in file order."""
    return _ROLES[encoding, values.name == "bool", quantized]


def _roles(encoding: str, is_bool: bool, quantized: bool) -> tuple[str, ...]:
    body = {"dense": ("data",), "bitmask": ("mask", "values"), "gaps": ("gaps", "values")}[encoding]
    if is_bool and encoding != "dense":
        body = body[:1]  # every kept entry is True: positions say it all
    return (("scales",) if quantized else ()) + body


_ROLES = {(e, b, q): _roles(e, b, q) for e in ENCODINGS for b in (False, True) for q in (False, True)}


def raw_size_bounds(role: str, spec: TensorSpec) -> tuple[int, int]:
    """Inclusive bounds on a stream's decoded size, from the manifest alone.

    Checked before anything is decompressed, so no stream can claim more memory
    than its tensor needs.
    """
    if role == "data":
        size = math.prod(spec.shape) * spec.values.numpy.itemsize
    elif role == "values":
        size = spec.nnz * spec.values.numpy.itemsize
    elif role == "mask":
        size = (math.prod(spec.shape) + 7) // 8
    elif role == "scales":
        size = 2 * spec.rows
    else:  # gaps: one terminating byte per nonzero, plus one escape per 255 zeros at most.
        return spec.nnz, spec.nnz + (math.prod(spec.shape) - spec.nnz) // ESCAPE
    return size, size


def checksum_head(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """The CRC-32 of a tensor's name, dtype name and shape, which :func:`checksum` continues over its bytes."""
    return zlib.crc32(f"{name}\0{dtype}\0{list(shape)}".encode("utf-8", "surrogatepass"))


def checksum(name: str, tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's little-endian bytes, chained over its name, dtype and shape.

    Covering the name and shape means a manifest that swaps or reshapes tensors
    fails the check. On a little-endian host a contiguous tensor is checked in
    place (no copy); otherwise one block at a time.

    Example:
        >>> checksum("w", torch.zeros(3)) == checksum("w", torch.zeros(3, 1).reshape(3))
        True
    """
    crc = checksum_head(name, by_torch(tensor.dtype).name, tuple(tensor.shape))
    flat = tensor.detach().cpu().resolve_neg().contiguous().reshape(-1)
    if _LITTLE:
        return zlib.crc32(flat.view(torch.uint8).numpy(), crc)
    for start in range(0, flat.numel(), SAMPLE):
        crc = zlib.crc32(to_numpy(flat[start:start + SAMPLE]), crc)
    return crc


# -- writing ---------------------------------------------------------------------------------


def encode(name: str, tensor: torch.Tensor, quantize: str | None = None) -> Encoded:
    """Encode one tensor with the smallest of the encodings.

    Args:
        name: its state_dict key.
        tensor: any tensor of a supported dtype (see :mod:`.dtypes`).
        quantize: as in :func:`parse_quantize`; applies only to floating tensors with >= 2 dims.

    Example:
        >>> w = torch.zeros(100, 100); w[0, :5] = 1.0
        >>> encode("w", w).spec.encoding
        'gaps'
    """
    dtype = by_torch(tensor.dtype)
    values, bits, scales, restored = _represent(tensor, quantize)
    vdt = by_torch(values.dtype)
    flat = to_numpy(values)
    mask = nonzero_mask(flat)
    encoding, streams = _smallest(flat, mask, vdt)
    head = [_stream("scales", scales, 2)] if scales is not None else []
    spec = TensorSpec(name, dtype, tuple(tensor.shape), int(mask.sum()), encoding, vdt, bits, checksum(name, restored))
    return Encoded(spec, tuple(head + streams), restored)


def _smallest(flat: np.ndarray, mask: np.ndarray, vdt: DType) -> tuple[str, list[Stream]]:
    """The encoding whose compressed streams are smallest, and those streams.

    Every candidate is compressed for real, since how well LZMA does is what
    counts. Above :data:`SAMPLE` entries, candidates are measured on a
    contiguous middle slice and only the winner is compressed in full: the
    slice has the tensor's statistics, at a fraction of the cost.
    """
    if flat.size <= SAMPLE:
        return min(((enc, _compressed(layout, vdt)) for enc, layout in _layouts(flat, mask, vdt)),
                   key=lambda c: sum(len(st.stored) for st in c[1]))
    start = (flat.size - SAMPLE) // 2
    part, part_mask = flat[start:start + SAMPLE], mask[start:start + SAMPLE]
    sizes = {enc: sum(len(st.stored) for st in _compressed(layout, vdt))
             for enc, layout in _layouts(part, part_mask, vdt)}
    best = min(sizes, key=sizes.get)
    layout = dict(_layouts(flat, mask, vdt, only=best))[best]
    return best, _compressed(layout, vdt)


def _compressed(layout: list[tuple[str, bytes]], vdt: DType) -> list[Stream]:
    return [_stream(role, data, vdt.itemsize if role in ("data", "values") else 1) for role, data in layout]


def _represent(tensor: torch.Tensor, quantize: str | None) -> tuple[torch.Tensor, int | None, bytes | None, torch.Tensor]:
    """(values to store, bits, scale bytes or None, tensor a reader restores)."""
    kind, bits = parse_quantize(quantize)
    tensor = tensor.detach().cpu().resolve_neg()  # a lazily negated view: store what it means
    if kind is None or not is_weight(tensor) or tensor.numel() == 0:
        return tensor, None, None, tensor
    if kind == "fp16":
        if tensor.dtype not in (torch.float32, torch.float64):
            return tensor, None, None, tensor
        half = tensor.to(torch.float16)
        if not torch.equal(torch.isfinite(half), torch.isfinite(tensor)):
            raise ValueError("quantize='fp16': values exceed the float16 range")
        return half, None, None, half.to(tensor.dtype)
    qt = quantize_int8(tensor, bits)
    scale_bits = to_numpy(qt.scale.to(torch.bfloat16)).tobytes()
    return qt.q, bits, scale_bits, qt.dequantize()


def _layouts(flat: np.ndarray, mask: np.ndarray, vdt: DType, only: str | None = None):
    """Yield ``(encoding, [(role, raw bytes)])`` for every encoding worth measuring (or just ``only``)."""
    if only in (None, "dense"):
        yield "dense", [("data", flat.tobytes())]
    nnz = int(mask.sum())
    if flat.size == 0 or nnz == flat.size or only == "dense":
        return  # nothing to skip: a sparse layout only adds positions
    values = [] if vdt.name == "bool" else [("values", flat[mask].tobytes())]
    if only in (None, "bitmask"):
        yield "bitmask", [("mask", np.packbits(mask, bitorder="little").tobytes())] + values
    if only in (None, "gaps"):
        yield "gaps", [("gaps", _gap_bytes(np.flatnonzero(mask)))] + values


def _stream(role: str, data: bytes, itemsize: int) -> Stream:
    codec, stored = codecs.compress(data, itemsize)
    return Stream(role, codec, len(data), stored)


def _gap_bytes(positions: np.ndarray) -> bytes:
    gaps = np.diff(positions, prepend=-1) - 1
    runs = gaps // ESCAPE + 1  # bytes per gap: the escapes, then the remainder
    out = np.full(int(runs.sum()), ESCAPE, dtype=np.uint8)
    out[np.cumsum(runs) - 1] = gaps % ESCAPE
    return out.tobytes()
