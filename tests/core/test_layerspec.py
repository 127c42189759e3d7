"""Layer specs: every granularity sees a weight as (out, in, *kernel), whatever its stored layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import NM, Blocks, Channels, Pruner, Unstructured, register_prunable, sparsity_report
from prunekit.core.layerspec import WeightSpec, never_pruned_reason, prunable_parameter_names, weight_spec
from prunekit.core.scope import resolve_scope

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,out_axis,in_axis", [
    ((3, 5), 0, 1), ((3, 5), 1, 0), ((4, 6, 3, 3), 0, 1), ((4, 6, 3, 3), 1, 0), ((2, 3, 4, 5, 2), 1, 0),
    ((4, 6, 3), 2, 0),
])
def test_matrix_view_against_explicit_permutation(seed, shape, out_axis, in_axis):
    torch.manual_seed(seed)
    t = torch.randn(shape)
    spec = WeightSpec(out_axis, in_axis)
    rest = [d for d in range(len(shape)) if d not in (out_axis, in_axis)]
    # Reference: entry (o, i, *k) of the canonical layout, built element by element.
    ref = torch.empty(shape[out_axis], shape[in_axis] * int(torch.tensor([shape[d] for d in rest]).prod()))
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).tolist():
        index = index if isinstance(index, list) else [index]
        kernel = 0
        for d in rest:
            kernel = kernel * shape[d] + index[d]
        ref[index[out_axis], index[in_axis] * (ref.shape[1] // shape[in_axis]) + kernel] = t[tuple(index)]
    assert torch.equal(spec.matrix(t), ref)
    assert torch.equal(spec.from_matrix(ref, shape), t)
    assert torch.equal(spec.from_canonical(spec.canonical(t)), t)
    assert spec.out_features(shape) == shape[out_axis]


def test_spec_validation():
    with pytest.raises(ValueError, match="out_axis and in_axis must differ"):
        WeightSpec(1, 1)
    with pytest.raises(ValueError, match="in_axis must be an int >= 0"):
        WeightSpec(0, -1)
    with pytest.raises(ValueError, match="does not fit a 2-D tensor"):
        WeightSpec(2, 0).matrix(torch.zeros(2, 2))


def test_builtin_specs():
    class SamePadConv(nn.Conv2d):
        pass

    assert weight_spec(nn.Linear(2, 3), "weight") == WeightSpec(0, 1)
    assert weight_spec(SamePadConv(2, 3, 3), "weight") == WeightSpec(0, 1)
    assert weight_spec(nn.ConvTranspose2d(2, 3, 3), "weight") == WeightSpec(1, 0)
    assert weight_spec(nn.ConvTranspose1d(2, 3, 3), "weight") == WeightSpec(1, 0)
    assert weight_spec(Conv1D(6, 4), "weight") == WeightSpec(1, 0)
    assert weight_spec(nn.Linear(2, 3), "bias") is None and weight_spec(nn.ReLU(), "weight") is None


def test_register_with_specs_and_errors():
    class Kernel(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))

    register_prunable(Kernel, {"w": WeightSpec(1, 0)})
    assert prunable_parameter_names(Kernel()) == ["w"] and weight_spec(Kernel(), "w") == WeightSpec(1, 0)
    register_prunable(Kernel, lambda m: {"w": WeightSpec(0, 1)})
    assert weight_spec(Kernel(), "w") == WeightSpec(0, 1)
    with pytest.raises(TypeError, match=r"\{parameter name: WeightSpec\}"):
        register_prunable(Kernel, {"w": (1, 0)})


# --------------------------------------------------------------------------------------
# The same weight stored (in, out) and (out, in) gets the same mask, transposed
# --------------------------------------------------------------------------------------

GRANULARITIES = [Unstructured(), NM(2, 4), NM(1, 4), Blocks((4, 1)), Blocks((2, 2)), Channels()]


class Pair(nn.Module):
    """A Conv1D and an nn.Linear holding the same (out, in) matrix."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1d = Conv1D(8, 16)  # nf=8 outputs, nx=16 inputs: weight (16, 8)
        self.linear = nn.Linear(16, 8)
        with torch.no_grad():
            nn.init.normal_(self.conv1d.weight)
            self.linear.weight.copy_(self.conv1d.weight.t())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_conv1d_masks_are_the_linear_masks_transposed(seed, granularity):
    model = Pair(seed)
    Pruner(model, granularity.sparsity if isinstance(granularity, NM) else 0.5, granularity=granularity)
    conv_w, lin_w = model.conv1d.weight.detach(), model.linear.weight.detach()
    assert torch.equal(conv_w.t(), lin_w)
    if isinstance(granularity, NM):  # groups of m consecutive *inputs* of each output
        groups = (conv_w.t() != 0).reshape(8, -1, granularity.m).sum(-1)
        assert bool((groups == granularity.n).all())
    if isinstance(granularity, Channels):  # whole outputs: columns of the stored (in, out) weight
        dead = (conv_w == 0).all(dim=0)
        assert int(dead.sum()) == 4 and bool(((conv_w == 0).any(dim=0) == dead).all())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("granularity", [NM(2, 4), Channels(), Blocks((2, 2))], ids=repr)
def test_conv_transpose_groups_run_along_inputs(seed, granularity):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 2))  # weight (in=8, out=4, 2, 2)
    Pruner(model, 0.5, granularity=granularity)
    w = model[0].weight.detach()
    canonical = w.permute(1, 0, 2, 3).reshape(4, -1)  # (out, in*kh*kw)
    if isinstance(granularity, NM):
        assert bool(((canonical != 0).reshape(4, -1, 4).sum(-1) == 2).all())
    elif isinstance(granularity, Channels):
        assert int((canonical == 0).all(dim=1).sum()) == 2
    else:
        alive = (canonical != 0).reshape(2, 2, 16, 2)
        assert torch.equal(alive.any(dim=3).any(dim=1), alive.all(dim=3).all(dim=1))  # whole blocks
        assert int(alive.any(dim=3).any(dim=1).sum()) == 16


def test_gpt2_conv1d_layers_are_in_scope_and_nm_is_along_inputs():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    pruner = Pruner(model, 0.5, granularity=NM(2, 4), exclude=["transformer.wte"])
    conv = [n for n in pruner.names if ".h." in n]
    assert len(conv) == 8 and all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), Conv1D) for n in conv)
    for name in conv:
        w = model.get_parameter(name).detach()
        assert bool(((w.t() != 0).reshape(w.shape[1], -1, 4).sum(-1) == 2).all()), name
    # the position table is known and left dense; nothing is "unknown"
    assert [m for m, _ in pruner.skipped] == ["transformer.wpe"]
    assert torch.count_nonzero(model.transformer.wpe.weight) == model.transformer.wpe.weight.numel()


def test_position_table_is_prunable_when_named():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    pruner = Pruner(model, 0.5, layers=["transformer.wpe"])
    assert pruner.names == ["transformer.wpe.weight"]


# --------------------------------------------------------------------------------------
# Normalisation, scales and positions of real libraries are known, not "unknown"
# --------------------------------------------------------------------------------------

def _zoo():
    t = transformers
    yield t.LlamaForCausalLM(t.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                           num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    yield t.ViTModel(t.ViTConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                 num_attention_heads=2, image_size=16, patch_size=8))
    yield t.ConvNextModel(t.ConvNextConfig(depths=[1, 1], hidden_sizes=[8, 16], num_stages=2))
    yield t.T5ForConditionalGeneration(t.T5Config(num_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                                                  vocab_size=32))


@pytest.mark.parametrize("model", list(_zoo()), ids=lambda m: type(m).__name__)
def test_real_models_have_no_unknown_layers(model):
    scope = resolve_scope(model)
    assert not [m for m, why in scope.skipped if "unknown" in why], scope.skipped
    pruned = {t.name for t in scope.targets}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if p.dim() <= 1:  # norms, scales, biases are never targets
                assert full not in pruned
    assert all(never_pruned_reason(m) is not None for m in model.modules() if "Norm" in type(m).__name__
               and prunable_parameter_names(m) == [] and type(m).__module__.startswith("transformers"))


# --------------------------------------------------------------------------------------
# Tied parameters: one target, every name
# --------------------------------------------------------------------------------------

def _tied_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("selector", ["lm_head", "lm_head.weight", "model.embed_tokens", "model.embed_*"])
def test_excluding_either_name_of_a_tied_weight_excludes_it(selector):
    model = _tied_llama(0)
    pruner = Pruner(model, 0.5, exclude=[selector])
    assert "model.embed_tokens.weight" not in pruner.names and "lm_head.weight" not in pruner.names
    assert torch.count_nonzero(model.lm_head.weight) == model.lm_head.weight.numel()


def test_selecting_and_overriding_a_tied_weight_by_its_other_name():
    model = _tied_llama(1)
    pruner = Pruner(model, 0.5, layers=["lm_head"], overrides={"lm_head": 0.25})
    assert pruner.names == ["model.embed_tokens.weight"]
    w = model.lm_head.weight
    assert int((w == 0).sum()) == round(w.numel() * 0.25)
    row = sparsity_report(model, pruner).rows[0]
    assert row.aliases == ("lm_head.weight",)
    assert "model.embed_tokens.weight is also lm_head.weight (tied)" in str(pruner.report())
    assert pruner.report().to_dict()["layers"][0]["aliases"] == ["lm_head.weight"]


def test_tied_overrides_by_two_names_conflict():
    model = _tied_llama(2)
    with pytest.raises(ValueError, match="matched by several patterns"):
        Pruner(model, 0.5, overrides={"lm_head": 0.2, "model.embed_tokens": 0.3})


def test_a_module_used_twice_is_one_target_with_both_names():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    scope = resolve_scope(model)
    assert [(t.name, t.aliases) for t in scope.targets] == [("0.weight", ("0.weight", "2.weight"))]
    assert resolve_scope(model, exclude=["2"]).targets == []
