"""prune_channels arguments, round_to, clear errors and custom surgeries."""

from __future__ import annotations

import copy

import pytest
import torch
from structural_zoo import build, rel_err
from torch import nn

from prunekit.methods.structural import (
    GraphError,
    build_graph,
    find_groups,
    prune_channels,
    register_surgery,
    slice_state,
)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "transformer", "lstm"])
@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_keeps_multiples(name: str, round_to: int) -> None:
    model, x = build(name, 0)
    _, report = prune_channels(copy.deepcopy(model), x, 0.6, round_to=round_to)
    for group in report.groups:
        if group.total >= round_to:
            assert group.kept % round_to == 0 or group.kept == group.total, group
            assert group.kept >= group.total - round(group.total * 0.6)


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)


class Mix(nn.Module):
    """A layer with its own weight, applied by an op structural pruning does not know."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nchw->nohw", self.weight, x)


class WithCustom(nn.Module):
    def __init__(self, up: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.layer3 = nn.Sequential(Mix(8)) if up else nn.Sequential()
        self.layer3.add_module("custom", Custom())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer3(self.conv(x)))


def test_unsupported_op_names_op_and_module_path() -> None:
    with pytest.raises(GraphError, match=r"torch\.cumsum in 'layer3\.custom' \(Custom\).*register_surgery"):
        build_graph(WithCustom(), torch.randn(1, 3, 8, 8))


def test_unsupported_layer_names_layer_and_fix() -> None:
    # (ConvTranspose2d, formerly the example here, is supported now)
    message = (r"cannot prune through 'layer3\.0' \(Mix\): register surgery with "
               r"prunekit\.register_surgery\(Mix.*ignore=\['layer3\.0'\].*torch\.einsum")
    with pytest.raises(GraphError, match=message):
        build_graph(WithCustom(up=True), torch.randn(1, 3, 8, 8))


def test_ignore_leaves_unsupported_parts_alone() -> None:
    model, x = WithCustom(up=True).eval(), torch.randn(2, 3, 8, 8)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.5, ignore=["layer3"])
    assert report.groups == ()  # the only channels feed the ignored block
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"sparsity": 1.0}, ValueError, "sparsity must be in"),
    ({"round_to": 0}, ValueError, "round_to must be >= 1"),
    ({"importance": "l3"}, ValueError, "importance must be one of"),
    ({"importance": "taylor"}, ValueError, "needs loss_fn"),
    ({"reduction": "max"}, ValueError, "reduction must be one of"),
    ({"ignore": ["nope"]}, ValueError, "no module named 'nope'"),
])
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    model, x = build("vgg", 0)
    with pytest.raises(error, match=match):
        prune_channels(model, x, **kwargs)


def test_mean_reduction_and_callable_importance_rank_units() -> None:
    model, x = build("vgg", 0)
    by_index = lambda tensor, dim: -torch.arange(tensor.shape[dim], dtype=torch.float32)  # noqa: E731
    pruned, _ = prune_channels(copy.deepcopy(model), x, 0.5, importance=by_index, reduction="mean")
    # lower indices score higher everywhere: the first half of every layer survives
    assert torch.equal(pruned.features[0].weight, model.features[0].weight[:8])
    assert torch.equal(pruned.classifier[3].weight, model.classifier[3].weight[:, :20])


class Scale(nn.Module):
    """Per-channel scale: unknown to structural pruning until registered."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha.view(1, -1, 1, 1)


def _couple(module: Scale, ctx, x):
    atoms = ctx.input_atoms(x, dim=1, size=module.alpha.numel())
    ctx.member("alpha", 0, atoms)
    return ctx.out(atoms, dim=1)


def _rebuild(module: Scale, keep) -> Scale:
    new = Scale(len(keep["alpha"][0]))
    new.load_state_dict(slice_state(module, keep))
    return new


def _scaled_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3), Scale(12), nn.ReLU(), nn.Conv2d(12, 4, 3)).eval()


def test_custom_layer_without_surgery_freezes_its_channels() -> None:
    graph = build_graph(_scaled_net(), torch.randn(1, 3, 8, 8))
    assert find_groups(graph) == []


def test_registered_custom_surgery_prunes_through_the_layer() -> None:
    register_surgery(Scale, _couple, _rebuild)
    model, x = _scaled_net(), torch.randn(2, 3, 8, 8)
    oracle = copy.deepcopy(model)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.5, importance="l1")
    assert [(g.name, g.kept, g.total) for g in report.groups] == [("0.weight[0]", 6, 12)]
    assert pruned[1].alpha.shape == (6,) and pruned[3].in_channels == 6
    kept = torch.nonzero(torch.isin(oracle[0].weight.flatten(1)[:, 0], pruned[0].weight.flatten(1)[:, 0])).flatten()
    with torch.no_grad():
        gone = torch.ones(12, dtype=torch.bool)
        gone[kept] = False
        oracle[0].weight[gone] = 0
        oracle[0].bias[gone] = 0
        oracle[1].alpha[gone] = 0
        oracle[3].weight[:, gone] = 0
        assert rel_err(pruned(x), oracle(x)) < 1e-6


def test_register_surgery_validates() -> None:
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_surgery(int, _couple, _rebuild)
    with pytest.raises(TypeError, match="rebuild must be callable"):
        register_surgery(Scale, _couple, None)
