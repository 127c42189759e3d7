"""Structural pruning of real architectures: transformers models and torch layers fx could not follow.

Oracle: the same model with every member of every removed unit zeroed (built
from the graph independently of the surgery); the physically pruned model must
match it within 1e-5 on fresh random inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from real_zoo import TORCH_MODELS, SamePadConv2d, logits, make_input, randomize
from structural_zoo import rel_err
from torch import nn

from prunekit.methods.structural import (
    GraphError,
    apply_shapes,
    build_graph,
    find_groups,
    param_masks,
    prune_channels,
    select_units,
)
from prunekit.methods.structural.prune import score_groups

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from real_zoo import hf_models  # noqa: E402

HF = hf_models()


def _oracle(model: nn.Module, x: torch.Tensor, sparsity: float, **kwargs) -> nn.Module:
    model = copy.deepcopy(model)
    graph = build_graph(model, x, kwargs.get("ignore"))
    groups = find_groups(graph)
    keeps = {name: select_units(s, sparsity) for name, s in score_groups(model, groups).items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in param_masks(graph, groups, keeps).items():
            params[name].mul_(mask)
    return model


def _check_equivalent(model: nn.Module, pruned: nn.Module, oracle: nn.Module, make, seed: int) -> None:
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        first = make(generator)
        assert rel_err(logits(oracle(first)), logits(model(first))) > 1e-3  # the masks change the function
        for probe in (first, make(generator), make(generator)):
            assert rel_err(logits(pruned(probe)), logits(oracle(probe))) < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(HF))
def test_transformers_models_removal_equals_masking(name: str, seed: int) -> None:
    factory, kind = HF[name]
    model = randomize(factory(), seed)
    x = make_input(kind, torch.Generator().manual_seed(seed))
    sparsity = 0.5 if seed == 0 else 0.3
    oracle = _oracle(model, x, sparsity)
    pruned, report = prune_channels(copy.deepcopy(model), x, sparsity)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert any(g.kept < g.total for g in report.groups)
    _check_equivalent(model, pruned, oracle, lambda g: make_input(kind, g), seed)
    # every surgery was done in place: same module types at the same paths
    assert {n: type(m) for n, m in pruned.named_modules()} == {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_grouped_query_heads_go_with_their_query_group(name: str) -> None:
    factory, kind = HF[name]
    model = randomize(factory(), 0)
    x = make_input(kind, torch.Generator().manual_seed(0))
    groups = {g.name: g for g in find_groups(build_graph(model, x))}
    heads = groups["model.layers.0.self_attn.q_proj.weight[0]"]
    assert heads.size == 2  # 2 KV heads, each with its 2 query heads
    slot = {(s.member.path.rsplit(".", 1)[-1], s.member.param, s.member.dim): s.unit.tolist() for s in heads.slots}
    assert slot[("q_proj", "weight", 0)] == [h // 2 for h in range(4) for _ in range(8)]
    assert slot[("k_proj", "weight", 0)] == [h for h in range(2) for _ in range(8)]
    assert slot[("o_proj", "weight", 1)] == slot[("q_proj", "weight", 0)]
    if name == "qwen2":
        assert slot[("k_proj", "bias", 0)] == slot[("k_proj", "weight", 0)]
    mlp = groups["model.layers.0.mlp.gate_proj.weight[0]"]  # SwiGLU: gate and up rows with down columns
    members = {(s.member.path.rsplit(".", 1)[-1], s.member.dim) for s in mlp.slots}
    assert members == {("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)} and mlp.size == 48


@pytest.mark.parametrize("name,ignore", [("llama", None), ("qwen2", None), ("vit", None),
                                         ("gpt2", ["GPT2Attention"]), ("bert", ["BertAttention"])])
def test_config_round_trips_through_save_pretrained(name: str, ignore, tmp_path) -> None:
    factory, kind = HF[name]
    model = randomize(factory(), 2)
    if ignore:  # heads of these models cannot be described by their config: prune the MLPs only
        ignore = [type(m) for m in model.modules() if type(m).__name__ in ignore][:1]
    x = make_input(kind, torch.Generator().manual_seed(2))
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.5, ignore=ignore)
    assert report.notes == ()
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    probe = make_input(kind, torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(logits(loaded(probe)), logits(pruned(probe)))
    mine = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items() if k in mine} == mine
    if name in ("llama", "qwen2"):
        assert loaded.config.num_key_value_heads == 1 and loaded.config.num_attention_heads == 2
        assert loaded.config.head_dim == 8 and loaded.config.intermediate_size == 24


def test_heads_the_config_cannot_describe_reload_through_apply_shapes() -> None:
    factory, kind = HF["gpt2"]
    model = randomize(factory(), 3)
    x = make_input(kind, torch.Generator().manual_seed(3))
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.5)
    assert len(report.notes) == 1 and "apply_shapes" in report.notes[0] and "head_dim" in report.notes[0]
    assert pruned.transformer.h[0].attn.split_size == 16 and pruned.transformer.h[0].attn.num_heads == 2
    fresh = apply_shapes(type(model)(model.config), report.shapes)
    fresh.load_state_dict(pruned.state_dict())
    probe = make_input(kind, torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(logits(fresh.eval()(probe)), logits(pruned(probe)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_torch_architectures_removal_equals_masking(name: str, seed: int) -> None:
    factory, shape = TORCH_MODELS[name]
    torch.manual_seed(seed)
    model = randomize(factory(), seed)
    x = torch.randn(shape)
    oracle = _oracle(model, x, 0.3)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.3)
    assert any(g.kept < g.total for g in report.groups), report.groups
    _check_equivalent(model, pruned, oracle, lambda g: torch.randn(shape, generator=g), seed)


def test_efficientnet_like_subclasses_keep_type_and_forward() -> None:
    factory, shape = TORCH_MODELS["efficient_lite"]
    model = randomize(factory(), 0)
    x = torch.randn(shape)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.3)
    types = {n: type(m) for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert types == {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert sum(t is SamePadConv2d for t in types.values()) == 11
    assert type(pruned.blocks[1].dw[0]) is SamePadConv2d
    dw = pruned.blocks[1].dw[0]
    assert dw.groups == dw.in_channels == dw.out_channels < model.blocks[1].dw[0].out_channels
    assert pruned.blocks[1].se.reduce.in_channels == dw.out_channels  # squeeze-excite follows the depthwise
    before = SamePadConv2d.calls
    with torch.no_grad():
        pruned(torch.randn(1, 3, 19, 19))  # odd size, stride 2: only the custom same padding gives these shapes
    assert SamePadConv2d.calls - before == sum(type(m) is SamePadConv2d for m in pruned.modules())
    assert report.params_after < 0.8 * report.params_before


def test_groupnorm_prunes_whole_groups() -> None:
    factory, shape = TORCH_MODELS["unet_groupnorm_convtranspose"]
    model = randomize(factory(), 0)
    groups = {g.name: g for g in find_groups(build_graph(model, torch.randn(shape)))}
    norm = next(g for g in groups.values() if any(s.member.path == "norm" for s in g.slots))
    assert norm.size == 4
    slot = next(s for s in norm.slots if s.member.path == "norm" and s.member.param == "weight")
    assert slot.unit.tolist() == [u for u in range(4) for _ in range(8)]
    pruned, _ = prune_channels(copy.deepcopy(model), torch.randn(shape), 0.5)
    assert (pruned.norm.num_groups, pruned.norm.num_channels) == (2, 16)
    assert pruned.up.in_channels == 16 and pruned.up.weight.shape[0] == 16  # ConvTranspose: weight (in, out, k, k)
    assert type(pruned.up) is nn.ConvTranspose2d


def test_channel_shuffle_couples_the_shuffled_channels() -> None:
    factory, shape = TORCH_MODELS["channel_shuffle"]
    model = randomize(factory(), 0)
    groups = find_groups(build_graph(model, torch.randn(shape)))
    g1 = next(g for g in groups if any(s.member.path == "g1.0" and s.member.dim == 0 for s in g.slots))
    rows = next(s for s in g1.slots if s.member.path == "g1.0" and s.member.dim == 0).unit.tolist()
    assert rows[:12] == rows[12:]  # channel j and 12 + j are shuffled next to each other: one unit


class _Cumsum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)


class _Sorted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.block = nn.Sequential(nn.Identity(), _Cumsum())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.conv(x)))


class _ConstantView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 12)
        self.out = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).view(x.shape[0], 3, 4)  # literal constants: 3 heads of 4
        return self.out(h.reshape(x.shape[0], 12))


def test_refused_op_names_op_path_and_both_fixes() -> None:
    with pytest.raises(GraphError) as info:
        prune_channels(_Sorted(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "torch.cumsum in 'block.1' (_Cumsum)" in message
    assert "ignore=['block.1']" in message and "register_surgery" in message
    pruned, report = prune_channels(_Sorted(), torch.randn(1, 3, 8, 8), ignore=["block.1"])
    assert report.groups == ()


def test_constant_sizes_freeze_with_their_reason() -> None:
    graph = build_graph(_ConstantView(), torch.randn(2, 4))
    assert find_groups(graph) == []
    assert any("constant" in reason and "'' " not in reason for reason in graph.frozen_reasons().values())


def test_hidden_size_is_frozen_by_the_norms_with_a_reason() -> None:
    factory, kind = HF["llama"]
    graph = build_graph(randomize(factory(), 0), make_input(kind, torch.Generator().manual_seed(0)))
    reasons = graph.frozen_reasons()
    assert "reduced over the channel dim" in reasons["model.embed_tokens.weight[1]"]
    assert "LlamaRMSNorm" in reasons["model.embed_tokens.weight[1]"]
