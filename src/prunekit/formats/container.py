"""Saving and loading: tensors -> encoded streams + manifest -> envelope -> file, and back.

The file is a safetensors envelope (:mod:`.envelope`) holding a JSON manifest
(:mod:`.manifest`) and a payload of per-tensor streams (:mod:`.encoding`).
Reading treats every file as hostile: the file size, the envelope, the
SHA-256, every manifest field and every declared size are checked before
anything is decompressed or allocated, and nothing is ever unpickled
(``torch.load`` is never called).
"""

from __future__ import annotations

import json
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .._io import atomic_write_bytes
from .._validate import check_int
from . import codecs, envelope, manifest
from .encoding import Encoded, decode, encode, parse_quantize
from .errors import FormatError

__all__ = ["DEFAULT_MAX_BYTES", "Parsed", "dumps", "loads", "save", "load", "parse", "decode_entry",
           "encode_state", "pack", "read_bounded", "tied_aliases"]

DEFAULT_MAX_BYTES = 16 << 30  # the most memory a file may make the reader use, unless the caller says otherwise


@dataclass(frozen=True)
class Parsed:
    """A validated file, before its tensors are decoded."""

    entries: list[manifest.Entry]
    metadata: dict[str, str]
    payload: memoryview
    file_size: int
    manifest_size: int  # stored bytes of the manifest
    header_size: int  # bytes of the safetensors header, with its 8-byte length
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, source): tied tensors, stored once


# -- writing ---------------------------------------------------------------------------------


def encode_state(obj: nn.Module | Mapping[str, torch.Tensor], quantize: str | None = None) -> list[Encoded]:
    """Encode every tensor of a model's state_dict (or of a state_dict), in order; tied copies once."""
    parse_quantize(quantize)  # reject a bad value before any work
    state = as_state_dict(obj)
    aliased = {alias for alias, _ in tied_aliases(state)}
    return [encode(name, tensor, quantize) for name, tensor in state.items() if name not in aliased]


def tied_aliases(state: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """``(alias, source)`` for every entry that is the very same tensor as an earlier one.

    Tied weights (an LM's input embedding and output head) appear in a
    ``state_dict`` under each name, as views of one storage; a file stores them once.

    Example:
        >>> w = torch.ones(2, 2)
        >>> tied_aliases({"a": w, "b": w.detach(), "c": w.clone()})
        [('b', 'a')]
    """
    first: dict[tuple, str] = {}
    out = []
    for name, t in state.items():
        if t.numel() == 0 or t.layout != torch.strided or t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if key in first:
            out.append((name, first[key]))
        else:
            first[key] = name
    return out


def dumps(obj: nn.Module | Mapping[str, torch.Tensor], *, quantize: str | None = None,
          metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a prunekit file for a model or state_dict (see :func:`save`).

    Example:
        >>> data = dumps(torch.nn.Linear(4, 2))
        >>> sorted(loads(data))
        ['bias', 'weight']
    """
    meta = _user_metadata(metadata)
    state = as_state_dict(obj)
    return pack(encode_state(state, quantize), meta, tied_aliases(state))


def pack(encoded: list[Encoded], metadata: Mapping[str, str] | None = None,
         aliases: list[tuple[str, str]] | tuple = ()) -> bytes:
    """The file bytes for already-encoded tensors (see :func:`encode_state`) and tied names (:func:`tied_aliases`)."""
    meta = _user_metadata(metadata)
    text = json.dumps(manifest.build(encoded, meta, aliases), separators=(",", ":"), ensure_ascii=False).encode()
    codec, stored = codecs.compress_manifest(text)
    payload = b"".join(s.stored for e in encoded for s in e.streams)
    return envelope.pack(codec, len(text), stored, payload)


def save(obj: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
         quantize: str | None = None, metadata: Mapping[str, str] | None = None) -> int:
    """Write a model's (or a state_dict's) tensors to ``path``, as small as they encode; return the bytes written.

    Each tensor gets the smallest of dense / bitmask / gap-coded layouts, each
    stream LZMA-compressed when that helps. The write is atomic: a crash leaves
    either the old file or the new one under ``path``, never half of one.

    Args:
        obj: an ``nn.Module`` (its ``state_dict()`` is saved) or a mapping of names to tensors.
        path: destination file.
        quantize: ``None`` (lossless), ``"fp16"``, or ``"int8"``: symmetric
            per-output-channel int8 for floating tensors with >= 2 dims, zeros
            kept exactly (``"int2"``..``"int7"`` use coarser grids in the same
            int8 codes). Biases, norms and integer tensors are always exact.
        metadata: optional string-to-string pairs stored in the manifest.

    Raises:
        TypeError: ``obj`` is not a module or a mapping of str to tensors.
        ValueError: an unsupported dtype or ``quantize`` value, or NaN/Inf in a tensor to quantize.

    Example:
        >>> import prunekit
        >>> prunekit.save(model, "model.pkt", quantize="int8")  # doctest: +SKIP
        10342
    """
    data = dumps(obj, quantize=quantize, metadata=metadata)
    atomic_write_bytes(path, data)
    return len(data)


def as_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """``obj``'s state_dict (a module) or ``obj`` itself (a mapping), checked to be storable."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"save: expected an nn.Module or a mapping of names to tensors, got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not key or len(key) > manifest.MAX_NAME:
            raise TypeError(f"save: keys must be non-empty strings of at most {manifest.MAX_NAME} characters, "
                            f"got {key!r:.80}")
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: JSON could not carry the name
            raise ValueError(f"save: key {key!r:.80} is not valid Unicode text") from None
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"save: value of '{key}' must be a tensor, got {type(value).__name__}")
        if value.ndim > manifest.MAX_NDIM:
            raise ValueError(f"save: '{key}' has {value.ndim} dims; at most {manifest.MAX_NDIM} are supported")
    if len(obj) > manifest.MAX_TENSORS:
        raise ValueError(f"save: {len(obj):,} tensors; at most {manifest.MAX_TENSORS:,} are supported")
    return dict(obj)


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("save: metadata must map strings to strings")
    if sum(len(k) + len(v) for k, v in meta.items()) > manifest.MAX_METADATA:
        raise ValueError(f"save: metadata exceeds {manifest.MAX_METADATA:,} characters")
    return meta


# -- reading ---------------------------------------------------------------------------------


def load(path: str | os.PathLike[str], model: nn.Module | None = None, *, strict: bool = True,
         max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, torch.Tensor]:
    """Read a prunekit file; return its state_dict and, given ``model``, load it into the model.

    Every file is treated as hostile: sizes, dtypes, shapes and counts are
    checked before anything is allocated, the SHA-256 before anything is
    decompressed, and each tensor's CRC-32 after it is rebuilt. Nothing is
    ever unpickled.

    Args:
        path: the file.
        model: optional model; names and shapes are checked against its
            ``state_dict()`` before decoding, then ``model.load_state_dict`` runs.
        strict: with ``model``, require exactly the model's keys.
        max_bytes: the most bytes the file, its manifest and its restored tensors may each take.

    Returns:
        An ordered dict of CPU tensors, restored to their original dtypes
        (quantized weights come back dequantized).

    Raises:
        FormatError: anything wrong with the file, or names/shapes that do not fit ``model``.
        FileNotFoundError: ``path`` does not exist (other OS errors propagate as well).

    Example:
        >>> state = prunekit.load("model.pkt", model)  # doctest: +SKIP
    """
    data = read_bounded(path, max_bytes)
    expected = None if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = loads(data, max_bytes=max_bytes, expected=expected, strict=strict)
    if model is not None:
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise FormatError(f"{path}: does not fit the model: {exc}") from None
    return state


def loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, expected: Mapping[str, tuple[int, ...]] | None = None,
          strict: bool = True) -> dict[str, torch.Tensor]:
    """Decode the bytes of a prunekit file into a state_dict (see :func:`load`).

    Args:
        data: the file's bytes.
        max_bytes: the most bytes the manifest and the restored tensors may each take.
        expected: optional ``{name: shape}`` to check before decoding (missing or
            unexpected names fail only when ``strict``).
        strict: see ``expected``.

    Raises:
        FormatError: anything wrong with ``data``.

    Example:
        >>> state = loads(dumps({"w": torch.tensor([[0.0, 1.5], [0.0, 0.0]])}))
        >>> state["w"].tolist()
        [[0.0, 1.5], [0.0, 0.0]]
    """
    parsed = parse(data, max_bytes=max_bytes)
    if expected is not None:
        _check_expected(parsed, expected, strict)
    state = OrderedDict((e.spec.name, decode_entry(parsed, e)) for e in parsed.entries)
    for alias, source in parsed.aliases:  # tied: one tensor under both names, as in the saved model
        state[alias] = state[source]
    return state


def read_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes, whole.

    Raises:
        FormatError: a directory, a device or pipe, or a file that is too large or changes while read.
    """
    check_int("load", "max_bytes", max_bytes, minimum=0)
    path = Path(path)
    info = path.stat()  # FileNotFoundError propagates: a missing file is not a format problem
    if stat.S_ISDIR(info.st_mode):
        raise FormatError(f"{path}: is a directory, not a prunekit file")
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"{path}: is not a regular file")
    if info.st_size > max_bytes:
        raise FormatError(f"{path}: {info.st_size:,} bytes exceeds max_bytes={max_bytes:,}")
    with open(path, "rb") as f:
        data = f.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise FormatError(f"{path}: changed size while being read")
    return data


def parse(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Parsed:
    """Validate a file's envelope, checksum and manifest, without decoding tensors.

    Raises:
        FormatError: anything wrong with ``data``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse: data must be bytes, got {type(data).__name__}")
    check_int("parse", "max_bytes", max_bytes, minimum=0)
    env = envelope.unpack(data, max_bytes)
    text = codecs.decompress(env.manifest_codec, bytes(env.manifest), env.manifest_size, "manifest")
    entries, user_meta, aliases = manifest.parse(envelope.strict_json(text, "manifest"), len(env.payload), max_bytes)
    return Parsed(entries, user_meta, env.payload, len(memoryview(data).cast("B")), len(env.manifest),
                  env.header_size, tuple(aliases))


def decode_entry(parsed: Parsed, entry: manifest.Entry) -> torch.Tensor:
    """Decompress one tensor's streams and rebuild it.

    Raises:
        FormatError: corrupt streams or data that contradicts the manifest.
    """
    raw = {}
    for ref in entry.streams:
        chunk = bytes(parsed.payload[ref.offset: ref.offset + ref.size])
        raw[ref.role] = codecs.decompress(ref.codec, chunk, ref.raw_size, f"tensor '{entry.spec.name}' {ref.role}")
    return decode(entry.spec, raw)


def _check_expected(parsed: Parsed, expected: Mapping[str, tuple[int, ...]], strict: bool) -> None:
    found = {e.spec.name: e.spec.shape for e in parsed.entries}
    found.update({alias: found[source] for alias, source in parsed.aliases})
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if strict and (missing or unexpected):
        raise FormatError(f"file does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
                          f"{' (and more)' if len(missing) > 10 or len(unexpected) > 10 else ''}")
    for name, shape in found.items():  # file order: the first mismatch is reported, deterministically
        if name in expected and tuple(shape) != tuple(expected[name]):
            raise FormatError(f"tensor '{name}' has shape {list(shape)} in the file "
                              f"but {list(expected[name])} in the model")
