"""ONNX export: onnxruntime matches torch within 1e-4 relative on an MLP, a CNN and an LSTM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from prunekit.apps.models import LeNet5

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))


CASES = {
    "mlp": (_mlp, (4, 20)),
    "cnn": (LeNet5, (4, 1, 28, 28)),
    "lstm": (LSTMClassifier, (4, 6, 8)),
}


def _pruned(factory) -> nn.Module:
    torch.manual_seed(0)
    model = factory()
    prunekit.Pruner(model, 0.8)
    return prunekit.strip(model).eval()


def _max_rel_error(model: nn.Module, path, x: torch.Tensor) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_onnxruntime_matches_torch(name, tmp_path):
    factory, shape = CASES[name]
    model = _pruned(factory)
    path = tmp_path / f"{name}.onnx"
    result = prunekit.export_onnx(model, torch.randn(shape), path)
    assert result.path == path and result.bytes == path.stat().st_size and not result.quantized
    assert result.max_rel_error <= 1e-4
    g = torch.Generator().manual_seed(1)
    for batch in (shape[0], 7):  # a different batch size too: dim 0 is dynamic
        x = torch.randn((batch, *shape[1:]), generator=g)
        assert _max_rel_error(model, path, x) <= 1e-4
    # Pruned zeros reach the graph as zeros.
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    assert any(w.size > 100 and (w == 0).mean() > 0.75 for w in weights)


@pytest.mark.slow
def test_dynamic_int8_quantization_shrinks_and_stays_close(tmp_path):
    model = _pruned(lambda: nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)))
    x = torch.randn(8, 256)
    fp32 = prunekit.export_onnx(model, x, tmp_path / "fp32.onnx")
    int8 = prunekit.export_onnx(model, x, tmp_path / "int8.onnx", quantize_dynamic=True)
    assert int8.quantized and int8.bytes < 0.4 * fp32.bytes
    assert int8.max_rel_error < 0.05
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops


@pytest.mark.slow
def test_export_restores_training_mode_and_accepts_tuples(tmp_path):
    model = _mlp().train()
    prunekit.export_onnx(model, (torch.randn(2, 20),), tmp_path / "m.onnx")
    assert model.training


def test_bad_arguments_are_type_errors(tmp_path):
    with pytest.raises(TypeError, match="model must be"):
        prunekit.export_onnx("model", torch.randn(2), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="example_input"):
        prunekit.export_onnx(_mlp(), [1, 2], tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_mismatch_writes_nothing(tmp_path, monkeypatch):
    import prunekit.formats.onnx_export as ox

    monkeypatch.setattr(ox, "_check", lambda *args: 1.0)
    with pytest.raises(RuntimeError, match="differs from torch"):
        prunekit.export_onnx(_mlp(), torch.randn(2, 20), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
