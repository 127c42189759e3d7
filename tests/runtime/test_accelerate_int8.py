"""accelerate(quantize="int8"): int8 candidates, tolerance, static calibration, end-to-end check and report.

Most tests run ``accelerate`` against a stand-in for :mod:`prunekit.runtime.int8` (``FakeInt8``: the
quantized computation in float64, the API of the real module) with injected timings, so what is tested is
the selection logic, independent of any kernel and of machine load. The tests at the end run the real
module where it imports.
"""

from __future__ import annotations

import importlib
import json
import types
from typing import ClassVar

import pytest
import torch
from torch import nn

import prunekit
from prunekit.runtime import accelerate
from prunekit.runtime.selection import int8_formats, plain_linear, relative_error

swap = importlib.import_module("prunekit.runtime.swap")
selection = importlib.import_module("prunekit.runtime.selection")


# -- a stand-in int8 module: the exact quantized computation in float64 ------------------------------------


def _quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.double().abs().amax(dim=1).clamp_min(1e-30) / 127
    return torch.round(w.double() / scale[:, None]).clamp(-127, 127), scale


def _calibrate_scale(inputs, *, method: str = "max") -> float:
    assert method == "max"
    return max(float(x.detach().abs().max()) for x in inputs) / 127


class FakeInt8Linear(nn.Module):
    """``y = s_x s_w (q(x) q(W)^T) + b`` in float64; records how it was built."""

    built: ClassVar[list[dict]] = []
    broken: ClassVar[set[str]] = set()

    @classmethod
    def from_linear(cls, linear, fmt="csr", *, blocksize=None, pattern=None, activations="dynamic",
                    granularity="tensor", act_scale=None):
        assert type(linear) is nn.Linear, "accelerate must hand Int8Linear a plain nn.Linear"
        if fmt in cls.broken:
            raise RuntimeError(f"int8 {fmt} not built here")
        if fmt == "dense" and activations == "dynamic" and granularity != "tensor":
            raise ValueError("fbgemm quantizes activations per tensor")  # as the real module
        m = cls()
        m.fmt, m.blocksize, m.pattern = fmt, blocksize, pattern
        m.activations, m.granularity, m.act_scale = activations, granularity, act_scale
        m.q, m.scale = _quantize_weight(linear.weight.detach())
        m.bias = None if linear.bias is None else linear.bias.detach().double()
        cls.built.append({"fmt": fmt, "blocksize": blocksize, "pattern": pattern, "activations": activations,
                          "granularity": granularity, "act_scale": act_scale, "weight": linear.weight.detach()})
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.double()
        if self.activations == "static":
            sx = torch.tensor(self.act_scale, dtype=torch.float64)
        elif self.granularity == "token":
            sx = xd.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127
        else:
            sx = xd.abs().max().clamp_min(1e-30) / 127
        y = (torch.round(xd / sx).clamp(-127, 127) @ self.q.t()) * sx * self.scale
        return (y if self.bias is None else y + self.bias).float()


@pytest.fixture
def fake(monkeypatch):
    FakeInt8Linear.built, FakeInt8Linear.broken = [], set()
    module = types.SimpleNamespace(Int8Linear=FakeInt8Linear, calibrate_scale=_calibrate_scale,
                                   available=lambda: (True, ""), INT8_FORMATS=("dense", "csr", "nm", "rows"))
    monkeypatch.setattr(selection, "_int8_module", lambda: (module, None))
    return module


def _timings(monkeypatch, table: dict[str, float]) -> list[list[str]]:
    """Replace the clock: every candidate takes ``table[name]`` ms (default 9.0); returns the names timed."""
    timed: list[list[str]] = []

    def fake_time(cands, x, repeats):
        timed.append(list(cands))
        return {n: table.get(n, 9.0) for n in cands}

    monkeypatch.setattr(swap, "time_candidates", fake_time)
    return timed


def _mlp(seed: int = 0, sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 96), nn.ReLU(), nn.Linear(96, 10))
    prunekit.Pruner(model, sparsity)
    return prunekit.strip(model)


def _out(model: nn.Module, x) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


# -- selection ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_chosen_only_when_faster(fake, monkeypatch, seed):
    model, x = _mlp(seed), torch.randn(7, 96)
    timed = _timings(monkeypatch, {"dense": 5.0, "csr": 2.0, "int8-dense": 3.0, "int8-csr": 0.5})
    fast, report = accelerate(model, x, quantize="int8", progress=False)
    assert all(set(names) >= {"dense", "csr", "int8-dense", "int8-csr"} for names in timed)  # fp32 stays
    for layer in report.layers:
        assert layer.format == "int8-csr" and layer.precision == "int8"
        module = dict(fast.named_modules())[layer.name]
        assert isinstance(module, FakeInt8Linear) and module.fmt == "csr"
        assert module.activations == "dynamic" and module.granularity == swap.DYNAMIC_GRANULARITY
        assert set(layer.int8_errors) >= {"int8-dense", "int8-csr"}
        assert all(0 < e <= swap.INT8_RTOL for e in layer.int8_errors.values())
    dense_built = [b for b in FakeInt8Linear.built if b["fmt"] == "dense"]
    assert dense_built and all(b["granularity"] == "tensor" for b in dense_built)  # fbgemm: per tensor
    assert report.precisions == {"0": "int8", "2": "int8", "4": "int8"}
    assert 0 < report.max_relative_error <= swap.INT8_RTOL
    assert report.max_relative_error == pytest.approx(relative_error(_out(fast, x), _out(model, x)), rel=1e-6)
    # The same layers when fp32 CSR is the fastest: nothing runs int8 although it was timed.
    _timings(monkeypatch, {"dense": 5.0, "csr": 0.4, "int8-dense": 3.0, "int8-csr": 0.5})
    fast, report = accelerate(model, x, quantize="int8", progress=False)
    assert set(report.choices.values()) == {"csr"} and set(report.precisions.values()) == {"fp32"}
    assert not any(isinstance(m, FakeInt8Linear) for m in fast.modules())
    assert report.max_relative_error <= 1e-5


def test_candidate_formats_follow_the_zeros(fake, monkeypatch):
    torch.manual_seed(0)
    nm = nn.Sequential(nn.Linear(64, 32))
    prunekit.Pruner(nm, 0.5, granularity=prunekit.NM(2, 4))
    rows = nn.Sequential(nn.Linear(64, 32))
    prunekit.Pruner(rows, 0.9, granularity=prunekit.Blocks((8, 1)))
    plain = nn.Sequential(nn.Linear(64, 32))
    prunekit.Pruner(plain, 0.9)
    timed = _timings(monkeypatch, {"int8-nm": 0.1, "int8-rows": 0.1})
    got = {}
    for name, model in (("nm", nm), ("rows", rows), ("plain", plain)):
        prunekit.strip(model)
        _, report = accelerate(model, torch.randn(4, 64), quantize="int8", progress=False)
        got[name] = report.layers[0]
    assert "int8-nm" in timed[0] and "int8-rows" not in timed[0]
    assert got["nm"].format == "int8-nm" and got["nm"].pattern == "2:4"
    assert "int8-rows" in timed[1] and got["rows"].format == "int8-rows" and got["rows"].blocksize == 8
    assert {"int8-nm", "int8-rows"}.isdisjoint(timed[2]) and {"int8-dense", "int8-csr"} <= set(timed[2])
    assert "8x1 rows" in str(report) or "int8" in str(report)
    built = {(b["fmt"], b["pattern"], b["blocksize"]) for b in FakeInt8Linear.built}
    assert ("nm", (2, 4), None) in built and ("rows", None, 8) in built


def test_int8_formats_helper():
    w = torch.zeros(8, 8)
    w[:, ::4] = 1.0
    assert int8_formats(w) == {"int8-dense": (None, None), "int8-csr": (None, None), "int8-nm": (None, (1, 4)),
                               "int8-rows": (8, None)}
    torch.manual_seed(0)
    w = torch.randn(6, 12) * (torch.rand(6, 12) > 0.5)  # unstructured zeros: no N:M, no shared rows
    assert set(int8_formats(w)) == {"int8-dense", "int8-csr"}


def test_layer_over_int8_tolerance_is_rejected_with_reason(fake, monkeypatch):
    model = _mlp(2)
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0  # input 0 does not reach the outputs ...
    x = torch.randn(6, 96)
    x[:, 0] = 1e4  # ... but sets every token's int8 scale: the other inputs round to zero
    _timings(monkeypatch, {"int8-dense": 0.1, "int8-csr": 0.1})
    fast, report = accelerate(model, x, quantize="int8", progress=False)
    first, second = report.layers[0], report.layers[1]
    assert first.precision == "fp32" and not any(n.startswith("int8") for n in first.timings_ms)
    assert all(e > swap.INT8_RTOL for e in first.int8_errors.values())
    notes = " ".join(first.notes)
    assert "int8-csr: rejected: relative error" in notes and f"int8_rtol={swap.INT8_RTOL:g}" in notes
    assert second.precision == "int8" and not any("rejected" in n for n in second.notes)  # control
    assert relative_error(_out(fast, x), _out(model, x)) <= swap.INT8_RTOL
    # A tighter tolerance rejects every int8 candidate: the model stays fp32 within rtol.
    _, report = accelerate(model, x, quantize="int8", int8_rtol=1e-9, progress=False)
    assert set(report.precisions.values()) == {"fp32"} and report.max_relative_error <= 1e-5


def test_static_calibration_scales_from_every_input(fake, monkeypatch):
    model = _mlp(3)
    calib = [torch.randn(5, 96), 3 * torch.randn(2, 96), torch.randn(9, 96)]
    seen: dict[str, list[torch.Tensor]] = {}  # independent: each layer's inputs on the fp32 model
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(a[0]))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for c in calib:
        _out(model, c)
    for h in hooks:
        h.remove()
    _timings(monkeypatch, {"int8-csr": 0.1})
    x = torch.randn(4, 96)
    fast, report = accelerate(model, x, quantize="int8", calibration=iter(calib), progress=False)
    for name, module in fast.named_modules():
        if name in seen:
            assert isinstance(module, FakeInt8Linear) and module.activations == "static"
            want = max(float(t.abs().max()) for t in seen[name]) / 127
            assert module.act_scale == pytest.approx(want, rel=1e-6)
    assert all(b["activations"] == "static" for b in FakeInt8Linear.built)
    assert report.activations == "static (3 calibration inputs)"
    want = max(relative_error(_out(fast, c), _out(model, c)) for c in calib)
    assert report.calibration_relative_error == pytest.approx(want, rel=1e-6)
    agree = sum(int((_out(fast, c).argmax(1) == _out(model, c).argmax(1)).sum()) for c in calib) / 16
    assert report.top1_agreement == pytest.approx(agree)


def test_calibration_inputs_as_tuples_and_mappings(fake, monkeypatch):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 8)

        def forward(self, x, scale=1.0):
            return self.a(x * scale)

    model = Two()
    _timings(monkeypatch, {"int8-dense": 0.1})
    _, report = accelerate(model, {"x": torch.randn(3, 16)}, quantize="int8", min_sparsity=0.0,
                           calibration=[(torch.randn(2, 16),), {"x": torch.randn(2, 16), "scale": 2.0}], progress=False)
    assert report.activations == "static (2 calibration inputs)" and report.layers[0].format == "int8-dense"
    assert FakeInt8Linear.built[0]["act_scale"] > 0


def test_end_to_end_failure_reverts_the_worst_int8_layers(fake, monkeypatch):
    model, x = _mlp(4), torch.randn(3, 96)
    _timings(monkeypatch, {"dense": 3.0, "csr": 2.0, "int8-csr": 0.1})
    real, calls = swap._max_error, []

    def first_call_fails(out, ref):
        calls.append(1)
        return 0.5 if len(calls) == 1 else real(out, ref)

    monkeypatch.setattr(swap, "_max_error", first_call_fails)
    fast, report = accelerate(_mlp(4), x, quantize="int8", inplace=True, progress=False)
    worst = max(report.layers, key=lambda layer: layer.int8_errors["int8-csr"])
    assert worst.format == "csr" and worst.precision == "fp32"  # ceil(3 / 8) = 1 layer back to fp32
    assert "int8-csr: reverted to fp32 csr by the end-to-end check" in worst.notes
    assert [layer.precision for layer in report.layers].count("int8") == 2
    assert isinstance(dict(fast.named_modules())[worst.name], prunekit.SparseLinear)
    assert any("relative error 5.00e-01 > int8_rtol" in n and "the 1 of 3 int8 layers" in n for n in report.notes)
    assert len(calls) == 2 and report.max_relative_error <= swap.INT8_RTOL
    assert report.max_relative_error == pytest.approx(relative_error(_out(fast, x), _out(model, x)), rel=1e-6)


def test_fallback_to_dense_when_dense_was_fastest_fp32(fake, monkeypatch):
    model, x = _mlp(5), torch.randn(3, 96)
    _timings(monkeypatch, {"dense": 1.0, "csr": 2.0, "int8-csr": 0.1})
    monkeypatch.setattr(swap, "_max_error", lambda out, ref: 0.0 if not any(
        isinstance(m, FakeInt8Linear) for m in fast_holder) else 0.9)
    fast_holder: list[nn.Module] = []
    real_swap = swap._swap

    def spy(model, chosen):
        fast_holder[:] = list(chosen.values())
        return real_swap(model, chosen)

    monkeypatch.setattr(swap, "_swap", spy)
    fast, report = accelerate(model, x, quantize="int8", progress=False)
    assert set(report.choices.values()) == {"dense"} and all(type(fast[i]) is nn.Linear for i in (0, 2, 4))
    assert any("the 3 of 3 int8 layers" in n for n in report.notes)


# -- report ---------------------------------------------------------------------------------------------------


def test_report_fields_and_text(fake, monkeypatch):
    model, x = _mlp(6), torch.randn(8, 96)
    _timings(monkeypatch, {"int8-csr": 0.1})
    _, report = accelerate(model, x, quantize="int8", progress=False)
    data = report.to_dict()
    json.dumps(data)
    assert data["quantize"] == "int8" and data["activations"].startswith("dynamic per-token")
    assert data["calibration_relative_error"] is None
    assert {"precision", "int8_errors"} <= set(data["layers"][0]) and data["layers"][0]["precision"] == "int8"
    want = float((_out(accelerate(model, x, quantize="int8", progress=False)[0], x).argmax(1)
                  == _out(model, x).argmax(1)).float().mean())
    assert report.top1_agreement == pytest.approx(want)
    text = str(report)
    assert "| precision |" in text.splitlines()[0] and "| int8 |" in text
    assert "quantize='int8': 3 of 3 layers run int8 (dynamic per-token" in text
    assert "output change vs the fp32 model: max relative error" in text and "top-1 agreement" in text


def test_no_quantize_report_unchanged(fake, monkeypatch):
    timed = _timings(monkeypatch, {})
    _, report = accelerate(_mlp(7), torch.randn(2, 96), progress=False)
    assert all(not n.startswith("int8") for names in timed for n in names)
    assert report.quantize is None and report.activations is None and report.top1_agreement is None
    assert set(report.precisions.values()) == {"fp32"} and "quantize=" not in str(report)
    assert FakeInt8Linear.built == []


def test_top1_only_for_classifier_outputs(fake, monkeypatch):
    _timings(monkeypatch, {"int8-csr": 0.1})
    model = _mlp(8)
    _, report = accelerate(model, torch.randn(2, 5, 96), quantize="int8", progress=False)  # (2, 5, 10): not logits
    assert report.top1_agreement is None
    _, report = accelerate(model, torch.randn(2, 96), quantize="int8", progress=False)
    assert report.top1_agreement is not None


def test_dense_layer_below_min_sparsity_tries_dense_int8(fake, monkeypatch):
    model = _mlp(9)
    with torch.no_grad():
        model[4].weight.normal_()  # dense
    timed = _timings(monkeypatch, {"int8-dense": 0.1})
    _, report = accelerate(model, torch.randn(4, 96), quantize="int8", progress=False)
    last = report.layers[2]
    assert timed[2] == ["dense", "int8-dense"] and last.format == "int8-dense"
    assert "only dense fp32 and dense int8 tried" in " ".join(last.notes)


def test_conv_stays_fp32_and_conv1d_gets_int8(fake, monkeypatch):
    transformers = pytest.importorskip("transformers.pytorch_utils")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 1)
            self.proj = transformers.Conv1D(24, 16)  # weight (in=16, out=24)

        def forward(self, x):
            return self.proj(self.conv(x).permute(0, 2, 3, 1))

    torch.manual_seed(0)
    model = Net()
    prunekit.Pruner(model, 0.8, layers=["conv", "proj"])
    prunekit.strip(model)
    _timings(monkeypatch, {"int8-csr": 0.01, "dense": 1.0})
    x = torch.randn(1, 3, 5, 5)
    fast, report = accelerate(model, x, quantize="int8", progress=False)
    conv, proj = report.layers
    assert conv.precision == "fp32" and "int8: skipped: convolutions stay fp32" in conv.notes
    assert not any(n.startswith("int8") for n in conv.timings_ms)
    assert proj.format == "int8-csr" and isinstance(fast.proj, FakeInt8Linear)
    assert torch.equal(FakeInt8Linear.built[-1]["weight"], model.proj.weight.detach().t())
    assert any("convolutions stay fp32" in n for n in report.notes)
    assert relative_error(_out(fast, x), _out(model, x)) <= swap.INT8_RTOL


def test_plain_linear_of_conv1d_and_subclass():
    transformers = pytest.importorskip("transformers.pytorch_utils")
    c = transformers.Conv1D(7, 5)
    lin = plain_linear(c)
    x = torch.randn(3, 5)
    assert type(lin) is nn.Linear and torch.allclose(lin(x), c(x), atol=1e-6)

    class Sub(nn.Linear):
        pass

    s = Sub(5, 4, bias=False)
    assert type(plain_linear(s)) is nn.Linear and torch.equal(plain_linear(s)(x), s(x))


# -- int8 unavailable / failing: notes, never a crash ----------------------------------------------------


def test_int8_unavailable_is_a_note_per_layer(monkeypatch):
    monkeypatch.setattr(selection, "_int8_module", lambda: (None, "no int8 runtime here"))
    _, report = accelerate(_mlp(10), torch.randn(3, 96), quantize="int8", progress=False)
    assert set(report.precisions.values()) == {"fp32"}
    assert all("int8: unavailable: no int8 runtime here" in layer.notes for layer in report.layers)
    assert any("int8 unavailable" in n and "no int8 runtime here" in n for n in report.notes)
    assert report.max_relative_error <= 1e-5


def test_int8_available_false_and_one_broken_format(fake, monkeypatch):
    _timings(monkeypatch, {"int8-dense": 0.2, "int8-csr": 0.1})
    FakeInt8Linear.broken = {"csr"}
    _, report = accelerate(_mlp(11), torch.randn(3, 96), quantize="int8", progress=False)
    assert set(report.choices.values()) == {"int8-dense"}
    assert "int8-csr: unavailable: RuntimeError: int8 csr not built here" in report.layers[0].notes
    # Without the compiled int8 kernels only dense int8 (fbgemm) is tried; the note says why.
    FakeInt8Linear.broken = set()
    monkeypatch.setattr(fake, "available", lambda: (False, "compiler missing"))
    timed = _timings(monkeypatch, {"int8-dense": 0.2, "int8-csr": 0.1})
    _, report = accelerate(_mlp(11), torch.randn(3, 96), quantize="int8", progress=False)
    assert set(report.choices.values()) == {"int8-dense"} and all("int8-csr" not in t for t in timed)
    assert "int8-csr: skipped: int8 kernels not available (compiler missing)" in report.layers[0].notes
    assert any("sparse int8 not tried" in n and "compiler missing" in n for n in report.notes)


# -- bad arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"quantize": "int4"}, ValueError, "quantize"),
    ({"quantize": "INT8"}, ValueError, "quantize"),
    ({"quantize": True}, ValueError, "quantize"),
    ({"calibration": [torch.randn(2, 96)]}, ValueError, "only used with quantize='int8'"),
    ({"quantize": "int8", "calibration": []}, ValueError, "calibration is empty"),
    ({"quantize": "int8", "calibration": iter(())}, ValueError, "calibration is empty"),
    ({"quantize": "int8", "calibration": torch.randn(2, 96)}, TypeError, "iterable of model inputs"),
    ({"quantize": "int8", "calibration": 5}, TypeError, "iterable of model inputs"),
    ({"quantize": "int8", "calibration": {"x": torch.randn(2, 96)}}, TypeError, "iterable of model inputs"),
    ({"quantize": "int8", "calibration": [torch.randn(2, 96), 3.0]}, TypeError, r"calibration\[1\]"),
    ({"quantize": "int8", "int8_rtol": 0.0}, ValueError, "int8_rtol"),
    ({"quantize": "int8", "int8_rtol": "0.1"}, TypeError, "int8_rtol"),
])
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        accelerate(_mlp(), torch.randn(1, 96), progress=False, **kwargs)


# -- the real int8 module -----------------------------------------------------------------------------------


def _real_int8():
    int8 = pytest.importorskip("prunekit.runtime.int8")
    ok, why = int8.available()
    if not ok:
        pytest.skip(f"int8 unavailable here: {why}")
    return int8


@pytest.mark.parametrize("batch,static", [(1, False), (16, False), (16, True)])
def test_real_int8_end_to_end(monkeypatch, batch, static):
    int8 = _real_int8()
    model = _mlp(12)
    _timings(monkeypatch, {"int8-csr": 0.1, "int8-dense": 0.2})
    x = torch.randn(batch, 96)
    calib = [torch.randn(8, 96), torch.randn(8, 96)] if static else None
    fast, report = accelerate(model, x, quantize="int8", calibration=calib, progress=False)
    assert set(report.choices.values()) == {"int8-csr"}
    assert all(isinstance(m, int8.Int8Linear) for m in (fast[0], fast[2], fast[4]))
    err = relative_error(_out(fast, x), _out(model, x))
    assert err <= swap.INT8_RTOL and err == pytest.approx(report.max_relative_error, rel=1e-6, abs=1e-9)
    assert (report.calibration_relative_error is not None) == static


def test_real_int8_timed_selection_is_consistent():
    _real_int8()
    model, x = _mlp(13), torch.randn(32, 96)
    _, report = accelerate(model, x, quantize="int8", repeats=3, progress=False)
    for layer in report.layers:
        assert layer.format == min(layer.timings_ms, key=layer.timings_ms.get)
        assert {"dense", "int8-dense", "int8-csr"} <= set(layer.timings_ms) | {k for k in layer.int8_errors}
    assert report.max_relative_error <= (swap.INT8_RTOL if "int8" in report.precisions.values() else 1e-5)
