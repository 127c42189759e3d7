"""Byte-stream compression: ``"none"`` or raw LZMA2 (stdlib ``lzma``), whichever is smaller.

LZMA's literal coder is an adaptive binary arithmetic coder, so on bitmasks, gap
bytes and int8 values it gets within a few percent of their order-0 entropy,
which zlib's Huffman stages do not. The raw format (no ``.xz`` container) costs a
few bytes per stream; the decoder needs only the dictionary size, since LZMA2
records its ``lc/lp/pb`` settings inside the stream.

Decompression is always capped at the size the manifest declares, so a
"zip bomb" cannot allocate more than the caller allowed.
"""

from __future__ import annotations

import lzma
import zlib

from .errors import FormatError

__all__ = ["CODECS", "MANIFEST_CODECS", "compress", "compress_manifest", "decompress"]

CODECS = ("none", "lzma")
# The manifest may also use raw deflate primed with a fixed dictionary of the
# manifest's own vocabulary: for a small model the JSON is a few hundred bytes,
# too short for an adaptive coder to learn its keys, and the dictionary saves a
# third of it. The dictionary is part of format version 1 and must never change.
MANIFEST_CODECS = CODECS + ("zlib-dict1",)
_MANIFEST_DICT = (
    b'{"tensors":[{"name":"","dtype":"bfloat16","shape":[],"nnz":0,"encoding":"dense","values":"float16",'
    b'"bits":4,"crc32":,"streams":[["data","lzma",]]},{"name":"","dtype":"int64","shape":[],"nnz":1,'
    b'"encoding":"gaps","values":"int8","bits":8,"crc32":,"streams":[["scales","none",],["gaps","lzma",],'
    b'["values","lzma",]]},{"name":".bias","dtype":"float32","shape":[],"nnz":,"encoding":"dense",'
    b'"values":"float32","bits":null,"crc32":,"streams":[["data","none",]]},{"name":".weight","dtype":"float32",'
    b'"shape":[],"nnz":,"encoding":"bitmask","values":"int8","bits":8,"crc32":,"streams":[["scales","lzma",],'
    b'["mask","lzma",],["values","lzma",]]}],"metadata":{}}'
)

# The encoder's dictionary: LZMA2's smallest. Weights have no long-range repeats,
# sizes measured with 4 KiB and 8 MiB dictionaries agree within 0.1% on sparse
# layouts, and the small one runs about twice as fast. The decoder accepts up
# to 1 MiB, which also bounds its memory per stream.
_DICT_ENCODE = 1 << 12
_DICT_DECODE = 1 << 20
_PROBE = 1 << 20  # bytes of a large stream tried first, to skip incompressible ones


def _filters(itemsize: int) -> list[dict]:
    # lp/pb = log2(itemsize) aligns the literal contexts with element boundaries,
    # which helps fp32/fp16 data; lc=0 because weights carry no byte-level context.
    align = {1: 0, 2: 1, 4: 2, 8: 3}.get(itemsize, 0)
    return [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": _DICT_ENCODE, "lc": 0, "lp": align, "pb": align}]


def compress(data: bytes, itemsize: int = 1) -> tuple[str, bytes]:
    """Return ``(codec, stored_bytes)`` for the smaller of storing ``data`` as is or LZMA2-compressed.

    Args:
        data: the raw stream.
        itemsize: element width in bytes, used to tune the compressor.

    Example:
        >>> compress(bytes(1000))[0]
        'lzma'
        >>> compress(b"xy")
        ('none', b'xy')
    """
    if len(data) < 16:  # nothing this short compresses below its own framing
        return "none", data
    if len(data) > 4 * _PROBE and not _pays(data, itemsize):
        return "none", data
    packed = lzma.compress(data, format=lzma.FORMAT_RAW, filters=_filters(itemsize))
    return ("lzma", packed) if len(packed) < len(data) else ("none", data)


def _pays(data: bytes, itemsize: int) -> bool:
    """Whether a middle slice of a large stream compresses by 2% or more (LZMA runs at a few MB/s)."""
    start = (len(data) // 2) // max(itemsize, 1) * max(itemsize, 1)
    probe = data[start:start + _PROBE]
    return len(lzma.compress(probe, format=lzma.FORMAT_RAW, filters=_filters(itemsize))) < 0.98 * len(probe)


def compress_manifest(text: bytes) -> tuple[str, bytes]:
    """Return ``(codec, stored_bytes)``: the smallest of none, LZMA2 and dictionary-primed deflate."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=_MANIFEST_DICT)
    options = [compress(text), ("zlib-dict1", deflate.compress(text) + deflate.flush())]
    return min(options, key=lambda option: len(option[1]))


def decompress(codec: str, stored: bytes, raw_size: int, what: str) -> bytes:
    """Decode one stream to exactly ``raw_size`` bytes, never producing more.

    Args:
        codec: ``"none"`` or ``"lzma"``.
        stored: the bytes as stored in the file.
        raw_size: the size the manifest declares for the decoded stream.
        what: names the stream in error messages.

    Raises:
        FormatError: unknown codec, corrupt data, or a decoded size other than ``raw_size``.
    """
    if codec == "none":
        if len(stored) != raw_size:
            raise FormatError(f"{what}: stored size {len(stored)} differs from declared size {raw_size}")
        return stored
    if codec == "zlib-dict1" and what == "manifest":
        return _inflate(stored, raw_size, what)
    if codec != "lzma":
        raise FormatError(f"{what}: unknown codec {codec!r}; expected one of {CODECS}")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": _DICT_DECODE}])
    try:
        out = decoder.decompress(stored, max_length=raw_size)
        if not decoder.eof and len(out) == raw_size:
            # The end marker may still be pending; anything beyond it is too much data.
            extra = decoder.decompress(b"", max_length=1)
            if extra:
                raise FormatError(f"{what}: decodes to more than the declared {raw_size} bytes")
    except lzma.LZMAError as exc:
        raise FormatError(f"{what}: corrupt LZMA data ({exc})") from None
    return _exact(out, decoder.eof, decoder.unused_data, raw_size, what, "LZMA")


def _inflate(stored: bytes, raw_size: int, what: str) -> bytes:
    inflater = zlib.decompressobj(-15, zdict=_MANIFEST_DICT)
    try:
        out = inflater.decompress(stored, raw_size)
        extra = inflater.decompress(inflater.unconsumed_tail, 1) if not inflater.eof else b""
    except zlib.error as exc:
        raise FormatError(f"{what}: corrupt deflate data ({exc})") from None
    if extra or len(out) > raw_size:
        raise FormatError(f"{what}: decodes to more than the declared {raw_size} bytes")
    return _exact(out, inflater.eof, inflater.unused_data, raw_size, what, "deflate")


def _exact(out: bytes, eof: bool, unused: bytes, raw_size: int, what: str, codec: str) -> bytes:
    # Shared by every codec: a stream must end exactly at the declared size, with nothing after it.
    if not eof:
        raise FormatError(f"{what}: {codec} data is truncated (decoded {len(out)} of {raw_size} bytes)")
    if len(out) != raw_size or unused:
        raise FormatError(f"{what}: decodes to {len(out)} bytes with {len(unused)} trailing bytes; "
                          f"declared {raw_size} bytes exactly")
    return out
