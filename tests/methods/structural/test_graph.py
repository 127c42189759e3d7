"""The dependency graph couples what the dataflow couples, and freezes what must keep its size."""

from __future__ import annotations

import pytest
import torch
from structural_zoo import build
from torch import nn

from prunekit.methods.structural import build_graph, find_groups


def _groups(name: str) -> dict[str, set[str]]:
    model, x = build(name, 0)
    return {g.name: {f"{s.member.path}.{s.member.param}[{s.member.dim}]" for s in g.slots}
            for g in find_groups(build_graph(model, x))}


def test_residual_additions_share_one_channel_set() -> None:
    groups = _groups("resnet")
    stream = groups["stem.0.weight[0]"]
    # stem, the identity block's last conv and the next block's inputs (conv1 and the downsample shortcut)
    assert {"stem.0.weight[0]", "stem.1.weight[0]", "layer1.conv2.0.weight[0]", "layer1.conv2.1.bias[0]",
            "layer2.conv1.0.weight[1]", "layer2.down.0.weight[1]"} <= stream
    second = groups["layer2.conv2.0.weight[0]"]
    assert {"layer2.down.0.weight[0]", "layer2.down.1.weight[0]", "fc.weight[1]"} <= second
    assert not any(".fc.weight[0]" in m or m == "fc.weight[0]" for g in groups.values() for m in g)


def test_concatenation_keeps_channel_offsets() -> None:
    model, x = build("densenet", 0)
    groups = find_groups(build_graph(model, x))
    transition = [g for g in groups if any(s.member.path == "transition.2" and s.member.dim == 1 for s in g.slots)]
    assert [g.name for g in transition] == ["stem.weight[0]", "dense.0.2.weight[0]", "dense.1.2.weight[0]",
                                            "dense.2.2.weight[0]"]
    for offset, group in zip((0, 16, 24, 32), transition):
        slot = next(s for s in group.slots if s.member.path == "transition.2" and s.member.dim == 1)
        live = torch.nonzero(slot.unit >= 0).flatten()
        assert live.tolist() == list(range(offset, offset + group.size))


def test_depthwise_and_grouped_convolutions() -> None:
    model, x = build("mobilenet", 0)
    groups = {g.name: g for g in find_groups(build_graph(model, x))}
    stem = {f"{s.member.path}.{s.member.param}[{s.member.dim}]" for s in groups["stem.0.0.weight[0]"].slots}
    assert "dw.0.0.weight[0]" in stem and "pw.0.weight[1]" in stem  # depthwise channel = its input channel
    grouped = groups["project.0.weight[0]"]  # the residual stream feeds a 4-group conv: whole groups
    assert grouped.size == 4
    slot = next(s for s in grouped.slots if s.member.path == "grouped.0.0" and s.member.dim == 0)
    assert slot.unit.tolist() == [u for u in range(4) for _ in range(8)]
    multiplier = groups["expand.0.0.weight[0]"]  # depthwise with 2 outputs per input channel
    slot = next(s for s in multiplier.slots if s.member.path == "dw2.0.0")
    assert slot.unit.tolist() == [u for u in range(48) for _ in range(2)]
    gate = next(s for s in groups["gate.weight[0]"].slots if s.member.path == "gate" and s.member.param == "weight")
    assert gate.unit.tolist() == list(range(20)) * 2  # chunk(2): channel i of both halves together


def test_flatten_maps_each_channel_to_its_features() -> None:
    model, x = build("vgg", 0)
    group = next(g for g in find_groups(build_graph(model, x)) if g.name == "features.8.weight[0]")
    slot = next(s for s in group.slots if s.member.path == "classifier.1")
    assert slot.unit.tolist() == [c for c in range(32) for _ in range(16)]


def test_attention_heads_and_layernorm_stream() -> None:
    model, x = build("transformer", 0)
    graph = build_graph(model, x)
    groups = {g.name: g for g in find_groups(graph)}
    heads = groups["attn.in_proj_weight[0]"]
    assert heads.size == 4
    rows = next(s for s in heads.slots if s.member.param == "in_proj_weight")
    assert rows.unit.tolist() == [h for h in range(4) for _ in range(8)] * 3
    assert "ffn.0.weight[0]" in groups
    assert any("LayerNorm" in reason for reason in graph.frozen_reasons().values())
    assert not any(s.member.path == "embed" and s.member.dim == 0 for g in groups.values() for s in g.slots)


def test_lstm_hidden_units_span_layers_and_directions() -> None:
    model, x = build("lstm", 0)
    group = next(g for g in find_groups(build_graph(model, x)) if g.name == "lstm.weight_ih_l0[0]")
    names = {f"{s.member.param}[{s.member.dim}]" for s in group.slots if s.member.path == "lstm"}
    assert {"weight_ih_l1_reverse[0]", "weight_ih_l1[1]", "weight_hh_l0_reverse[1]"} <= names
    head = next(s for s in group.slots if s.member.path == "head")
    assert head.unit.tolist() == list(range(12)) * 3  # out[:, -1] (both directions) and h_n[-1]


def test_shared_layer_called_twice_couples_its_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x)) + self.c(self.b(x))

    groups = find_groups(build_graph(Twice(), torch.randn(2, 4)))
    assert len(groups) == 1 and {s.member.path for s in groups[0].slots} == {"a", "b", "c"}


@pytest.mark.parametrize("code,reason", [
    (lambda x: x.split([3, 5], dim=1)[0].sum(dim=1, keepdim=True) * x, "constant sizes"),
    (lambda x: x.softmax(dim=1), "softmax"),
    (lambda x: x / x.mean(dim=1, keepdim=True), "reduced over the channel dim"),
    (lambda x: x[:, :4].repeat(1, 2), "indexes into the channel dim"),
])
def test_ops_that_need_every_channel_freeze_them(code, reason: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(code(self.a(x)))

    graph = build_graph(Net(), torch.randn(2, 3))
    assert find_groups(graph) == []
    assert any(reason in r for r in graph.frozen_reasons().values())
