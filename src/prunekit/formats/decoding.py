"""Rebuilding one tensor from its streams, block by block, in memory bounded by the tensor itself.

The restored tensor is allocated once, at its final dtype and size (sparse
layouts start from ``torch.zeros``, whose pages the kernel maps lazily), and the
streams are read forward in blocks of :data:`BLOCK` entries: dense data is
decoded straight into the tensor's bytes, sparse positions are expanded one
block of the bitmask or gap stream at a time, their values read alongside,
int8 codes are dequantized per block with the scales of just the rows they
touch. Every data-dependent invariant (nonzero counts, positions in range,
codes within their grid, finite scales, bools that are 0 or 1, the CRC-32) is
checked on the way. What decoding needs besides the restored tensor is a
constant: a few blocks of indices and values, about 16 MiB whatever the
tensor's size, and the stream decoders' own buffers (see :mod:`.codecs`).
"""

from __future__ import annotations

import sys
import zlib
from typing import Iterator, Mapping

import numpy as np
import torch

from .codecs import BytesSource, StreamReader
from .dtypes import DType
from .encoding import ESCAPE, TensorSpec, checksum, checksum_head
from .errors import FormatError
from .names import show

__all__ = ["BLOCK", "TINY", "TINY_SPARSE", "allocate", "decode", "decode_streams", "decode_tiny", "out_of_memory"]

BLOCK = 1 << 16  # entries per block (read at call time, so tests can make it small)
TINY = 1 << 12  # restored bytes: a tensor this small is rebuilt in one go (most tensors of a model, by count)
TINY_SPARSE = 256  # entries: a sparse layout this small has its positions expanded in plain Python
_LITTLE = sys.byteorder == "little"
_SCALE_ROWS = 1 << 16  # quantization scales held at a time


def decode(spec: TensorSpec, raw: Mapping[str, bytes]) -> torch.Tensor:
    """Rebuild a tensor from its decoded streams, checking every data-dependent invariant.

    A convenience over :func:`decode_streams`, which reads the streams from
    the file piece by piece instead.

    Args:
        spec: the tensor's validated manifest entry.
        raw: decoded streams by role, each already of its declared size.

    Raises:
        FormatError: positions, counts, codes or scales that contradict the manifest,
            or a checksum mismatch.
    """
    streams = {role: StreamReader("none", BytesSource(data), 0, len(data), len(data), f"tensor '{role}'")
               for role, data in raw.items()}
    return decode_streams(spec, streams)


def decode_streams(spec: TensorSpec, streams: Mapping[str, StreamReader]) -> torch.Tensor:
    """Rebuild the tensor ``spec`` describes from its open streams (by role), and close them.

    Raises:
        FormatError: positions, counts, codes or scales that contradict the manifest,
            streams of the wrong length, or a checksum mismatch.
    """
    values = _Values(spec, streams)
    if spec.encoding == "dense":
        out = allocate(spec.numel, spec.dtype.torch, zeroed=False)
        if values.exact:
            _dense_exact(spec, streams["data"], out)
        else:
            _dense_converted(spec, streams["data"], values, out)
    else:
        out = allocate(spec.numel, spec.dtype.torch, zeroed=True)
        _sparse(spec, streams, values, out)
    values.finish()
    for reader in streams.values():
        reader.close()
    tensor = out.reshape(spec.shape)
    if checksum(spec.name, tensor) != spec.crc32:
        raise _error(spec, "checksum mismatch (the file is corrupt or its manifest was altered)")
    return tensor


def decode_tiny(spec: TensorSpec, raws: Mapping[str, bytes | memoryview]) -> torch.Tensor:
    """A small tensor stored exactly (values in its own dtype), from its whole decoded streams.

    The few steps a bias, a counter or a tiny mask needs: the restored
    little-endian bytes are assembled in a ``bytearray`` (positions expanded in
    plain Python, cheaper than numpy at this size), checked against the CRC-32
    before a tensor exists, and the tensor is one copy of them. For
    ``spec.numel * itemsize <= TINY`` (and, for sparse layouts, ``numel <= TINY_SPARSE``).
    """
    dt = spec.dtype
    if spec.encoding == "dense":
        restored = raws["data"]
        found = _count_nonzero(restored, dt)
        if found != spec.nnz:
            raise _error(spec, f"{found} nonzero values stored but the manifest says nnz={spec.nnz}")
        _check_bools(spec, restored)
    else:
        restored = _tiny_sparse(spec, raws)
    if zlib.crc32(restored, checksum_head(spec.name, dt.name, spec.shape)) != spec.crc32:
        raise _error(spec, "checksum mismatch (the file is corrupt or its manifest was altered)")
    if not len(restored):
        return torch.empty(spec.shape, dtype=dt.torch)
    tensor = _as_tensor(restored, dt)
    return tensor if len(spec.shape) == 1 else tensor.reshape(spec.shape)


def _tiny_sparse(spec: TensorSpec, raws: Mapping[str, bytes | memoryview]) -> bytearray:
    """The restored bytes of a small bitmask or gaps tensor, with the checks of the block path."""
    numel, width = spec.numel, spec.dtype.itemsize
    if spec.encoding == "bitmask":
        mask = bytes(raws["mask"])
        positions = [8 * i + b for i, byte in enumerate(mask) if byte for b in range(8) if byte >> b & 1]
        if positions and positions[-1] >= numel:
            raise _error(spec, f"bitmask has bits set past the tensor's {numel} entries")
    else:
        positions, at, run = [], -1, 0
        for byte in bytes(raws["gaps"]):
            run += byte
            if byte != ESCAPE:
                at += run + 1
                positions.append(at)
                run = 0
        if run:
            raise _error(spec, "gaps stream ends inside a run (trailing escape bytes)")
        if positions and positions[-1] >= numel:
            raise _error(spec, f"gaps reach position {positions[-1]} of a tensor with {numel} entries")
    if len(positions) != spec.nnz:
        raise _error(spec, f"positions mark {len(positions)} entries but the manifest says nnz={spec.nnz}")
    out = bytearray(numel * width)
    if spec.values.name == "bool":
        for p in positions:
            out[p] = 1
        return out
    values, zero = bytes(raws["values"]), bytes(width)
    for i, p in enumerate(positions):
        value = values[i * width: (i + 1) * width]
        if value == zero:
            raise _error(spec, "the values stream of a sparse encoding holds zeros")
        out[p * width: (p + 1) * width] = value
    return out


def allocate(numel: int, dtype: torch.dtype, zeroed: bool) -> torch.Tensor:
    """A flat tensor for the restored values; ``MemoryError`` (not torch's ``RuntimeError``) when there is no room."""
    try:
        return torch.zeros(numel, dtype=dtype) if zeroed else torch.empty(numel, dtype=dtype)
    except RuntimeError as exc:
        if out_of_memory(exc):
            raise MemoryError(str(exc)) from None
        raise


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (torch reports that as a ``RuntimeError``)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _error(spec: TensorSpec, message: str) -> FormatError:
    return FormatError(f"tensor {show(spec.name)}: {message}")


def _count_nonzero(raw: bytes | memoryview, dt: DType) -> int:
    return int(np.count_nonzero(np.frombuffer(raw, dtype=dt.bits)))


def _check_bools(spec: TensorSpec, raw: bytes | memoryview) -> None:
    if spec.values.name == "bool" and len(raw) and int(np.frombuffer(raw, dtype=np.uint8).max()) > 1:
        raise _error(spec, "bool data holds bytes other than 0 and 1")


def _dense_exact(spec: TensorSpec, reader: StreamReader, out: torch.Tensor) -> None:
    """Values stored as they are restored: decode the stream straight into the tensor's bytes."""
    target = out.view(torch.uint8).numpy()
    width, found, block = spec.values.itemsize, 0, BLOCK
    for start in range(0, spec.numel, block):
        stop = min(start + block, spec.numel)
        raw = reader.read((stop - start) * width)
        target[start * width: stop * width] = np.frombuffer(raw, dtype=np.uint8)
        found += _count_nonzero(raw, spec.values)
        _check_bools(spec, raw)
    if found != spec.nnz:
        raise _error(spec, f"{found} nonzero values stored but the manifest says nnz={spec.nnz}")
    if not _LITTLE and width > 1:
        out.view(torch.uint8).reshape(-1, width).copy_(out.view(torch.uint8).reshape(-1, width).flip(1))


def _dense_converted(spec: TensorSpec, reader: StreamReader, values: "_Values", out: torch.Tensor) -> None:
    """float16 or int8 codes restored to a wider dtype, one block at a time."""
    width, found, block = spec.values.itemsize, 0, BLOCK
    for start in range(0, spec.numel, block):
        stop = min(start + block, spec.numel)
        raw = reader.read((stop - start) * width)
        found += _count_nonzero(raw, spec.values)
        out[start:stop] = values.restore(raw, np.arange(start, stop, dtype=np.int64))
    if found != spec.nnz:
        raise _error(spec, f"{found} nonzero values stored but the manifest says nnz={spec.nnz}")


def _sparse(spec: TensorSpec, streams: Mapping[str, StreamReader], values: "_Values", out: torch.Tensor) -> None:
    """Positions from the bitmask or gap stream, a block at a time, each block's values read alongside."""
    if spec.encoding == "bitmask":
        blocks = _bitmask_blocks(spec, streams["mask"])
    else:
        blocks = _gap_blocks(spec, streams["gaps"])
    total, bits = 0, _bits_view(out)
    for positions in blocks:
        total += positions.size
        if total > spec.nnz:
            raise _error(spec, f"positions mark {total} entries or more but the manifest says nnz={spec.nnz}")
        if not positions.size:
            continue
        if spec.values.name == "bool":
            bits[positions] = 1
            continue
        raw = streams["values"].read(positions.size * spec.values.itemsize)
        if _count_nonzero(raw, spec.values) != positions.size:
            raise _error(spec, "the values stream of a sparse encoding holds zeros")
        _check_bools(spec, raw)
        if values.exact:  # numpy converts the little-endian bit patterns to native ones
            bits[positions] = np.frombuffer(raw, dtype=spec.values.bits)
        else:
            bits[positions] = _bits_view(values.restore(raw, positions))
    if total != spec.nnz:
        raise _error(spec, f"positions mark {total} entries but the manifest says nnz={spec.nnz}")


def _bits_view(tensor: torch.Tensor) -> np.ndarray:
    """The flat tensor's storage as native unsigned integers of its width (numpy indexing is cheaper than torch's)."""
    width = tensor.element_size()
    return tensor.view(torch.uint8).numpy().view(np.dtype(f"u{width}") if width > 1 else np.uint8)


def _bitmask_blocks(spec: TensorSpec, reader: StreamReader) -> Iterator[np.ndarray]:
    """Ascending int64 positions of the set bits, one block of the mask at a time."""
    size, step = reader.raw_size, max(1, BLOCK // 8)
    for start in range(0, size, step):
        stop = min(start + step, size)
        bits = np.unpackbits(np.frombuffer(reader.read(stop - start), dtype=np.uint8), bitorder="little")
        if stop == size and bits[spec.numel - 8 * start:].any():
            raise _error(spec, f"bitmask has bits set past the tensor's {spec.numel} entries")
        yield np.flatnonzero(bits).astype(np.int64, copy=False) + 8 * start


def _gap_blocks(spec: TensorSpec, reader: StreamReader) -> Iterator[np.ndarray]:
    """Ascending int64 positions from the gap bytes, one block at a time.

    A nonzero's position is the sum of all gap bytes up to and including its
    terminating (non-escape) byte, plus the number of nonzeros before it; so a
    block needs only the running byte sum and count of the blocks before it.
    """
    offset, last = 0, None  # offset: byte sum + nonzeros of the earlier blocks
    while reader.remaining:
        chunk = np.frombuffer(reader.read(min(BLOCK, reader.remaining)), dtype=np.uint8)
        ends = np.flatnonzero(chunk != ESCAPE)
        sums = np.cumsum(chunk, dtype=np.int64)
        positions = sums[ends] + np.arange(offset, offset + ends.size, dtype=np.int64)
        if positions.size and positions[-1] >= spec.numel:
            raise _error(spec, f"gaps reach position {int(positions[-1])} of a tensor with {spec.numel} entries")
        offset += int(sums[-1]) + ends.size
        last = int(chunk[-1])
        yield positions
    if last == ESCAPE:
        raise _error(spec, "gaps stream ends inside a run (trailing escape bytes)")


class _Values:
    """Turns a block of stored values into restored values: exact, float16 widened, or int8 dequantized."""

    def __init__(self, spec: TensorSpec, streams: Mapping[str, StreamReader]) -> None:
        self.spec = spec
        self.exact = spec.values == spec.dtype and spec.bits is None
        self._scales = _Scales(spec, streams["scales"]) if spec.bits is not None else None

    def restore(self, raw: bytes | memoryview, positions: np.ndarray) -> torch.Tensor:
        """The restored values of the stored ``raw`` values at flat ``positions`` (ascending)."""
        spec = self.spec
        stored = _as_tensor(raw, spec.values)
        if self._scales is None:
            return stored.to(spec.dtype.torch)
        qmax = 2 ** (spec.bits - 1) - 1
        low, high = torch.aminmax(stored)  # not abs(): the int8 abs of -128 wraps around to -128
        if int(high) > qmax or int(low) < -qmax:
            raise _error(spec, f"int8 codes exceed ±{qmax}, the range of a {spec.bits}-bit grid")
        work = torch.float64 if spec.dtype.name == "float64" else torch.float32
        scale = torch.from_numpy(self._scales.lookup(positions // self._scales.row_size))
        # The same elementwise operations as quantize.dequantize, so the writer's restored bits come back.
        return (stored.to(work) * scale.to(work)).to(spec.dtype.torch)

    def finish(self) -> None:
        """Read (and check) the scales no value needed."""
        if self._scales is not None:
            self._scales.finish()


class _Scales:
    """The bfloat16 per-row scales, read forward a chunk of rows at a time as ascending rows ask for them."""

    def __init__(self, spec: TensorSpec, reader: StreamReader) -> None:
        self.spec, self.reader = spec, reader
        self.row_size = max(1, spec.numel // spec.rows)
        self._base, self._chunk = 0, np.empty(0, dtype=np.float32)

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """float32 scales of ``rows`` (ascending row numbers)."""
        out = np.empty(rows.size, dtype=np.float32)
        i = 0
        while i < rows.size:
            while rows[i] >= self._base + self._chunk.size:
                self._next()
            j = int(np.searchsorted(rows, self._base + self._chunk.size, side="left"))
            out[i:j] = self._chunk[rows[i:j] - self._base]
            i = j
        return out

    def finish(self) -> None:
        """Read and check the remaining scales."""
        while self._base + self._chunk.size < self.spec.rows:
            self._next()

    def _next(self) -> None:
        self._base += self._chunk.size
        count = min(_SCALE_ROWS, self.spec.rows - self._base)
        if count <= 0:  # cannot happen for positions inside the tensor; kept as a hard stop
            raise _error(self.spec, "a position lies past the last row of scales")
        bits = np.frombuffer(self.reader.read(2 * count), dtype="<u2").astype(np.uint32) << 16
        chunk = bits.view(np.float32)
        if not (np.isfinite(chunk).all() and (chunk >= 0).all()):
            raise _error(self.spec, "quantization scales must be finite and non-negative")
        self._chunk = chunk


def _as_tensor(raw: bytes | memoryview, dt: DType) -> torch.Tensor:
    """A 1-D tensor of ``dt`` holding the little-endian values ``raw`` (a writable copy of one block)."""
    if not len(raw):
        return torch.empty(0, dtype=dt.torch)
    tensor = torch.frombuffer(bytearray(raw), dtype=dt.torch)
    if not _LITTLE and dt.itemsize > 1:
        tensor = tensor.view(torch.uint8).reshape(-1, dt.itemsize).flip(1).contiguous().view(dt.torch).reshape(-1)
    return tensor
