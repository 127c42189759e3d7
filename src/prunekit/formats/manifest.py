"""The JSON manifest: what it holds, how it is written, and its strict validation.

Shape (version 1)::

    {"tensors": [{"name": "fc.weight", "dtype": "float32", "shape": [10, 84],
                  "nnz": 84, "encoding": "gaps", "values": "int8", "bits": 8,
                  "crc32": 123456789,
                  "streams": [["scales", "lzma", 17, 20], ["gaps", "lzma", 60, 84], ["values", "none", 84, 84]]},
                 ...],
     "metadata": {"any": "strings"},
     "aliases": [["lm_head.weight", "transformer.wte.weight"]]}

``aliases`` (present only when the state has tied tensors) names tensors that
are the very same tensor as an earlier entry: they are stored once and come
back as one tensor under both names.

Each stream is ``[role, codec, stored size, decoded size]`` (arrays, not
objects: the manifest of a small model is a visible part of its file). Streams
lie in the payload back to back, in manifest order. :func:`parse`
checks every field, every combination and every size against the payload and
the reader's memory limit before a single stream is decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from . import codecs
from .dtypes import DTYPES, DType
from .encoding import ENCODINGS, Encoded, TensorSpec, raw_size_bounds, stream_roles
from .errors import FormatError

__all__ = ["MAX_TENSORS", "MAX_NAME", "MAX_NDIM", "StreamRef", "Entry", "build", "parse"]

MAX_TENSORS = 200_000
MAX_NAME = 4096  # characters in a tensor name
MAX_NDIM = 64
MAX_METADATA = 1 << 20  # characters in user metadata, keys and values together
_TENSOR_KEYS = {"name", "dtype", "shape", "nnz", "encoding", "values", "bits", "crc32", "streams"}


@dataclass(frozen=True)
class StreamRef:
    """Where one stream lies in the payload and what it decodes to."""

    role: str
    codec: str
    offset: int
    size: int
    raw_size: int


@dataclass(frozen=True)
class Entry:
    """A validated manifest entry: the tensor's spec and its streams."""

    spec: TensorSpec
    streams: tuple[StreamRef, ...]

    @property
    def stored_size(self) -> int:
        """Bytes the tensor's streams take in the payload."""
        return sum(s.size for s in self.streams)


def build(encoded: Sequence[Encoded], metadata: dict[str, str],
          aliases: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The manifest (a JSON-ready dict) for tensors encoded in this order, and ``(alias, source)`` pairs."""
    tensors = []
    for enc in encoded:
        s = enc.spec
        tensors.append({
            "name": s.name, "dtype": s.dtype.name, "shape": list(s.shape), "nnz": s.nnz,
            "encoding": s.encoding, "values": s.values.name, "bits": s.bits, "crc32": s.crc32,
            "streams": [[st.role, st.codec, len(st.stored), st.raw_size] for st in enc.streams],
        })
    out: dict[str, Any] = {"tensors": tensors, "metadata": dict(metadata)}
    if aliases:
        out["aliases"] = [[alias, source] for alias, source in aliases]
    return out


def parse(obj: Any, payload_size: int, max_bytes: int
          ) -> tuple[list[Entry], dict[str, str], list[tuple[str, str]]]:
    """Validate a decoded manifest against the payload size and the memory limit.

    Args:
        obj: the result of ``json.loads`` on the manifest.
        payload_size: bytes in the file's payload.
        max_bytes: the most the restored tensors may occupy together.

    Returns:
        The entries in file order, the user metadata and the ``(alias, source)`` pairs.

    Raises:
        FormatError: naming the first field that is wrong and why.
    """
    _keys(obj, {"tensors", "metadata", "aliases"} if isinstance(obj, dict) and "aliases" in obj
          else {"tensors", "metadata"}, "manifest")
    metadata = _metadata(obj["metadata"])
    tensors = obj["tensors"]
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise FormatError(f"manifest: 'tensors' must be a list of at most {MAX_TENSORS} entries")
    entries, names, offset, total = [], set(), 0, 0
    for i, item in enumerate(tensors):
        entry = _entry(item, f"manifest: tensors[{i}]", offset, payload_size)
        if entry.spec.name in names:
            raise FormatError(f"manifest: tensor name '{entry.spec.name}' appears twice")
        names.add(entry.spec.name)
        offset += entry.stored_size
        total += entry.spec.numel * entry.spec.dtype.itemsize
        if total > max_bytes:
            raise FormatError(f"manifest: tensors need more than max_bytes={max_bytes:,} bytes "
                              f"(reached at '{entry.spec.name}'); pass a larger max_bytes if the file is trusted")
        entries.append(entry)
    if offset != payload_size:
        raise FormatError(f"manifest: streams cover {offset:,} bytes but the payload holds {payload_size:,}")
    return entries, metadata, _aliases(obj.get("aliases", []), names)


def _aliases(items: Any, names: set[str]) -> list[tuple[str, str]]:
    if not isinstance(items, list) or len(items) > MAX_TENSORS:
        raise FormatError(f"manifest: 'aliases' must be a list of at most {MAX_TENSORS} [alias, source] pairs")
    out, taken = [], set(names)
    for i, item in enumerate(items):
        where = f"manifest: aliases[{i}]"
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(n, str) for n in item)):
            raise FormatError(f"{where} must be [alias, source] (two strings), got {item!r:.80}")
        alias, source = item
        if not 0 < len(alias) <= MAX_NAME:
            raise FormatError(f"{where}: the alias must be a non-empty string of at most {MAX_NAME} characters")
        if alias in taken:
            raise FormatError(f"{where}: '{alias:.200}' is already a tensor or alias name")
        if source not in names:
            raise FormatError(f"{where}: source '{source:.200}' is not a tensor of the file")
        taken.add(alias)
        out.append((alias, source))
    return out


def _entry(item: Any, where: str, offset: int, payload_size: int) -> Entry:
    _keys(item, _TENSOR_KEYS, where)
    name = item["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise FormatError(f"{where}.name must be a non-empty string of at most {MAX_NAME} characters")
    where = f"{where} ('{name}')"
    dtype = _dtype(item["dtype"], f"{where}.dtype")
    shape = _shape(item["shape"], f"{where}.shape")
    numel = math.prod(shape)
    values = _dtype(item["values"], f"{where}.values")
    bits = None if item["bits"] is None else _int(item["bits"], f"{where}.bits", 2, 8)
    _check_representation(dtype, values, bits, shape, where)
    encoding = item["encoding"]
    if encoding not in ENCODINGS:
        raise FormatError(f"{where}.encoding must be one of {ENCODINGS}, got {encoding!r}")
    spec = TensorSpec(name, dtype, shape, _int(item["nnz"], f"{where}.nnz", 0, numel), encoding, values, bits,
                      _int(item["crc32"], f"{where}.crc32", 0, 2**32 - 1))
    return Entry(spec, _streams(item["streams"], spec, where, offset, payload_size))


def _check_representation(dtype: DType, values: DType, bits: int | None, shape: tuple[int, ...], where: str) -> None:
    if bits is not None:
        if values.name != "int8" or not dtype.is_floating or len(shape) < 2 or math.prod(shape) == 0:
            raise FormatError(f"{where}: quantized values must be int8 codes of a non-empty floating tensor "
                              f"with >= 2 dims, got {values.name} for {dtype.name} {list(shape)}")
    elif values != dtype and not (values.name == "float16" and dtype.name in ("float32", "float64")):
        raise FormatError(f"{where}: values stored as {values.name} cannot restore a {dtype.name} tensor")


def _streams(items: Any, spec: TensorSpec, where: str, offset: int, payload_size: int) -> tuple[StreamRef, ...]:
    roles = stream_roles(spec.encoding, spec.values, spec.bits is not None)
    if not isinstance(items, list) or len(items) != len(roles):
        raise FormatError(f"{where}.streams must list {len(roles)} streams {list(roles)} for encoding '{spec.encoding}'")
    refs = []
    for j, (item, role) in enumerate(zip(items, roles)):
        at = f"{where}.streams[{j}]"
        if not isinstance(item, list) or len(item) != 4:
            raise FormatError(f"{at} must be [role, codec, size, raw_size], got {item!r:.80}")
        if item[0] != role:
            raise FormatError(f"{at}: role must be {role!r}, got {item[0]!r:.40}")
        codec = item[1]
        if codec not in codecs.CODECS:
            raise FormatError(f"{at}: codec must be one of {codecs.CODECS}, got {codec!r:.40}")
        lo, hi = raw_size_bounds(role, spec)
        raw_size = _int(item[3], f"{at}: raw_size", lo, hi)
        size = _int(item[2], f"{at}: size", 0, payload_size - offset)
        if codec == "none" and size != raw_size:
            raise FormatError(f"{at}: an uncompressed stream must have size == raw_size, got {size} and {raw_size}")
        refs.append(StreamRef(role, codec, offset, size, raw_size))
        offset += size
    return tuple(refs)


def _keys(obj: Any, keys: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise FormatError(f"{where} must be a JSON object, got {type(obj).__name__}")
    if set(obj) != keys:
        missing, extra = sorted(keys - set(obj)), sorted(set(obj) - keys)
        raise FormatError(f"{where}: missing keys {missing}, unexpected keys {extra}")


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{where} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise FormatError(f"{where} must be in [{lo:,}, {hi:,}], got {value:,}")
    return value


def _dtype(value: Any, where: str) -> DType:
    if not isinstance(value, str) or value not in DTYPES:
        raise FormatError(f"{where} must be one of {list(DTYPES)}, got {value!r}")
    return DTYPES[value]


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise FormatError(f"{where} must be a list of at most {MAX_NDIM} dimensions, got {value!r:.80}")
    # Each dim is bounded on its own so the product below stays a small Python int.
    return tuple(_int(d, f"{where}[{i}]", 0, 2**62) for i, d in enumerate(value))


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError("manifest: 'metadata' must be an object of strings")
    if sum(len(k) + len(v) for k, v in value.items()) > MAX_METADATA:
        raise FormatError(f"manifest: 'metadata' exceeds {MAX_METADATA:,} characters")
    return dict(value)
