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
from typing import Any, NamedTuple, Sequence

from . import codecs
from .dtypes import DTYPES, DType
from .encoding import ENCODINGS, Encoded, TensorSpec, raw_size_bounds, stream_roles
from .errors import FormatError
from .names import BAD_CHARACTERS, problem, show

__all__ = ["MAX_TENSORS", "MAX_NAME", "MAX_NDIM", "StreamRef", "Entry", "build", "parse"]

MAX_TENSORS = 200_000
MAX_NAME = 4096  # characters in a tensor name
MAX_NDIM = 64
MAX_METADATA = 1 << 20  # characters in user metadata, keys and values together
_MAX_DIM = 2**62
_TENSOR_KEYS = {"name", "dtype", "shape", "nnz", "encoding", "values", "bits", "crc32", "streams"}


class StreamRef(NamedTuple):
    """Where one stream lies in the payload and what it decodes to (a tuple: a file may list 10⁵ of them)."""

    role: str
    codec: str
    offset: int
    size: int
    raw_size: int


class Entry(NamedTuple):
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
        entry = _entry(item, i, offset, payload_size)
        spec = entry.spec
        if spec.name in names:
            raise FormatError(f"manifest: tensor name {show(spec.name)} appears twice")
        names.add(spec.name)
        offset += entry.stored_size
        total += spec.numel * spec.dtype.itemsize
        if total > max_bytes:
            raise FormatError(f"manifest: tensors need more than max_bytes={max_bytes:,} bytes "
                              f"(reached at {show(spec.name)}); pass a larger max_bytes if the file is trusted")
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
            raise FormatError(f"{where} must be [alias, source] (two strings), got {_short(item)}")
        alias, source = item
        if not 0 < len(alias) <= MAX_NAME:
            raise FormatError(f"{where}: the alias must be a non-empty string of at most {MAX_NAME} characters")
        why = problem(alias)
        if why is not None:
            raise FormatError(f"{where}: the alias {show(alias)} {why}")
        if alias in taken:
            raise FormatError(f"{where}: {show(alias)} is already a tensor or alias name")
        if source not in names:
            raise FormatError(f"{where}: source {show(source)} is not a tensor of the file")
        taken.add(alias)
        out.append((alias, source))
    return out


def _entry(item: Any, index: int, offset: int, payload_size: int) -> Entry:
    """One validated tensor entry; the common case takes a few cheap tests, errors get the detailed checks."""
    if type(item) is not dict or item.keys() != _TENSOR_KEYS:
        _keys(item, _TENSOR_KEYS, f"manifest: tensors[{index}]")
    name = item["name"]
    if type(name) is not str or not 0 < len(name) <= MAX_NAME:
        raise FormatError(f"manifest: tensors[{index}].name must be a non-empty string of at most {MAX_NAME} "
                          "characters")
    if BAD_CHARACTERS.search(name):
        raise FormatError(f"manifest: tensors[{index}].name {show(name)} {problem(name)}")
    where = _Where(index, name)
    dtype, values = _dtype(item["dtype"], where, "dtype"), _dtype(item["values"], where, "values")
    shape = item["shape"]
    if not (type(shape) is list and len(shape) <= MAX_NDIM
            and all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)):
        shape = _shape(shape, f"{where}.shape")
    shape = tuple(shape)
    numel = math.prod(shape)
    bits = item["bits"]
    if bits is not None:
        bits = _int(bits, where, 2, 8, ".bits")
    _check_representation(dtype, values, bits, shape, where)
    encoding = item["encoding"]
    if encoding not in ENCODINGS:
        raise FormatError(f"{where}.encoding must be one of {ENCODINGS}, got {_short(encoding)}")
    spec = TensorSpec(name, dtype, shape, _int(item["nnz"], where, 0, numel, ".nnz"), encoding, values, bits,
                      _int(item["crc32"], where, 0, 0xFFFFFFFF, ".crc32"))
    return Entry(spec, _streams(item["streams"], spec, where, offset, payload_size))


class _Where:
    """Where an entry is, as text only when an error needs it (building it eagerly is most of the cost)."""

    __slots__ = ("index", "name")

    def __init__(self, index: int, name: str) -> None:
        self.index, self.name = index, name

    def __str__(self) -> str:
        return f"manifest: tensors[{self.index}] ({show(self.name)})"


def _check_representation(dtype: DType, values: DType, bits: int | None, shape: tuple[int, ...], where: Any) -> None:
    if bits is not None:
        if values.name != "int8" or not dtype.is_floating or len(shape) < 2 or math.prod(shape) == 0:
            raise FormatError(f"{where}: quantized values must be int8 codes of a non-empty floating tensor "
                              f"with >= 2 dims, got {values.name} for {dtype.name} {list(shape)}")
    elif values is not dtype and not (values.name == "float16" and dtype.name in ("float32", "float64")):
        raise FormatError(f"{where}: values stored as {values.name} cannot restore a {dtype.name} tensor")


def _streams(items: Any, spec: TensorSpec, where: Any, offset: int, payload_size: int) -> tuple[StreamRef, ...]:
    roles = stream_roles(spec.encoding, spec.values, spec.bits is not None)
    if type(items) is not list or len(items) != len(roles):
        raise FormatError(f"{where}.streams must list {len(roles)} streams {list(roles)} "
                          f"for encoding '{spec.encoding}'")
    refs = []
    for j, role in enumerate(roles):
        item = items[j]
        if type(item) is not list or len(item) != 4:
            raise FormatError(f"{where}.streams[{j}] must be [role, codec, size, raw_size], got {_short(item)}")
        found, codec, size, raw_size = item
        if found != role:
            raise FormatError(f"{where}.streams[{j}]: role must be {role!r}, got {_short(found)}")
        if codec != "none" and codec != "lzma":
            raise FormatError(f"{where}.streams[{j}]: codec must be one of {codecs.CODECS}, got {_short(codec)}")
        lo, hi = raw_size_bounds(role, spec)
        if type(raw_size) is not int or not lo <= raw_size <= hi:
            _int(raw_size, where, lo, hi, f".streams[{j}]: raw_size")
        if type(size) is not int or not 0 <= size <= payload_size - offset:
            _int(size, where, 0, payload_size - offset, f".streams[{j}]: size")
        if codec == "none" and size != raw_size:
            raise FormatError(f"{where}.streams[{j}]: an uncompressed stream must have size == raw_size, "
                              f"got {size} and {raw_size}")
        refs.append(StreamRef(role, codec, offset, size, raw_size))
        offset += size
    return tuple(refs)


def _short(value: Any) -> str:
    """A value from the file, for a message: repr (which escapes control characters), cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _keys(obj: Any, keys: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise FormatError(f"{where} must be a JSON object, got {type(obj).__name__}")
    if set(obj) != keys:
        missing, extra = sorted(keys - set(obj)), sorted(set(obj) - keys)
        raise FormatError(f"{where}: missing keys {missing}, unexpected keys {extra}")


def _int(value: Any, where: Any, lo: int, hi: int, field: str = "") -> int:
    if type(value) is not int:  # bool is a subclass of int, and not an integer here
        raise FormatError(f"{where}{field} must be an integer, got {_short(value)}")
    if not lo <= value <= hi:
        raise FormatError(f"{where}{field} must be in [{lo:,}, {hi:,}], got {value:,}")
    return value


def _dtype(value: Any, where: Any, field: str) -> DType:
    found = DTYPES.get(value) if type(value) is str else None
    if found is None:
        raise FormatError(f"{where}.{field} must be one of {list(DTYPES)}, got {_short(value)}")
    return found


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise FormatError(f"{where} must be a list of at most {MAX_NDIM} dimensions, got {_short(value)}")
    # Each dim is bounded on its own so the product below stays a small Python int.
    return tuple(_int(d, f"{where}[{i}]", 0, _MAX_DIM) for i, d in enumerate(value))


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError("manifest: 'metadata' must be an object of strings")
    if sum(len(k) + len(v) for k, v in value.items()) > MAX_METADATA:
        raise FormatError(f"manifest: 'metadata' exceeds {MAX_METADATA:,} characters")
    return dict(value)
