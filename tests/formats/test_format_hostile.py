"""Hostile files: whatever is wrong, the reader raises FormatError saying what, and nothing else."""

from __future__ import annotations

import json
import lzma
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from formats_helpers import Replace, edit_manifest, read_manifest, rebuild, split_file
from torch import nn

import prunekit
import prunekit.formats as pf
from prunekit.formats import FormatError


def test_format_error_is_a_value_error():
    assert issubclass(FormatError, ValueError)
    assert prunekit.FormatError is FormatError


def test_every_truncation_is_a_format_error(small_file, int8_file):
    for data in (small_file, int8_file):
        for end in range(len(data)):
            with pytest.raises(FormatError):
                pf.loads(data[:end])


def test_every_single_bit_flip_is_a_format_error(small_file):
    for i in range(len(small_file)):
        for bit in range(8):
            flipped = bytearray(small_file)
            flipped[i] ^= 1 << bit
            with pytest.raises(FormatError):
                pf.loads(bytes(flipped))


def test_appended_bytes_are_a_format_error(small_file):
    with pytest.raises(FormatError, match="truncated or malformed"):
        pf.loads(small_file + b"\0")


def _set(index: int, key: str, value):
    def edit(m):
        m["tensors"][index][key] = value
    return edit


def _stream(index: int, j: int, k: int, value):
    def edit(m):
        m["tensors"][index]["streams"][j][k] = value
    return edit


# Index 0: conv.weight (bitmask), 1: fc.weight (gaps), 2: fc.bias (dense), 3: steps (int64 scalar).
MANIFEST_EDITS = [
    ("shape_2_40", _set(2, "shape", [2**40]), r"raw_size must be in"),
    ("shape_huge_dim", _set(2, "shape", [2**70]), r"shape\[0\] must be in"),
    ("shape_negative", _set(2, "shape", [-8]), r"shape\[0\] must be in"),
    ("shape_float", _set(2, "shape", [8.0]), r"must be an integer"),
    ("shape_bool", _set(2, "shape", [True]), r"must be an integer"),
    ("shape_not_list", _set(2, "shape", "8"), r"shape must be a list"),
    ("shape_too_many_dims", _set(2, "shape", [1] * 65 + [8]), r"at most 64 dimensions"),
    ("shape_permuted", _set(0, "shape", [2, 4, 3, 3]), r"checksum mismatch"),
    ("dtype_unknown", _set(2, "dtype", "complex64"), r"dtype must be one of"),
    ("dtype_not_values", _set(3, "dtype", "float32"), r"values stored as int64 cannot restore a float32"),
    ("values_unknown", _set(2, "values", "float8"), r"values must be one of"),
    ("nnz_above_numel", _set(2, "nnz", 9), r"nnz must be in"),
    ("nnz_wrong", _set(2, "nnz", 7), r"7 nonzero|8 nonzero values stored"),
    ("encoding_unknown", _set(2, "encoding", "rle"), r"encoding must be one of"),
    ("encoding_swapped", _set(2, "encoding", "bitmask"), r"must list 2 streams"),
    ("bits_out_of_range", _set(0, "bits", 9), r"bits must be in"),
    ("bits_on_integers", _set(3, "bits", 8), r"quantized values must be int8"),
    ("crc_altered", _set(2, "crc32", 12345), r"checksum mismatch"),
    ("crc_negative", _set(2, "crc32", -1), r"crc32 must be in"),
    ("name_empty", _set(2, "name", ""), r"name must be a non-empty string"),
    ("name_not_string", _set(2, "name", 5), r"name must be a non-empty string"),
    ("name_duplicate", _set(2, "name", "conv.weight"), r"appears twice"),
    ("names_swapped", lambda m: [m["tensors"][0].update(name="fc.weight"), m["tensors"][1].update(name="conv.weight")],
     r"checksum mismatch"),
    ("extra_key", _set(2, "extra", 1), r"unexpected keys \['extra'\]"),
    ("missing_key", lambda m: m["tensors"][2].pop("crc32"), r"missing keys \['crc32'\]"),
    ("stream_role", _stream(2, 0, 0, "values"), r"role must be 'data'"),
    ("stream_codec", _stream(2, 0, 1, "zstd"), r"codec must be one of"),
    ("stream_size_negative", _stream(2, 0, 2, -1), r"size must be in"),
    ("stream_size_beyond_payload", _stream(2, 0, 2, 10**9), r"size must be in"),
    ("stream_raw_size", _stream(2, 0, 3, 31), r"raw_size must be in"),
    ("stream_not_list", _set(2, "streams", [{"role": "data"}]),
     r"must be \[role, codec, size, raw_size\]"),
    ("streams_short", lambda m: m["tensors"][1]["streams"].pop(), r"must list 2 streams"),
    ("payload_not_covered", lambda m: m["tensors"].pop(), r"streams cover"),
    ("tensors_not_list", lambda m: m.update(tensors={}), r"'tensors' must be a list"),
    ("manifest_not_object", lambda m: Replace([]), r"manifest must be a JSON object"),
    ("manifest_extra_key", lambda m: m.update(x=1), r"unexpected keys \['x'\]"),
    ("metadata_not_strings", lambda m: m.update(metadata={"a": 1}), r"'metadata' must be an object of strings"),
]


@pytest.mark.parametrize("name, edit, match", MANIFEST_EDITS, ids=[e[0] for e in MANIFEST_EDITS])
def test_inconsistent_manifests_are_format_errors(small_file, name, edit, match):
    with pytest.raises(FormatError, match=match):
        pf.loads(edit_manifest(small_file, edit))


def test_the_editor_itself_preserves_a_valid_file(small_file, small_state):
    out = pf.loads(edit_manifest(small_file, lambda m: None))
    assert all(torch.equal(out[k], v) for k, v in small_state.items())


def test_absurd_declared_sizes_stop_before_allocating(small_file):
    # A consistent manifest claiming a 4 TiB tensor behind a tiny "compressed" stream.
    def edit(m):
        t = m["tensors"][2]
        t["shape"], t["nnz"] = [2**40], 2**40
        t["streams"] = [["data", "lzma", 32, 2**42]]
    with pytest.raises(FormatError, match="max_bytes"):
        pf.loads(edit_manifest(small_file, edit))


def test_max_bytes_limits_what_a_valid_file_may_allocate(small_file, tmp_path):
    with pytest.raises(FormatError, match="max_bytes"):
        pf.loads(small_file, max_bytes=100)
    path = tmp_path / "m.pkt"
    path.write_bytes(small_file)
    with pytest.raises(FormatError, match="exceeds max_bytes"):
        pf.load(path, max_bytes=len(small_file) - 1)


def _single(name: str, dtype: str, shape: list, nnz: int, encoding: str, streams: list, payload: bytes,
            values: str | None = None, bits: int | None = None) -> bytes:
    manifest = {"tensors": [{"name": name, "dtype": dtype, "shape": shape, "nnz": nnz, "encoding": encoding,
                             "values": values or dtype, "bits": bits, "crc32": 0, "streams": streams}],
                "metadata": {}}
    return rebuild(json.dumps(manifest).encode(), payload)


@pytest.mark.parametrize("case, match", [
    (("b", "bool", [5], 1, "gaps", [["gaps", "none", 1, 1]], b"\xff"), "trailing escape"),
    (("b", "bool", [5], 1, "gaps", [["gaps", "none", 1, 1]], b"\x05"), "reach position 5"),
    (("b", "bool", [5], 2, "bitmask", [["mask", "none", 1, 1]], b"\xe1"), "past the tensor"),
    (("b", "bool", [5], 2, "bitmask", [["mask", "none", 1, 1]], b"\x07"), "mark 3 entries"),
    (("b", "bool", [3], 1, "dense", [["data", "none", 3, 3]], b"\x00\x02\x00"), "other than 0 and 1"),
    (("v", "int8", [4], 2, "bitmask", [["mask", "none", 1, 1], ["values", "none", 2, 2]], b"\x05\x00\x07"),
     "holds zeros"),
    (("d", "float32", [4], 4, "dense", [["data", "lzma", 5, 16]], b"\x01\x02\x03\x04\x05"), "corrupt LZMA|truncated"),
])
def test_data_that_contradicts_the_manifest_is_a_format_error(case, match):
    with pytest.raises(FormatError, match=match):
        pf.loads(_single(*case))


def test_quantized_codes_and_scales_are_checked(int8_file):
    _, stored, payload = split_file(int8_file)
    text = json.dumps(read_manifest(int8_file)).encode()
    # conv.weight comes first: its 8 raw bytes of bfloat16 scales open the payload.
    infinite = struct.pack("<4H", *[0x7F80] * 4) + payload[8:]
    with pytest.raises(FormatError, match="scales must be finite"):
        pf.loads(rebuild(text, infinite))
    negative = struct.pack("<4H", *[0xBF80] * 4) + payload[8:]
    with pytest.raises(FormatError, match="non-negative"):
        pf.loads(rebuild(text, negative))
    with pytest.raises(FormatError, match=r"exceed ±7"):
        pf.loads(edit_manifest(int8_file, _set(0, "bits", 4)))


def test_a_decompression_bomb_is_capped():
    bomb = lzma.compress(bytes(10 << 20), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    data = _single("d", "float32", [4], 0, "dense", [["data", "lzma", len(bomb), 16]], bomb)
    with pytest.raises(FormatError, match="more than the declared 16 bytes"):
        pf.loads(data)


def _envelope(data: bytes, **meta) -> bytes:
    header, stored, payload = split_file(data)
    new_meta = {**header["__metadata__"], **meta}
    new_meta = {k: v for k, v in new_meta.items() if v is not None}
    arrays = {"manifest": np.frombuffer(stored, np.uint8), "payload": np.frombuffer(payload, np.uint8)}
    return safetensors.numpy.save(arrays, metadata=new_meta)


@pytest.mark.parametrize("meta, match", [
    (dict(version="2"), "unsupported prunekit format version '2'"),
    (dict(format=None), "without prunekit metadata"),
    (dict(format="other"), "without prunekit metadata"),
    (dict(manifest_codec="gzip"), "unknown codec 'gzip'"),
    (dict(manifest_size="abc"), "decimal integer"),
    (dict(manifest_size="99999999999999"), "decimal integer"),
    (dict(manifest_size="10"), "declared"),
    (dict(sha256="0" * 64), "checksum mismatch"),
    (dict(extra="1"), "must hold exactly"),
])
def test_envelope_metadata_is_validated(small_file, meta, match):
    with pytest.raises(FormatError, match=match):
        pf.loads(_envelope(small_file, **meta))


def _raw_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h.update(extra={"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}), "expected tensors"),
    (lambda h: h["manifest"].update(dtype="F32"), "must be a U8 tensor"),
    (lambda h: h["manifest"].update(shape=[1, 2]), "malformed shape"),
    (lambda h: h["manifest"].update(data_offsets=[0, 10**12]), "malformed shape|spans"),
    (lambda h: h["payload"].update(data_offsets=[0, h["payload"]["shape"][0]]), "spans"),
    (lambda h: h.pop("payload"), "expected tensors"),
])
def test_safetensors_header_is_validated(small_file, mutate, match):
    n = int.from_bytes(small_file[:8], "little")
    header = json.loads(small_file[8:8 + n])
    mutate(header)
    with pytest.raises(FormatError, match=match):
        pf.loads(_raw_header(header, small_file[8 + n:]))


@pytest.mark.parametrize("data, match", [
    (b"", "empty file"),
    (b"\x01\x02\x03", "shorter than a safetensors header"),
    (struct.pack("<Q", 2**63) + b"{}", "claims"),
    (struct.pack("<Q", 70_000) + b" " * 70_000, "exceeds the limit"),
    (struct.pack("<Q", 2) + b"[]", "must be a JSON object"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
    (struct.pack("<Q", 20_000) + b"[" * 20_000, "not valid JSON"),
    (struct.pack("<Q", 3) + b"NaN", "JSON constant NaN"),
    (struct.pack("<Q", 14) + b'{"a":1, "a":2}', "duplicate key"),
])
def test_malformed_headers_are_format_errors(data, match):
    with pytest.raises(FormatError, match=match):
        pf.loads(data)


def test_deeply_nested_manifest_is_a_format_error(small_file):
    _, _, payload = split_file(small_file)
    with pytest.raises(FormatError, match="not valid JSON"):
        pf.loads(rebuild(b"[" * 100_000, payload))


def test_duplicate_keys_in_the_manifest_are_a_format_error(small_file):
    _, _, payload = split_file(small_file)
    text = json.dumps(read_manifest(small_file))[:-1] + ', "metadata": {}}'
    with pytest.raises(FormatError, match="duplicate key"):
        pf.loads(rebuild(text.encode(), payload))


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_format_errors(seed):
    rng = np.random.default_rng(seed)
    with pytest.raises(FormatError):
        pf.loads(rng.bytes(int(rng.integers(1, 4096))))


def test_plain_safetensors_file_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "plain.safetensors")
    with pytest.raises(FormatError, match="plain safetensors files load with"):
        pf.load(tmp_path / "plain.safetensors")


class _Trap:
    """Unpickling this would create a file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_pickle_is_rejected_without_being_unpickled(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pkt"
    path.write_bytes(pickle.dumps({"w": _Trap(marker)}, protocol=protocol))
    with pytest.raises(FormatError, match="pickle"):
        pf.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("zipfile", [True, False])
def test_a_torch_save_checkpoint_is_rejected(tmp_path, zipfile):
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(FormatError, match="zip archive|pickle"):
        pf.load(path)


def test_a_directory_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="is a directory"):
        pf.load(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX fifos")
def test_a_fifo_is_a_format_error_and_is_never_opened(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        pf.load(fifo)  # opening a FIFO for reading would block: the check must come first


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        pf.load(tmp_path / "nope.pkt")


def test_an_empty_file_is_a_format_error(tmp_path):
    (tmp_path / "empty.pkt").write_bytes(b"")
    with pytest.raises(FormatError, match="empty file"):
        pf.load(tmp_path / "empty.pkt")


class _Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3, width)
        self.out = nn.Linear(width, 2)


def test_shape_mismatch_with_the_model_is_a_format_error_before_decoding(tmp_path):
    path = tmp_path / "net.pkt"
    pf.save(_Net(4), path)
    model = _Net(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FormatError, match=r"'fc.weight' has shape \[4, 3\] in the file but \[5, 3\] in the model"):
        pf.load(path, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_and_unexpected_keys_are_format_errors_when_strict(tmp_path):
    path = tmp_path / "part.pkt"
    pf.save({"fc.weight": torch.zeros(4, 3), "stray": torch.zeros(1)}, path)
    with pytest.raises(FormatError, match=r"missing \['fc.bias', 'out.bias', 'out.weight'\], unexpected \['stray'\]"):
        pf.load(path, _Net())
    model = _Net()
    state = pf.load(path, model, strict=False)
    assert torch.equal(model.fc.weight, torch.zeros(4, 3)) and "stray" in state


def test_a_manifest_bomb_is_capped_by_max_bytes(small_file):
    # A tiny manifest that claims to decode to 60 MiB: refused before inflating when max_bytes is lower.
    _, _, payload = split_file(small_file)
    data = rebuild(b"x", payload, manifest_size=str(60 << 20))
    with pytest.raises(FormatError, match="manifest_size"):
        pf.loads(data, max_bytes=1 << 20)
    with pytest.raises(FormatError, match="manifest_size"):
        pf.loads(rebuild(b"x", payload, manifest_size=str(65 << 20)))
