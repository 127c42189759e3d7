"""Symmetric per-channel int quantization: zeros exact, error within half a step, file = in-memory result."""

from __future__ import annotations

import pytest
import torch
from formats_helpers import make_sparse, read_manifest

import prunekit.formats as pf
from prunekit.formats.quantize import bf16_round_up, dequantize


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
@pytest.mark.parametrize("shape", [(16, 32), (6, 1, 5, 5), (3, 4, 2, 2, 2), (5, 1)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_error_is_at_most_half_a_step_per_channel(bits, shape, sparsity):
    w = make_sparse(shape, torch.float32, sparsity, seed=bits) * 0.1
    qt = pf.quantize_int8(w, bits)
    err = _rows((w - qt.dequantize()).abs()).amax(dim=1)
    assert (err <= qt.scale / 2 * (1 + 1e-6)).all()
    qmax = 2 ** (bits - 1) - 1
    assert int(qt.q.abs().max()) <= qmax
    # The scale covers each channel's largest weight, rounded up to a bfloat16 value.
    peak = _rows(w.abs()).amax(dim=1)
    assert (qt.scale * qmax >= peak).all()
    assert torch.equal(qt.scale, qt.scale.bfloat16().float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_zeros_stay_exactly_zero_through_the_file(dtype, sparsity):
    w = make_sparse((12, 40), dtype, sparsity, seed=5)
    out = pf.loads(pf.dumps({"w": w}, quantize="int8"))["w"]
    assert out.dtype == dtype
    assert bool((out[w == 0] == 0).all())
    # And what the file restores is exactly the in-memory quantization.
    assert torch.equal(out, pf.quantize_int8(w).dequantize())


def test_only_weights_are_quantized_biases_and_integers_stay_exact():
    state = {"w": make_sparse((8, 8), torch.float32, 0.5), "b": torch.randn(8), "n": torch.tensor(3),
             "empty": torch.zeros(0, 4)}
    data = pf.dumps(state, quantize="int8")
    entries = {t["name"]: t for t in read_manifest(data)["tensors"]}
    assert entries["w"]["bits"] == 8 and entries["w"]["values"] == "int8"
    assert [entries[k]["bits"] for k in ("b", "n", "empty")] == [None, None, None]
    out = pf.loads(data)
    assert torch.equal(out["b"], state["b"]) and torch.equal(out["n"], state["n"])


def test_rows_of_zeros_get_a_zero_scale():
    w = torch.zeros(3, 5)
    w[1, 2] = -2.0
    qt = pf.quantize_int8(w)
    assert qt.scale[0] == 0 and qt.scale[2] == 0
    assert torch.equal(qt.dequantize()[[0, 2]], torch.zeros(2, 5))
    assert abs(float(qt.dequantize()[1, 2]) + 2.0) <= float(qt.scale[1]) / 2


def test_coarser_grids_make_smaller_files():
    w = make_sparse((128, 256), torch.float32, 0.8, seed=9)
    sizes = [len(pf.dumps({"w": w}, quantize=q)) for q in (None, "int8", "int6", "int4")]
    assert sizes == sorted(sizes, reverse=True)


def test_bf16_round_up_never_rounds_down():
    x = torch.rand(10_000) * torch.logspace(-30, 30, 10_000)
    up = bf16_round_up(x)
    assert (up >= x).all()
    assert torch.equal(up, up.bfloat16().float())
    assert (up <= x * (1 + 2**-7)).all()


def test_dequantize_restores_the_dtype():
    q = torch.tensor([[1, -2], [0, 3]], dtype=torch.int8)
    out = dequantize(q, torch.tensor([0.5, 2.0]), torch.float16)
    assert out.dtype == torch.float16 and out.tolist() == [[0.5, -1.0], [0.0, 6.0]]


@pytest.mark.parametrize("w, match", [
    (torch.tensor([[float("nan"), 1.0]]), "NaN or Inf"),
    (torch.tensor([[1, 2]]), "floating tensor"),
    (torch.tensor(1.0), "floating tensor"),
])
def test_quantize_rejects_bad_weights(w, match):
    with pytest.raises(ValueError, match=match):
        pf.quantize_int8(w)


@pytest.mark.parametrize("bits", [1, 9])
def test_quantize_rejects_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        pf.quantize_int8(torch.ones(2, 2), bits)


def test_saving_nan_weights_with_int8_is_an_error():
    with pytest.raises(ValueError, match="NaN or Inf"):
        pf.dumps({"w": torch.tensor([[float("nan"), 1.0]])}, quantize="int8")
