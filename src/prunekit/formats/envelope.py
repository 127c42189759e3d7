"""The envelope: a standard safetensors file carrying the manifest and the payload.

Layout: two ``U8`` tensors, ``manifest`` (the JSON of :mod:`.manifest`,
compressed by :func:`.codecs.compress_manifest`) and ``payload`` (every
tensor's streams, back to back), and ``__metadata__``::

    {"format": "prunekit", "version": "1", "manifest_codec": "zlib-dict1",
     "manifest_size": "1234", "sha256": "<hex digest of manifest bytes + payload bytes>"}

Two tensors instead of one per weight keep the header a constant ~300 bytes,
which matters when a pruned model is a few kilobytes. :func:`unpack` parses the
header itself (8 bytes of length, then JSON) so that every bound is checked
here, names the usual impostors (pickles, ``torch.save`` zips, plain
safetensors), and verifies the SHA-256 before anything is decompressed. It reads
through a :class:`.codecs.Source`, hashing in chunks, so a file on disk is
never held in memory whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy

from .codecs import IN_CHUNK, BytesSource, Source
from .errors import FormatError
from .names import escape

__all__ = ["FORMAT", "VERSION", "Envelope", "pack", "unpack", "strict_json"]

FORMAT = "prunekit"
VERSION = "1"
_MAX_HEADER = 1 << 16  # our header is ~300 bytes; anything near this is not ours
_MAX_MANIFEST = 1 << 26  # decoded manifest JSON: 64 MiB, room for ~200,000 tensors
_META_KEYS = {"format", "version", "manifest_codec", "manifest_size", "sha256"}


@dataclass(frozen=True)
class Envelope:
    """A checked envelope: where the stored manifest and the payload lie, and the manifest's codec and size."""

    source: Source
    manifest_offset: int
    manifest_stored: int  # stored bytes of the manifest
    manifest_codec: str
    manifest_size: int  # decoded bytes of the manifest
    payload_offset: int
    payload_size: int
    header_size: int  # bytes before the tensor data, with the 8-byte length


def pack(manifest_codec: str, manifest_size: int, manifest: bytes, payload: bytes) -> bytes:
    """The file bytes: manifest and payload in a safetensors file, signed with SHA-256."""
    digest = hashlib.sha256(manifest)
    digest.update(payload)
    meta = {"format": FORMAT, "version": VERSION, "manifest_codec": manifest_codec,
            "manifest_size": str(manifest_size), "sha256": digest.hexdigest()}
    arrays = {"manifest": np.frombuffer(manifest, dtype=np.uint8), "payload": np.frombuffer(payload, dtype=np.uint8)}
    return _sorted_header(safetensors.numpy.save(arrays, metadata=meta))


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes the metadata in hash-map order, which varies between
    calls; sorting makes the same model give the same bytes (and hashes). Tensor
    offsets are relative to the end of the header, so only the header changes;
    it stays padded with spaces to a multiple of 8 bytes, as safetensors writes it.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length:]


def unpack(data: bytes | bytearray | memoryview | Source, max_bytes: int) -> Envelope:
    """Check the envelope of a file (its bytes, or a :class:`.codecs.Source`) and its SHA-256; decompress nothing.

    The manifest may declare a decoded size of at most 64 MiB and at most ``max_bytes``.

    Raises:
        FormatError: an impostor, a truncated or malformed header, or a checksum mismatch.
    """
    source = data if hasattr(data, "read") else BytesSource(data)
    _sniff(bytes(source.read(0, min(4, source.size))))
    header, start = _header(source)
    meta, regions = _envelope(header, source.size - start)
    (m0, m1), (p0, p1) = regions["manifest"], regions["payload"]
    digest = hashlib.sha256()
    for lo, hi in ((m0, m1), (p0, p1)):
        for at in range(start + lo, start + hi, IN_CHUNK):
            digest.update(source.read(at, min(IN_CHUNK, start + hi - at)))
    if digest.hexdigest() != meta["sha256"]:
        raise FormatError("checksum mismatch: the file is corrupt (SHA-256 of manifest and payload differs)")
    size = _meta_int(meta["manifest_size"], "manifest_size", _MAX_MANIFEST)
    if size > max_bytes:
        raise FormatError(f"manifest_size: the manifest decodes to {size:,} bytes, more than max_bytes={max_bytes:,}")
    return Envelope(source, start + m0, m1 - m0, meta["manifest_codec"], size, start + p0, p1 - p0, start)


def _sniff(head: bytes) -> None:
    """Name the usual impostors (from the first 4 bytes) before parsing, with a message that helps."""
    if len(head) == 0:
        raise FormatError("empty file: not a prunekit file")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        raise FormatError("this is a zip archive (a torch.save checkpoint?), not a prunekit file; prunekit never "
                          "unpickles. Load it with torch.load(..., weights_only=True), then prunekit.save it")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise FormatError("this is a pickle, not a prunekit file; prunekit never unpickles. Load it with "
                          "torch.load(..., weights_only=True) if you trust it, then prunekit.save it")


def _header(source: Source) -> tuple[dict, int]:
    if source.size < 8:
        raise FormatError(f"truncated file: {source.size} bytes, shorter than a safetensors header")
    length = int.from_bytes(source.read(0, 8), "little")
    if length > source.size - 8:
        raise FormatError(f"truncated or not a prunekit file: the header claims {length:,} bytes, "
                          f"the file has {source.size - 8:,} after the length field")
    if length > _MAX_HEADER:
        raise FormatError(f"not a prunekit file: header of {length:,} bytes exceeds the limit of {_MAX_HEADER:,}")
    return strict_json(bytes(source.read(8, length)), "safetensors header"), 8 + length


def _envelope(header: Any, data_size: int) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    if not isinstance(header, dict):
        raise FormatError("safetensors header must be a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError("a safetensors file without prunekit metadata: not a prunekit file "
                          "(plain safetensors files load with safetensors.torch.load_file)")
    if meta.get("version") != VERSION:
        raise FormatError(f"unsupported prunekit format version {meta.get('version')!r}; this reader knows {VERSION!r}")
    if set(meta) != _META_KEYS or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"__metadata__ must hold exactly the string fields {sorted(_META_KEYS)}")
    if set(header) != {"__metadata__", "manifest", "payload"}:
        found = sorted(k for k in header if k != "__metadata__")
        raise FormatError(f"expected tensors 'manifest' and 'payload', found {found}")
    regions = {name: _region(header[name], name) for name in ("manifest", "payload")}
    spans = sorted(regions.values())
    if spans[0][0] != 0 or spans[0][1] != spans[1][0] or spans[1][1] != data_size:
        raise FormatError(f"truncated or malformed file: tensor data spans {spans} but {data_size:,} data bytes "
                          "follow the header")
    return meta, regions


def _region(info: Any, name: str) -> tuple[int, int]:
    if not isinstance(info, dict) or info.get("dtype") != "U8" or set(info) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"safetensors entry '{name}' must be a U8 tensor")
    shape, offsets = info["shape"], info["data_offsets"]
    ok = (isinstance(shape, list) and len(shape) == 1 and isinstance(offsets, list) and len(offsets) == 2
          and all(type(v) is int and v >= 0 for v in shape + offsets))
    if not ok or offsets[1] - offsets[0] != shape[0]:
        raise FormatError(f"safetensors entry '{name}': malformed shape {shape!r:.40} / data_offsets {offsets!r:.40}")
    return offsets[0], offsets[1]


def _meta_int(value: str, name: str, limit: int) -> int:
    if not value.isdigit() or len(value) > 12 or int(value) > limit:
        raise FormatError(f"__metadata__.{name} must be a decimal integer of at most {limit:,}, got {value!r:.40}")
    return int(value)


def strict_json(raw: bytes, what: str) -> Any:
    """``json.loads`` that raises FormatError, rejects duplicate keys and NaN/Infinity, and survives deep nesting."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out = dict(pairs)  # the cheap test: a duplicate key makes the dict shorter than the pairs
        if len(out) != len(pairs):
            raise FormatError(f"{what}: duplicate key in a JSON object")
        return out

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=_no_constant)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{what} is not valid JSON: {escape(str(exc))}") from None


def _no_constant(name: str) -> Any:
    raise FormatError(f"JSON constant {name} is not allowed")
