"""Block-wise decoding gives the same tensors whatever the block size, and streams are read exactly.

With ``BLOCK`` shrunk to a few entries, every tensor spans many blocks: runs of
gap escapes and bitmask bytes cross block boundaries, int8 rows are split
between blocks, scales are read in several chunks. The reference is the
tensor that was saved (or, quantized, ``quantize_int8(...).dequantize()``).
"""

from __future__ import annotations

import pytest
import torch
from formats_helpers import bits_of, make_sparse, read_manifest

import prunekit.formats as pf
from prunekit.formats import codecs, decoding
from prunekit.formats.codecs import BytesSource, StreamReader


@pytest.fixture(params=[1, 7, 64, 1 << 16], ids=lambda b: f"block{b}")
def block(request, monkeypatch):
    monkeypatch.setattr(decoding, "BLOCK", request.param)
    monkeypatch.setattr(decoding, "_SCALE_ROWS", max(1, request.param // 4))
    monkeypatch.setattr(decoding, "TINY", 0)  # every tensor through the block path
    return request.param


def _gappy(n: int) -> torch.Tensor:
    # Nonzeros separated by runs longer than 255 (escape bytes) and by none at all.
    t = torch.zeros(n)
    t[[0, 1, 2, 300, 301, 900, 1800, n - 1]] = torch.tensor([1.0, -2.0, 3.0, -0.0, float("nan"), 5.0, 6.0, 7.0])
    return t


STATES = {
    "mixed": {"w": make_sparse((37, 29), torch.float32, 0.7, seed=1), "b": make_sparse((37,), torch.float32, 0.0),
              "m": make_sparse((333,), torch.bool, 0.6, seed=2), "h": make_sparse((9, 13), torch.bfloat16, 0.5, seed=3),
              "i": make_sparse((50,), torch.int64, 0.9, seed=4), "u": make_sparse((70,), torch.uint8, 0.3, seed=5)},
    "gaps": {"g": _gappy(2000), "gb": _gappy(2000) != 0},
}


@pytest.mark.parametrize("state", list(STATES))
def test_lossless_round_trip_at_any_block_size(block, state):
    tensors = STATES[state]
    out = pf.loads(pf.dumps(tensors))
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and bits_of(out[name]) == bits_of(t)


def test_the_gap_state_uses_every_layout():
    encodings = {t["name"]: t["encoding"] for t in read_manifest(pf.dumps(STATES["gaps"]))["tensors"]}
    assert encodings == {"g": "gaps", "gb": "gaps"}
    kinds = {t["encoding"] for t in read_manifest(pf.dumps(STATES["mixed"]))["tensors"]}
    assert kinds == {"dense", "bitmask", "gaps"}


@pytest.mark.parametrize("quantize", ["int8", "int4", "fp16"])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.97])
def test_quantized_round_trip_at_any_block_size(block, quantize, sparsity):
    w = make_sparse((23, 3, 5), torch.float32, sparsity, seed=7)
    out = pf.loads(pf.dumps({"w": w}, quantize=quantize))["w"]
    if quantize == "fp16":
        expected = w.half().float()
    else:
        expected = pf.quantize_int8(w, int(quantize[3:])).dequantize()
    assert bits_of(out) == bits_of(expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_one_scale_per_entry(block, dtype):
    w = make_sparse((301, 1), dtype, 0.5, seed=8)
    out = pf.loads(pf.dumps({"w": w}, quantize="int8"))["w"]
    assert bits_of(out) == bits_of(pf.quantize_int8(w).dequantize())


def test_a_stream_reader_reads_in_any_pieces():
    data = bytes(range(256)) * 40
    codec, stored = codecs.compress(data)
    assert codec == "lzma"
    for piece in (1, 3, 1000, len(data)):
        reader = StreamReader(codec, BytesSource(stored), 0, len(stored), len(data), "s")
        got = b"".join(bytes(reader.read(min(piece, reader.remaining))) for _ in range(-(-len(data) // piece)))
        reader.close()
        assert got == data


def test_a_stream_reader_never_decodes_past_what_it_is_asked(monkeypatch):
    # 10 MiB of zeros behind a few KB: asking for 10 bytes decodes about 10 bytes, not the bomb.
    monkeypatch.setattr(codecs, "IN_CHUNK", 64)
    _, stored = codecs.compress(bytes(10 << 20))
    reader = StreamReader("lzma", BytesSource(stored), 0, len(stored), 16, "s")
    assert bytes(reader.read(16)) == bytes(16)
    with pytest.raises(pf.FormatError, match="more than the declared 16 bytes"):
        reader.close()
    with pytest.raises(pf.FormatError, match="needs more than the declared"):
        StreamReader("none", BytesSource(b"abc"), 0, 3, 3, "s").read(4)
