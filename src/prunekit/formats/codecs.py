"""Byte-stream compression: ``"none"`` or raw LZMA2 (stdlib ``lzma``), whichever is smaller.

LZMA's literal coder is an adaptive binary arithmetic coder, so on bitmasks, gap
bytes and int8 values it gets within a few percent of their order-0 entropy,
which zlib's Huffman stages do not. The raw format (no ``.xz`` container) costs a
few bytes per stream; the decoder needs only the dictionary size, since LZMA2
records its ``lc/lp/pb`` settings inside the stream.

Decoding streams (:class:`StreamReader`): a reader pulls a stream's decoded
bytes forward in pieces of the size it asks for, feeding the decoder at most
:data:`IN_CHUNK` stored bytes at a time and never asking it for more output
than it has room for. It cannot decode past the size the manifest declares
(a "zip bomb" stops at the cap), and its own memory is a few chunks plus the
LZMA dictionary (at most 1 MiB), whatever the sizes involved.
"""

from __future__ import annotations

import lzma
import os
import zlib
from typing import IO, Protocol

from .errors import FormatError

__all__ = ["CODECS", "IN_CHUNK", "MANIFEST_CODECS", "BytesSource", "FileSource", "Source", "StreamReader",
           "compress", "compress_manifest", "decompress"]

IN_CHUNK = 1 << 18  # stored bytes handed to a decoder at a time

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


class Source(Protocol):
    """Random access to a file's bytes: an in-memory buffer or an open file."""

    size: int

    def read(self, offset: int, size: int) -> bytes | memoryview:
        """Exactly ``size`` bytes starting at ``offset`` (``FormatError`` when they are not there)."""


class BytesSource:
    """A :class:`Source` over bytes already in memory; reads are views, not copies.

    Example:
        >>> bytes(BytesSource(b"abcdef").read(2, 3))
        b'cde'
    """

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.view = memoryview(data).cast("B")
        self.size = len(self.view)

    def read(self, offset: int, size: int) -> memoryview:
        """A view of ``size`` bytes at ``offset``."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise FormatError(f"truncated file: {size:,} bytes at offset {offset:,} are past its end ({self.size:,})")
        return self.view[offset: offset + size]


class FileSource:
    """A :class:`Source` over an open binary file, read piece by piece (the file is never held whole).

    ``what`` names the file in errors; a file that shrinks or changes while it is
    read is a ``FormatError`` (see :meth:`check_unchanged`).
    """

    def __init__(self, file: IO[bytes], what: str) -> None:
        self._file, self._what = file, what
        self._stat = os.fstat(file.fileno())
        self.size = self._stat.st_size

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``, read from the file now."""
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise FormatError(f"{self._what}: changed size while being read")
        return data

    def check_unchanged(self) -> None:
        """Raise ``FormatError`` if the file was modified since it was opened."""
        now = os.fstat(self._file.fileno())
        if (now.st_size, now.st_mtime_ns) != (self._stat.st_size, self._stat.st_mtime_ns):
            raise FormatError(f"{self._what}: changed while being read; load it again once it is written")


class StreamReader:
    """The decoded bytes of one stored stream, read forward in pieces, never past ``raw_size``.

    Args:
        codec: ``"none"``, ``"lzma"`` (or ``"zlib-dict1"`` when ``what == "manifest"``).
        source: where the stored bytes are.
        offset: where the stream starts in ``source``.
        size: stored bytes.
        raw_size: decoded bytes the stream must yield exactly.
        what: names the stream in error messages.

    Example:
        >>> codec, stored = compress(bytes(1000))
        >>> r = StreamReader(codec, BytesSource(stored), 0, len(stored), 1000, "s")
        >>> len(r.read(600)), len(r.read(400)), r.close()
        (600, 400, None)
    """

    def __init__(self, codec: str, source: Source, offset: int, size: int, raw_size: int, what: str) -> None:
        self.codec, self.raw_size, self.remaining, self.what = codec, raw_size, raw_size, what
        self._source, self._pos, self._end = source, offset, offset + size
        if codec == "none":
            if size != raw_size:
                raise FormatError(f"{what}: stored size {size} differs from declared size {raw_size}")
            self._decoder = None
        elif codec == "lzma":
            self._decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[
                {"id": lzma.FILTER_LZMA2, "dict_size": _DICT_DECODE}])
        elif codec == "zlib-dict1" and what == "manifest":
            self._decoder = zlib.decompressobj(-15, zdict=_MANIFEST_DICT)
        else:
            raise FormatError(f"{what}: unknown codec {codec!r:.40}; expected one of {CODECS}")

    def read(self, n: int) -> bytes | memoryview:
        """The next ``n`` decoded bytes (``FormatError`` if the stream is shorter or ``n`` exceeds what is left)."""
        if n > self.remaining:
            raise FormatError(f"{self.what}: needs more than the declared {self.raw_size:,} bytes")
        if self._decoder is None:
            data = self._source.read(self._pos, n)
            self._pos += n
        else:
            data = self._decode(n)
        self.remaining -= n
        return data

    def close(self) -> None:
        """Check that the stream was read exactly to its end, with nothing stored after it."""
        if self.remaining:
            raise FormatError(f"{self.what}: {self.remaining:,} of its declared {self.raw_size:,} bytes are left over")
        if self._decoder is not None:
            while not self._decoder.eof:  # the end marker may still be pending; any output now is too much
                if self._step(1):
                    raise FormatError(f"{self.what}: decodes to more than the declared {self.raw_size:,} bytes")
            trailing = len(self._decoder.unused_data) + self._end - self._pos
            if trailing:
                raise FormatError(f"{self.what}: {trailing:,} trailing bytes after the end of the "
                                  f"{self.codec} data; declared {self.raw_size:,} bytes exactly")

    def _decode(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            if self._decoder.eof:  # the stream ended before the declared size
                raise self._truncated()
            out = self._step(n - got)
            parts.append(out)
            got += len(out)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _step(self, want: int) -> bytes:
        """Decoded bytes, at most ``want`` (maybe none); feeds stored bytes as the decoder needs them."""
        dec = self._decoder
        if self.codec == "lzma":
            feed = self._feed() if dec.needs_input else b""
            try:
                out = dec.decompress(feed, max_length=want)
            except lzma.LZMAError as exc:
                raise FormatError(f"{self.what}: corrupt LZMA data ({exc})") from None
        else:
            feed = dec.unconsumed_tail or self._feed(allow_end=True)
            try:
                out = dec.decompress(feed, want)
            except zlib.error as exc:
                raise FormatError(f"{self.what}: corrupt deflate data ({exc})") from None
        if not out and not feed and not dec.eof:  # nothing left to feed and nothing comes out
            raise self._truncated()
        return out

    def _feed(self, allow_end: bool = False) -> bytes | memoryview:
        if self._pos >= self._end:
            if allow_end:
                return b""
            raise self._truncated()
        chunk = self._source.read(self._pos, min(IN_CHUNK, self._end - self._pos))
        self._pos += len(chunk)
        return chunk

    def _truncated(self) -> FormatError:
        done = self.raw_size - self.remaining
        name = "LZMA" if self.codec == "lzma" else "deflate"
        return FormatError(f"{self.what}: {name} data is truncated (it ends before the declared "
                           f"{self.raw_size:,} bytes; {done:,} were read)")


def decompress(codec: str, stored: bytes | bytearray | memoryview, raw_size: int, what: str) -> bytes:
    """Decode one whole stream to exactly ``raw_size`` bytes, never producing more.

    Args:
        codec: ``"none"`` or ``"lzma"`` (``"zlib-dict1"`` for the manifest).
        stored: the bytes as stored in the file.
        raw_size: the size the manifest declares for the decoded stream.
        what: names the stream in error messages.

    Raises:
        FormatError: unknown codec, corrupt data, or a decoded size other than ``raw_size``.

    Example:
        >>> decompress(*compress(bytes(100)), 100, "s") == bytes(100)
        True
    """
    stored = memoryview(stored).cast("B")
    reader = StreamReader(codec, BytesSource(stored), 0, len(stored), raw_size, what)
    out = reader.read(raw_size)
    reader.close()
    return bytes(out)
