"""accelerate(): selection, replacement, oracle check, report and argument checks."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

import prunekit
from prunekit.runtime import AccelerationReport, SparseLinear, accelerate
from prunekit.runtime.selection import blocky_blocksize, relative_error

from .test_modules import _pruned_linear


def _mlp(seed: int = 0, sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 96), nn.ReLU(), nn.Linear(96, 10))
    prunekit.Pruner(model, sparsity)
    return prunekit.strip(model)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3)
        self.head = nn.Sequential(nn.Linear(8, 64), nn.ReLU())
        self.proj = nn.Linear(64, 16)
        self.dense = nn.Linear(16, 5)  # left unpruned
        self.unused = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 4, T)
        h = self.conv(x).transpose(1, 2)  # (N, T', 8)
        return self.dense(self.proj(self.head(h)))


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("batch", [1, 32])
def test_mlp_matches_oracle_and_reports(batch):
    model = _mlp()
    x = torch.randn(batch, 96)
    fast, report = accelerate(model, x, repeats=3, progress=False)
    assert isinstance(report, AccelerationReport)
    assert relative_error(_out(fast, x), _out(model, x)) <= 1e-5
    assert report.max_relative_error <= 1e-5
    assert [layer.name for layer in report.layers] == ["0", "2", "4"]
    for layer in report.layers:
        assert layer.input_shape == (batch, layer.in_features)
        assert layer.sparsity == pytest.approx(0.9, abs=0.01)
        assert set(layer.timings_ms) >= {"dense", "csr"}  # selection recorded
        assert layer.format == min(layer.timings_ms, key=layer.timings_ms.get)
        module = dict(fast.named_modules())[layer.name]
        assert isinstance(module, SparseLinear if layer.format != "dense" else nn.Linear)
        if layer.format != "dense":
            assert module.fmt == layer.format
    assert report.choices == {layer.name: layer.format for layer in report.layers}
    data = report.to_dict()
    json.dumps(data)
    assert {"name", "in_features", "out_features", "input_shape", "sparsity", "format", "blocksize",
            "timings_ms", "notes", "speedup"} <= set(data["layers"][0])
    assert {"max_relative_error", "repeats", "threads", "notes", "layers"} <= set(data)
    table = str(report)
    assert table.startswith("| layer |") and "max relative error" in table


def test_inplace_false_leaves_original_untouched():
    model = _mlp(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    model.train()
    fast, _ = accelerate(model, torch.randn(4, 96), formats=("csr",), progress=False)
    assert fast is not model and model.training
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(isinstance(fast[i], SparseLinear) for i in (0, 2, 4))


def test_inplace_true_modifies_model():
    model = _mlp(2)
    fast, report = accelerate(model, torch.randn(4, 96), formats=("csr",), inplace=True, progress=False)
    assert fast is model and isinstance(model[0], SparseLinear)
    assert all(layer.timings_ms == {} for layer in report.layers)  # one format: nothing to time


def test_non_linear_layers_min_sparsity_and_3d_input():
    torch.manual_seed(0)
    model = ConvNet()
    prunekit.Pruner(model, 0.8, layers=["head.*", "proj", "conv", "unused"])
    prunekit.strip(model)
    x = torch.randn(2, 4, 9)
    fast, report = accelerate(model, x, formats=("csr",), repeats=2, progress=False)
    assert isinstance(fast.conv, nn.Conv1d)
    assert isinstance(fast.head[0], SparseLinear) and isinstance(fast.proj, SparseLinear)
    assert isinstance(fast.dense, nn.Linear) and isinstance(fast.unused, nn.Linear)
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["head.0"].input_shape == (2, 7, 8)
    assert "min_sparsity" in " ".join(by_name["dense"].notes)
    assert "not called" in " ".join(by_name["unused"].notes) and by_name["unused"].input_shape is None
    assert relative_error(_out(fast, x), _out(model, x)) <= 1e-5
    # min_sparsity=0 times the dense layer too.
    _, report = accelerate(model, x, min_sparsity=0.0, formats=("dense", "csr"), repeats=2, progress=False)
    assert {layer.name: bool(layer.timings_ms) for layer in report.layers}["dense"]


def test_blocky_weight_gets_bsr_candidate():
    lin = _pruned_linear(64, 32, 0.8, 0, block=8)
    assert blocky_blocksize(lin.weight) in (8, 16)
    assert blocky_blocksize(_pruned_linear(64, 32, 0.9, 0).weight) is None
    fast, report = accelerate(nn.Sequential(lin), torch.randn(8, 32), repeats=2, progress=False)
    assert "bsr" in report.layers[0].timings_ms
    assert relative_error(_out(fast, torch.ones(3, 32)), _out(lin, torch.ones(3, 32))) <= 1e-5


def test_sparse_failure_falls_back_to_dense(monkeypatch):
    import prunekit.runtime.selection as select

    def broken(*args, **kwargs):
        raise RuntimeError("no MKL sparse here")

    monkeypatch.setattr(select.SparseLinear, "from_linear", broken)
    model = _mlp(3)
    fast, report = accelerate(model, torch.randn(2, 96), repeats=2, progress=False)
    assert all(isinstance(fast[i], nn.Linear) for i in (0, 2, 4))
    assert set(report.choices.values()) == {"dense"}
    assert any("failed on this platform" in note for note in report.notes)
    assert "unavailable" in " ".join(report.layers[0].notes)


def test_mismatch_raises_and_restores(monkeypatch):
    acc = importlib.import_module("prunekit.runtime.swap")

    monkeypatch.setattr(acc, "_max_error", lambda out, ref: 1.0)
    model = _mlp(4)
    with pytest.raises(RuntimeError, match="relative error"):
        accelerate(model, torch.randn(2, 96), formats=("csr",), inplace=True, progress=False)
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 4))


def test_model_that_is_a_linear_and_shared_layer():
    lin = _pruned_linear(40, 30, 0.9, 0)
    fast, _ = accelerate(lin, torch.randn(3, 30), formats=("csr",), progress=False)
    assert isinstance(fast, SparseLinear)
    shared = _pruned_linear(30, 30, 0.9, 1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    fast, report = accelerate(model, torch.randn(3, 30), formats=("csr",), progress=False)
    assert isinstance(fast[0], SparseLinear) and fast[0] is fast[2]
    assert len(report.layers) == 1


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"formats": ("dense", "coo")}, ValueError, "formats"),
    ({"formats": ()}, ValueError, "formats"),
    ({"formats": "csr"}, TypeError, "formats"),
    ({"min_sparsity": 1.5}, ValueError, "min_sparsity"),
    ({"min_sparsity": "0.5"}, TypeError, "min_sparsity"),
    ({"repeats": 0}, ValueError, "repeats"),
    ({"repeats": 2.5}, TypeError, "repeats"),
    ({"rtol": 0.0}, ValueError, "rtol"),
    ({"inplace": 1}, TypeError, "inplace"),
    ({"progress": None}, TypeError, "progress"),
])
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        accelerate(_mlp(), torch.randn(1, 96), **kwargs)


def test_bad_model_and_input():
    with pytest.raises(TypeError, match="model"):
        accelerate("model", torch.randn(1, 96))
    with pytest.raises(TypeError, match="example_input"):
        accelerate(_mlp(), 3.0)


def test_exported_from_package():
    assert prunekit.accelerate is accelerate and "accelerate" in prunekit.__all__
