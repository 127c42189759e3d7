"""prunekit.apps.models: LeNet-5 and LeNet-300-100."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.apps.models import LeNet5, LeNet300100
from prunekit.core.scope import resolve_scope


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _linear(i: int, o: int) -> int:
    return i * o + o


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def test_lenet300100_parameter_count():
    assert _n_params(LeNet300100()) == 266_610  # the number quoted by Han et al. 2015 (267K)
    assert _n_params(LeNet300100()) == _linear(784, 300) + _linear(300, 100) + _linear(100, 10)
    assert _n_params(LeNet300100(num_classes=3, in_features=64)) == _linear(64, 300) + _linear(300, 100) + _linear(100, 3)


def test_lenet5_parameter_count():
    expected = _conv(1, 6, 5) + _conv(6, 16, 5) + _linear(400, 120) + _linear(120, 84) + _linear(84, 10)
    assert expected == 61_706
    assert _n_params(LeNet5()) == expected
    assert _n_params(LeNet5(num_classes=5, in_channels=3)) == expected - _conv(1, 6, 5) + _conv(3, 6, 5) - 5 * 84 - 5


def test_lenet5_shapes_through_the_network():
    model = LeNet5()
    seen = {}
    for name in ("conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc2"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape)))
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert seen == {"conv1": (3, 6, 28, 28), "pool1": (3, 6, 14, 14), "conv2": (3, 16, 10, 10),
                    "pool2": (3, 16, 5, 5), "flatten": (3, 400), "fc1": (3, 120), "fc2": (3, 84)}
    assert LeNet5(num_classes=7, in_channels=3)(torch.randn(2, 3, 28, 28)).shape == (2, 7)


def test_lenet300100_flattens_any_input_layout():
    torch.manual_seed(0)
    model = LeNet300100()
    images = torch.rand(4, 1, 28, 28)
    out = model(images)
    assert out.shape == (4, 10)
    assert torch.equal(out, model(images.reshape(4, 784)))
    assert LeNet300100(num_classes=3, in_features=64)(torch.rand(5, 1, 8, 8)).shape == (5, 3)


def test_lenet300100_matches_a_hand_written_forward():
    torch.manual_seed(0)
    model = LeNet300100()
    x = torch.rand(6, 784)
    h = torch.relu(x @ model.fc1.weight.T + model.fc1.bias)
    h = torch.relu(h @ model.fc2.weight.T + model.fc2.bias)
    assert torch.allclose(model(x), h @ model.fc3.weight.T + model.fc3.bias, atol=1e-6)


def test_prunable_weights_and_state_dict_keys():
    assert [t.name for t in resolve_scope(LeNet5()).targets] == [
        "conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    assert [t.name for t in resolve_scope(LeNet300100()).targets] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert list(LeNet300100().state_dict()) == [f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]


def test_models_are_fx_traceable():
    model = LeNet5().eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.parametrize("cls, kwargs, exc", [
    (LeNet5, {"num_classes": 0}, ValueError),
    (LeNet5, {"in_channels": "1"}, TypeError),
    (LeNet300100, {"in_features": 0}, ValueError),
    (LeNet300100, {"num_classes": 2.5}, TypeError),
])
def test_models_reject_bad_arguments(cls, kwargs, exc):
    name = next(iter(kwargs))
    with pytest.raises(exc, match=name):
        cls(**kwargs)
