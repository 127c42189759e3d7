"""Stream codecs: round trips, and decompression that never exceeds the declared size."""

from __future__ import annotations

import lzma

import numpy as np
import pytest

from prunekit.formats import FormatError
from prunekit.formats.codecs import compress, decompress


@pytest.mark.parametrize("data", [b"", b"abc", bytes(10_000), np.random.default_rng(0).bytes(5000),
                                  np.arange(4000, dtype="<f4").tobytes()])
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_round_trip_and_never_larger_than_raw(data, itemsize):
    codec, stored = compress(data, itemsize)
    assert len(stored) <= len(data)
    assert decompress(codec, stored, len(data), "s") == data


def test_compressible_data_is_compressed():
    codec, stored = compress(bytes(10_000))
    assert codec == "lzma" and len(stored) < 100


@pytest.mark.parametrize("declared", [0, 9_999, 10_001, 20_000])
def test_lzma_must_decode_to_exactly_the_declared_size(declared):
    _, stored = compress(bytes(10_000))
    with pytest.raises(FormatError, match="declared|truncated"):
        decompress("lzma", stored, declared, "s")


def test_trailing_garbage_after_the_lzma_stream_is_rejected():
    _, stored = compress(bytes(10_000))
    with pytest.raises(FormatError, match="trailing"):
        decompress("lzma", stored + b"\0\0", 10_000, "s")


def test_a_truncated_lzma_stream_is_rejected():
    _, stored = compress(np.random.default_rng(1).integers(0, 4, 10_000, dtype=np.uint8).tobytes())
    with pytest.raises(FormatError, match="truncated|corrupt"):
        decompress("lzma", stored[:-3], 10_000, "s")


def test_garbage_is_rejected():
    with pytest.raises(FormatError, match="corrupt|truncated"):
        decompress("lzma", b"\x99" * 50, 100, "s")


def test_an_xz_container_is_not_raw_lzma():
    with pytest.raises(FormatError):
        decompress("lzma", lzma.compress(b"x" * 100), 100, "s")


def test_unknown_codec_and_size_mismatch_are_format_errors():
    with pytest.raises(FormatError, match="unknown codec"):
        decompress("zstd", b"abc", 3, "s")
    with pytest.raises(FormatError, match="differs from declared"):
        decompress("none", b"abc", 4, "s")


def test_manifest_codec_round_trips_and_is_capped():
    from prunekit.formats.codecs import compress_manifest

    text = b'{"tensors":[{"name":"fc.weight","dtype":"float32"}],"metadata":{}}' * 3
    codec, stored = compress_manifest(text)
    assert codec == "zlib-dict1" and len(stored) < len(text) / 2
    assert decompress(codec, stored, len(text), "manifest") == text
    for declared in (len(text) - 1, len(text) + 1):
        with pytest.raises(FormatError, match="declared|truncated"):
            decompress(codec, stored, declared, "manifest")
    with pytest.raises(FormatError, match="corrupt deflate|truncated"):
        decompress(codec, stored[: len(stored) // 2], len(text), "manifest")
    with pytest.raises(FormatError, match="trailing"):
        decompress(codec, stored + b"\0", len(text), "manifest")


def test_the_dictionary_codec_is_for_the_manifest_only():
    with pytest.raises(FormatError, match="unknown codec"):
        decompress("zlib-dict1", b"\x03\x00", 0, "tensor 'w' data")
