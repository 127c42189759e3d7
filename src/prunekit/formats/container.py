"""Saving and loading: tensors -> encoded streams + manifest -> envelope -> file, and back.

The file is a safetensors envelope (:mod:`.envelope`) holding a JSON manifest
(:mod:`.manifest`) and a payload of per-tensor streams (:mod:`.encoding`).
Reading treats every file as hostile: the file size, the envelope, the
SHA-256, every manifest field and every declared size are checked before
anything is decompressed or allocated, and nothing is ever unpickled
(``torch.load`` is never called).

What a reader may cost (format version 1):

* ``max_bytes`` bounds the file size, the decoded manifest, and the *restored
  total*: the sum of ``numel * itemsize`` over the stored tensors (tied copies
  count once, as they are one tensor). All three are checked from the envelope
  and the manifest, before any tensor is allocated; exceeding one is a
  ``FormatError``. The default, :data:`DEFAULT_MAX_BYTES`, is 16 GiB: pass
  less for files from strangers.
* Memory while loading is the restored tensors plus a constant: each tensor is
  allocated once at its final size and its streams are decoded into it block
  by block (:mod:`.decoding`), the LZMA decoders capped at the declared output
  and fed 256 KiB at a time (:mod:`.codecs`), the SHA-256 and CRC-32 computed
  over views. :func:`load` reads the file piece by piece and never holds it
  whole; :func:`loads` holds only what it is given. The constant is at most
  16 MiB for decoding (blocks of 2**16 entries), plus the manifest while it is
  parsed (its JSON, at most 64 MiB) and about 2 KB per tensor for the
  manifest's objects and the tensor objects themselves (measured: 1.7 KB). Measured on hand-built worst cases (every entry a nonzero behind a
  gap or bitmask stream of a few KB, int8 codes with a scale per row, float16
  widened to float64, LZMA bombs; ``tests/formats/memory_probe.py``): peak
  resident memory is 1.00-1.06x the restored bytes at 64-512 MiB, so well
  within the 1.5x this format promises.
* A ``MemoryError`` (or torch's failed allocation) while decoding, which the
  bounds above make a matter of the process's own limits, is reported as a
  ``FormatError`` too; nothing relies on it.
* Time is linear in the file: per tensor a few dict lookups to validate its
  entry and, for the small tensors most models have many of (at most
  :data:`.decoding.TINY` bytes), its streams decoded whole, one CRC-32 and one
  copy. The collector is paused while the manifest's objects are built.
  Measured: 10**5 two-entry tensors load in 3.9 s on a machine where
  ``sum(range(10**7))`` takes 0.42 s (about three times a current desktop core).
* Names are printable text (:mod:`.names`), checked on save and on load, and
  escaped wherever they are printed.
"""

from __future__ import annotations

import gc
import json
import os
import stat
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .._io import atomic_write_bytes
from .._validate import check_int
from . import codecs, decoding, envelope, manifest
from .decoding import decode_streams, out_of_memory
from .dtypes import DTYPES
from .encoding import Encoded, encode, parse_quantize
from .errors import FormatError
from .names import escape, problem, show

__all__ = ["DEFAULT_MAX_BYTES", "Parsed", "UnsupportedTensorError", "dumps", "loads", "save", "load", "parse",
           "decode_all", "decode_entry", "encode_state", "open_bounded", "pack", "read_bounded", "tied_aliases"]

DEFAULT_MAX_BYTES = 16 << 30  # the most memory a file may make the reader use, unless the caller says otherwise
_STORABLE = frozenset(d.torch for d in DTYPES.values())


@dataclass(frozen=True)
class Parsed:
    """A validated file, before its tensors are decoded."""

    entries: list[manifest.Entry]
    metadata: dict[str, str]
    source: codecs.Source  # where the file's bytes are read from
    payload_offset: int  # where the payload starts in the file
    payload_size: int
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
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride(),
               t.is_neg())  # a negative-bit view shares the storage but not the values
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


class UnsupportedTensorError(TypeError, ValueError):
    """``save`` was given a tensor a prunekit file cannot store; the message names its key and the way out.

    Sparse layouts, nested, torch-quantized and ``meta`` tensors, and dtypes
    outside :data:`.dtypes.DTYPES` (complex, float8). A ``TypeError`` (the
    wrong kind of tensor), and a ``ValueError`` too, which unsupported dtypes
    have always raised. Views, non-contiguous and ``requires_grad`` tensors are
    fine: their values are stored.
    """


def as_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """``obj``'s state_dict (a module) or ``obj`` itself (a mapping), checked to be storable.

    Raises:
        TypeError: not a module or mapping, a key that is not a non-empty string,
            a value that is not a tensor, or an :class:`UnsupportedTensorError`.
        ValueError: a key that is not printable text (see :mod:`.names`), too many dims or tensors.
    """
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"save: expected an nn.Module or a mapping of names to tensors, got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not key or len(key) > manifest.MAX_NAME:
            raise TypeError(f"save: keys must be non-empty strings of at most {manifest.MAX_NAME} characters, "
                            f"got {show(key, 80) if isinstance(key, str) else repr(key)[:80]}")
        why = problem(key)
        if why is not None:
            raise ValueError(f"save: key {show(key, 80)} {why}; rename it (names must be printable text)")
        _check_tensor(key, value)
    if len(obj) > manifest.MAX_TENSORS:
        raise ValueError(f"save: {len(obj):,} tensors; at most {manifest.MAX_TENSORS:,} are supported")
    return dict(obj)


def _check_tensor(key: str, value: Any) -> None:
    """Refuse what cannot be stored as plain values, saying what to do instead."""
    name = show(key, 80)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"save: value of {name} must be a tensor, got {type(value).__name__}")
    if value.is_nested:
        raise UnsupportedTensorError(f"save: {name} is a nested tensor; save its parts (tensor.unbind()) "
                                     "under names of their own")
    if value.layout != torch.strided:
        raise UnsupportedTensorError(f"save: {name} is a {str(value.layout).replace('torch.', '')} tensor; "
                                     "save its dense values (tensor.to_dense()) or its parts as tensors of their own")
    if value.is_quantized:
        raise UnsupportedTensorError(f"save: {name} is a torch quantized tensor ({value.dtype}); save "
                                     "tensor.dequantize() (and pass quantize='int8' to store int8 codes)")
    if value.device.type == "meta":
        raise UnsupportedTensorError(f"save: {name} is on the meta device and has no values; load or "
                                     "initialize the weights (e.g. model.to_empty(device='cpu')) before saving")
    if value.dtype not in _STORABLE:
        raise UnsupportedTensorError(f"save: {name}: dtype {value.dtype} cannot be stored; supported: "
                                     f"{', '.join(DTYPES)}. Convert it first (e.g. torch.view_as_real for complex)")
    if value.ndim > manifest.MAX_NDIM:
        raise ValueError(f"save: {name} has {value.ndim} dims; at most {manifest.MAX_NDIM} are supported")


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

    Every file is treated as hostile: sizes, dtypes, shapes, names and counts
    are checked before anything is allocated, the SHA-256 before anything is
    decompressed, and each tensor's CRC-32 after it is rebuilt. Nothing is
    ever unpickled. The file is read piece by piece, never held whole, and
    decoding needs the restored tensors plus a constant (see :mod:`prunekit.formats`).

    Args:
        path: the file.
        model: optional model; names and shapes are checked against its
            ``state_dict()`` before decoding, then ``model.load_state_dict`` runs.
        strict: with ``model``, require exactly the model's keys.
        max_bytes: the most bytes the file, its manifest and its restored tensors (together) may each take.

    Returns:
        An ordered dict of CPU tensors, restored to their original dtypes
        (quantized weights come back dequantized).

    Raises:
        FormatError: anything wrong with the file, or names/shapes that do not fit ``model``.
        FileNotFoundError: ``path`` does not exist (other OS errors propagate as well).

    Example:
        >>> state = prunekit.load("model.pkt", model)  # doctest: +SKIP
    """
    expected = None if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with open_bounded(path, max_bytes) as source:
        state = decode_all(parse(source, max_bytes=max_bytes), expected, strict)
        source.check_unchanged()
    if model is not None:
        try:
            model.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise FormatError(f"{escape(os.fspath(path))}: does not fit the model: "
                              f"{escape(' '.join(str(exc).split()), 400)}") from None
    return state


def loads(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, expected: Mapping[str, tuple[int, ...]] | None = None,
          strict: bool = True) -> dict[str, torch.Tensor]:
    """Decode the bytes of a prunekit file into a state_dict (see :func:`load`).

    Args:
        data: the file's bytes.
        max_bytes: the most bytes the manifest and the restored tensors (together) may each take.
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
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"loads: data must be bytes, got {type(data).__name__}")
    return decode_all(parse(data, max_bytes=max_bytes), expected, strict)


def decode_all(parsed: Parsed, expected: Mapping[str, tuple[int, ...]] | None = None,
               strict: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a parsed file, in file order, tied names sharing one tensor (see :func:`loads`)."""
    if expected is not None:
        _check_expected(parsed, expected, strict)
    state = OrderedDict()
    with _collector_paused():
        for entry in parsed.entries:
            state[entry.spec.name] = decode_entry(parsed, entry)
    for alias, source in parsed.aliases:  # tied: one tensor under both names, as in the saved model
        state[alias] = state[source]
    return state


@contextmanager
def open_bounded(path: str | os.PathLike[str], max_bytes: int) -> Iterator[codecs.FileSource]:
    """Open a regular file of at most ``max_bytes`` bytes as a :class:`.codecs.FileSource`.

    Raises:
        FormatError: a directory, a device or pipe (never opened), or a file that is too large.
    """
    check_int("load", "max_bytes", max_bytes, minimum=0)
    info = _checked_stat(Path(path), max_bytes)
    with open(path, "rb") as f:
        source = codecs.FileSource(f, escape(os.fspath(path)))
        if (source.size, os.fstat(f.fileno()).st_ino) != (info.st_size, info.st_ino):
            raise FormatError(f"{escape(os.fspath(path))}: changed while being opened")
        yield source


def read_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes, whole.

    Raises:
        FormatError: a directory, a device or pipe, or a file that is too large or changes while read.
    """
    check_int("load", "max_bytes", max_bytes, minimum=0)
    info = _checked_stat(Path(path), max_bytes)
    with open(path, "rb") as f:
        data = f.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise FormatError(f"{escape(os.fspath(path))}: changed size while being read")
    return data


def _checked_stat(path: Path, max_bytes: int) -> os.stat_result:
    info = path.stat()  # FileNotFoundError propagates: a missing file is not a format problem
    shown = escape(os.fspath(path))
    if stat.S_ISDIR(info.st_mode):
        raise FormatError(f"{shown}: is a directory, not a prunekit file")
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"{shown}: is not a regular file")
    if info.st_size > max_bytes:
        raise FormatError(f"{shown}: {info.st_size:,} bytes exceeds max_bytes={max_bytes:,}")
    return info


def parse(data: bytes | bytearray | memoryview | codecs.Source, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Parsed:
    """Validate a file's envelope, checksum and manifest, without decoding tensors.

    Args:
        data: the file's bytes, or a :class:`.codecs.Source` to read them from.
        max_bytes: the most bytes the manifest and the restored tensors may each take.

    Raises:
        FormatError: anything wrong with ``data``.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = codecs.BytesSource(data)
    elif not hasattr(data, "read"):
        raise TypeError(f"parse: data must be bytes, got {type(data).__name__}")
    check_int("parse", "max_bytes", max_bytes, minimum=0)
    try:
        env = envelope.unpack(data, max_bytes)
        reader = codecs.StreamReader(env.manifest_codec, data, env.manifest_offset, env.manifest_stored,
                                     env.manifest_size, "manifest")
        text = bytes(reader.read(env.manifest_size))
        reader.close()
        with _collector_paused():
            entries, user_meta, aliases = manifest.parse(envelope.strict_json(text, "manifest"), env.payload_size,
                                                         max_bytes)
    except MemoryError:
        raise FormatError("out of memory while reading the manifest; this process cannot hold it "
                          "(a smaller max_bytes refuses such files before reading them)") from None
    return Parsed(entries, user_meta, data, env.payload_offset, env.payload_size, data.size, env.manifest_stored,
                  env.header_size, tuple(aliases))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a manifest's objects are built.

    Parsing and decoding create objects by the hundred thousand and no cycles;
    the collector would rescan all of them every few hundred allocations, which
    makes loading 10⁵ tensors quadratic-ish (several times slower).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def decode_entry(parsed: Parsed, entry: manifest.Entry) -> torch.Tensor:
    """Decode one tensor's streams and rebuild it, reading them block by block.

    Raises:
        FormatError: corrupt streams or data that contradicts the manifest, or
            too little memory to hold the tensor (never ``MemoryError``).
    """
    spec = entry.spec
    try:
        if spec.values is spec.dtype and spec.numel * spec.dtype.itemsize <= decoding.TINY and (
                spec.encoding == "dense" or spec.numel <= decoding.TINY_SPARSE):
            return decoding.decode_tiny(spec, {ref.role: _whole(parsed, spec, ref) for ref in entry.streams})
        streams = {ref.role: codecs.StreamReader(ref.codec, parsed.source, parsed.payload_offset + ref.offset,
                                                 ref.size, ref.raw_size, f"tensor {show(spec.name)} {ref.role}")
                   for ref in entry.streams}
        return decode_streams(spec, streams)
    except (MemoryError, RuntimeError) as exc:
        # The bound checks make this rare (max_bytes above what the process may use); a file never
        # turns it into a crash.
        if not out_of_memory(exc):
            raise
        raise FormatError(f"tensor {show(spec.name)}: out of memory restoring its "
                          f"{spec.numel * spec.dtype.itemsize:,} bytes; lower max_bytes to refuse such "
                          "files before decoding") from None


def _whole(parsed: Parsed, spec: manifest.TensorSpec, ref: manifest.StreamRef) -> bytes | memoryview:
    """One small stream, decoded whole."""
    stored = parsed.source.read(parsed.payload_offset + ref.offset, ref.size)
    if ref.codec == "none":
        return stored
    return codecs.decompress(ref.codec, stored, ref.raw_size, f"tensor {show(spec.name)} {ref.role}")


def _check_expected(parsed: Parsed, expected: Mapping[str, tuple[int, ...]], strict: bool) -> None:
    found = {e.spec.name: e.spec.shape for e in parsed.entries}
    found.update({alias: found[source] for alias, source in parsed.aliases})
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if strict and (missing or unexpected):
        raise FormatError(f"file does not match the model: missing {_names(missing)}, unexpected {_names(unexpected)}")
    for name, shape in found.items():  # file order: the first mismatch is reported, deterministically
        if name in expected and tuple(shape) != tuple(expected[name]):
            raise FormatError(f"tensor {show(name)} has shape {list(shape)} in the file "
                              f"but {list(expected[name])} in the model")


def _names(names: list[str]) -> str:
    shown = "[" + ", ".join(show(n, 80) for n in names[:10]) + "]"
    return shown + (" (and more)" if len(names) > 10 else "")
