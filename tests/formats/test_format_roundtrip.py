"""Lossless round trips: every dtype, sparsity and shape comes back bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from formats_helpers import bits_of, make_sparse, read_manifest
from torch import nn

import prunekit
import prunekit.formats as pf
from prunekit.formats import codecs
from prunekit.formats.dtypes import by_torch, nonzero_mask, to_numpy
from prunekit.formats.encoding import _layouts, encode

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
SHAPES = [(), (0,), (3, 0, 2), (7,), (5, 6), (2, 3, 4, 5), (1, 1, 1, 1, 1, 9)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lossless_round_trip_is_bit_exact(dtype, shape, sparsity):
    t = make_sparse(shape, dtype, sparsity, seed=math.prod(shape) + 1)
    out = pf.loads(pf.dumps({"t": t}))["t"]
    assert out.dtype == t.dtype and out.shape == t.shape
    assert bits_of(out) == bits_of(t)


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_large_tensor_round_trips_and_uses_a_sparse_encoding_when_sparse(sparsity):
    t = make_sparse((300, 784), torch.float32, sparsity)
    data = pf.dumps({"w": t})
    assert torch.equal(pf.loads(data)["w"], t)
    encoding = read_manifest(data)["tensors"][0]["encoding"]
    assert (encoding == "dense") == (sparsity == 0.0)


def test_special_float_values_survive_bitwise():
    t = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 0.0, 0.0, 0.0, 0.0])
    out = pf.loads(pf.dumps({"t": t}))["t"]
    assert bits_of(out) == bits_of(t)


def test_noncontiguous_and_grad_tensors_are_saved_as_their_values():
    base = torch.randn(6, 4, requires_grad=True)
    state = {"transposed": base.t(), "sliced": base[::2, 1:], "expanded": torch.ones(3, 1).expand(3, 5)}
    out = pf.loads(pf.dumps(state))
    for name, t in state.items():
        assert torch.equal(out[name], t.detach()) and out[name].is_contiguous()


def test_order_names_and_user_metadata_round_trip(small_state):
    data = pf.dumps(small_state, metadata={"model": "LeNet5", "sparsity": "0.9"})
    assert list(pf.loads(data)) == list(small_state)
    from prunekit.formats.container import parse

    assert parse(data).metadata == {"model": "LeNet5", "sparsity": "0.9"}


def test_pruned_model_saves_and_loads_into_a_fresh_model(tmp_path):
    from prunekit.apps.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5()
    prunekit.Pruner(model, 0.9)
    prunekit.strip(model)
    path = tmp_path / "lenet.pkt"
    written = prunekit.save(model, path)
    assert written == path.stat().st_size
    fresh = LeNet5()
    state = prunekit.load(path, fresh)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(fresh(x), model(x))
    assert set(state) == set(model.state_dict())
    # 90% sparse fp32 weights: well under half of the dense size.
    assert written < 0.45 * sum(t.numel() * 4 for t in model.state_dict().values())


def test_lstm_state_round_trips_into_the_module():
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, num_layers=2)
    prunekit.Pruner(lstm, 0.8)
    prunekit.strip(lstm)
    fresh = nn.LSTM(8, 16, num_layers=2)
    fresh.load_state_dict(pf.loads(pf.dumps(lstm)))
    x = torch.randn(5, 2, 8)
    assert torch.equal(fresh(x)[0], lstm(x)[0])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_writer_keeps_the_smallest_encoding(sparsity, quantize):
    t = make_sparse((64, 200), torch.float32, sparsity, seed=3)
    enc = encode("w", t, quantize)
    values = to_numpy(pf.quantize_int8(t).q if quantize else t)
    sizes = []
    for _, layout in _layouts(values, nonzero_mask(values), by_torch(torch.int8 if quantize else t.dtype)):
        sizes.append(sum(len(codecs.compress(raw, values.itemsize if role in ("data", "values") else 1)[1])
                         for role, raw in layout))
    scales = sum(len(s.stored) for s in enc.streams if s.role == "scales")
    assert enc.stored_size - scales == min(sizes)


def test_fp16_storage_restores_the_original_dtype():
    t = make_sparse((10, 10), torch.float32, 0.5)
    out = pf.loads(pf.dumps({"w": t, "b": torch.randn(10)}, quantize="fp16"))
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], t.half().float())
    assert read_manifest(pf.dumps({"w": t}, quantize="fp16"))["tensors"][0]["values"] == "float16"


@pytest.mark.parametrize("bad, error, match", [
    ({"z": torch.zeros(2, dtype=torch.complex64)}, ValueError, "cannot be stored"),
    ({"x": [1.0, 2.0]}, TypeError, "must be a tensor"),
    ({3: torch.zeros(2)}, TypeError, "keys must be"),
    ({"": torch.zeros(2)}, TypeError, "keys must be"),
    ("weights", TypeError, "expected an nn.Module"),
])
def test_save_rejects_what_it_cannot_store(bad, error, match, tmp_path):
    with pytest.raises(error, match=match):
        pf.save(bad, tmp_path / "x.pkt")
    assert not (tmp_path / "x.pkt").exists()


@pytest.mark.parametrize("quantize", ["int9", "int1", "int", "uint8", 8, "fp32"])
def test_save_rejects_unknown_quantize_values(quantize):
    with pytest.raises(ValueError, match="quantize must be"):
        pf.dumps({"w": torch.zeros(2, 2)}, quantize=quantize)


def test_save_rejects_non_string_metadata():
    with pytest.raises(TypeError, match="metadata"):
        pf.dumps({"w": torch.zeros(2)}, metadata={"a": 1})


def test_large_tensors_choose_on_a_sample_and_still_pick_the_smallest():
    from prunekit.formats.encoding import SAMPLE

    t = make_sparse((600, 500), torch.float32, 0.9, seed=4)
    assert t.numel() > SAMPLE
    enc = encode("w", t, "int8")
    values = to_numpy(pf.quantize_int8(t).q)
    sizes = {name: sum(len(codecs.compress(raw, 1)[1]) for _, raw in layout)
             for name, layout in _layouts(values, nonzero_mask(values), by_torch(torch.int8))}
    scales = sum(len(s.stored) for s in enc.streams if s.role == "scales")
    assert enc.stored_size - scales <= 1.01 * min(sizes.values())
    assert torch.equal(pf.loads(pf.dumps({"w": t}, quantize="int8"))["w"], pf.quantize_int8(t).dequantize())


def test_names_must_be_unicode_text():
    with pytest.raises(ValueError, match="not valid Unicode"):
        pf.dumps({"w\udc80": torch.zeros(2)})
    assert list(pf.loads(pf.dumps({"Gewichte.ü→λ": torch.zeros(2)}))) == ["Gewichte.ü→λ"]


@pytest.mark.parametrize("max_bytes", [-1, 1.5, "10"])
def test_max_bytes_must_be_a_non_negative_integer(max_bytes, small_file, tmp_path):
    with pytest.raises((TypeError, ValueError), match="max_bytes"):
        pf.loads(small_file, max_bytes=max_bytes)
    (tmp_path / "f").write_bytes(small_file)
    with pytest.raises((TypeError, ValueError), match="max_bytes"):
        pf.load(tmp_path / "f", max_bytes=max_bytes)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_same_model_same_bytes(small_state, quantize):
    first = pf.dumps(small_state, quantize=quantize, metadata={"b": "2", "a": "1", "c": "3"})
    for _ in range(8):  # safetensors' own header order varies from call to call
        assert pf.dumps(small_state, quantize=quantize, metadata={"b": "2", "a": "1", "c": "3"}) == first
    import safetensors.numpy

    assert sorted(safetensors.numpy.load(first)) == ["manifest", "payload"]  # still a valid safetensors file
