"""Hidden-size (residual stream) pruning through RMS-type norms, refused under mean-centering LayerNorm.

Oracle: the model with every member of every removed unit zeroed (graph masks,
independent of the surgery); the pruned model must match it within 1e-5 on
fresh random inputs. The RMS rescaling is checked against a brute-force norm
too, and undoing it must break the equivalence (negative control).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from real_zoo import VOCAB, logits, randomize
from structural_zoo import rel_err
from torch import nn

from prunekit.methods.structural import (
    apply_shapes,
    build_graph,
    find_groups,
    param_masks,
    prune_channels,
    select_units,
)
from prunekit.methods.structural.prune import score_groups
from prunekit.methods.structural.rmsnorm import RMSNormInfo, rms_norm_info, rms_surgery

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
T = transformers


def _decoder(cls_config: str, cls_model: str, tie: bool, **extra) -> nn.Module:
    config = getattr(T, cls_config)(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=48, vocab_size=VOCAB, use_cache=False,
                                    max_position_embeddings=16, tie_word_embeddings=tie, **extra)
    return getattr(T, cls_model)(config)


DECODERS = {
    "llama": lambda tie: _decoder("LlamaConfig", "LlamaForCausalLM", tie),
    "qwen2": lambda tie: _decoder("Qwen2Config", "Qwen2ForCausalLM", tie),
    "mistral": lambda tie: _decoder("MistralConfig", "MistralForCausalLM", tie),
}
GEMMAS = {  # (1 + w) norms, sqrt(hidden_size) embedding scale; Gemma 2/3: sandwich norms, soft-capping, q/k norms
    "gemma": lambda tie: _decoder("GemmaConfig", "GemmaForCausalLM", tie, head_dim=8),
    "gemma2": lambda tie: _decoder("Gemma2Config", "Gemma2ForCausalLM", tie, head_dim=8),
    "gemma3": lambda tie: _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", tie, head_dim=8, sliding_window=4),
}


def _tokens(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=generator)


def _stream(group) -> bool:
    """The group of the residual stream: the one holding the final norm's weight."""
    return any(s.member.param == "weight" and s.member.path.endswith("norm") and s.member.dim == 0
               and "layers" not in s.member.path for s in group.slots)


def _oracle(model: nn.Module, x, hidden: float, sparsity: float = 0.0) -> nn.Module:
    model = copy.deepcopy(model)
    graph = build_graph(model, x, hidden=True)
    groups = find_groups(graph)
    scores = score_groups(model, groups)
    keeps = {g.name: select_units(scores[g.name], hidden if _stream(g) else sparsity) for g in groups}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in param_masks(graph, groups, keeps).items():
            params[name].mul_(mask)
    return model


def _check(model: nn.Module, pruned: nn.Module, oracle: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        first = _tokens(generator)
        assert rel_err(logits(oracle(first)), logits(model(first))) > 1e-3  # the masks change the function
        for probe in (first, _tokens(generator), _tokens(generator)):
            assert rel_err(logits(pruned(probe)), logits(oracle(probe))) < 1e-5


# -- the rescaling itself ---------------------------------------------------------------------------


class _GemmaStyle(nn.Module):
    """``(1 + w) * x / sqrt(mean(x^2) + eps)``, computed in float32 like Gemma."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.eps = 1e-6
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class _ConstantEps(nn.Module):
    """An RMS norm whose eps is a literal: changing the attribute changes nothing, so it is not followed."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.eps = 1e-6
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_rms_norms_are_recognised_by_what_they_compute() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    assert rms_norm_info(LlamaRMSNorm(8)) == RMSNormInfo("variance_epsilon", 0.0)
    assert rms_norm_info(T5LayerNorm(8)) == RMSNormInfo("variance_epsilon", 0.0)
    assert rms_norm_info(nn.RMSNorm(8)) == RMSNormInfo("eps", 0.0)
    assert rms_norm_info(_GemmaStyle(8)) == RMSNormInfo("eps", 1.0)
    for other in (nn.LayerNorm(8), _ConstantEps(8), nn.Linear(8, 8), nn.RMSNorm(8, elementwise_affine=False)):
        assert rms_norm_info(other) is None
    norm = LlamaRMSNorm(8)
    before = norm.weight.detach().clone()
    rms_norm_info(norm)
    assert torch.equal(norm.weight, before) and norm.variance_epsilon == 1e-6  # the probe restores the module


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("make", [lambda d: nn.RMSNorm(d, eps=1e-3), lambda d: nn.RMSNorm(d), _GemmaStyle],
                         ids=["rmsnorm", "rmsnorm_machine_eps", "one_plus_w"])
def test_rescaled_norm_equals_the_norm_over_zeroed_channels(make, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    d_full = 24
    norm = make(d_full)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d_full, generator=generator))
    kept = torch.sort(torch.randperm(d_full, generator=generator)[:9]).values
    x = torch.randn(5, d_full, generator=generator) * 10.0 ** float(seed - 2)  # small inputs: eps matters
    masked_x = torch.zeros_like(x)
    masked_x[:, kept] = x[:, kept]
    norm.requires_grad_(False)
    expected = norm(masked_x)[:, kept]
    w = norm.weight.detach().double() + rms_norm_info(norm).offset
    eps = torch.finfo(torch.float32).eps if norm.eps is None else norm.eps
    brute = (w * masked_x.double() / torch.sqrt(masked_x.double().square().mean(-1, keepdim=True) + eps))[:, kept]
    assert rel_err(expected, brute) < 1e-5
    pruned = copy.deepcopy(norm)
    rms_surgery(rms_norm_info(norm)).rebuild(pruned, {"weight": {0: kept}})
    assert rel_err(pruned(x[:, kept]), expected) < 1e-5
    assert pruned.eps == pytest.approx(eps * d_full / 9, rel=1e-12)
    naive = copy.deepcopy(norm)  # negative control: the same cut without the rescaling
    naive.weight = nn.Parameter(norm.weight.detach()[kept].clone())
    if hasattr(naive, "normalized_shape"):
        naive.normalized_shape = (9,)
    with torch.no_grad():
        assert rel_err(naive(x[:, kept]), expected) > 1e-2


# -- Llama / Qwen2 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_hidden_size_removal_equals_masking(name: str, tie: bool, seed: int) -> None:
    model = randomize(DECODERS[name](tie), seed)
    x = _tokens(torch.Generator().manual_seed(seed))
    hidden = (0.5, 0.25, 0.375)[seed]
    oracle = _oracle(model, x, hidden)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.0, hidden_sparsity=hidden)
    width = 32 - round(32 * hidden)
    assert report.notes == ()
    assert pruned.config.hidden_size == width and pruned.model.embed_tokens.weight.shape == (VOCAB, width)
    assert pruned.lm_head.in_features == width and pruned.model.norm.weight.shape == (width,)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tie  # a tied head stays one parameter
    layer = pruned.model.layers[1]
    assert layer.self_attn.q_proj.weight.shape == (32, width) and layer.self_attn.o_proj.weight.shape == (width, 32)
    assert layer.mlp.down_proj.weight.shape == (width, 48) and layer.input_layernorm.variance_epsilon == \
        pytest.approx(model.config.rms_norm_eps * 32 / width)
    assert pruned.config.head_dim == 8 and layer.self_attn.head_dim == 8  # heads keep their layout
    _check(model, pruned, oracle, seed)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    with torch.no_grad():  # negative control: the same cut with the norms' original eps is not equivalent
        for module in pruned.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = model.config.rms_norm_eps * 1e4
        probe = _tokens(torch.Generator().manual_seed(5))
        assert rel_err(logits(pruned(probe)), logits(oracle(probe))) > 1e-4


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", list(DECODERS))
def test_hidden_size_config_round_trips(name: str, tie: bool, tmp_path) -> None:
    model = randomize(DECODERS[name](tie), 3)
    config = copy.deepcopy(model.config)
    x = _tokens(torch.Generator().manual_seed(3))
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.0, hidden_sparsity=0.5)
    assert report.notes == ()
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.hidden_size == 16 and loaded.config.rms_norm_eps == pytest.approx(2 * config.rms_norm_eps)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    fresh = apply_shapes(type(model)(config), report.shapes)  # the other way back: the original config
    fresh.load_state_dict(pruned.state_dict())
    probe = _tokens(torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(logits(loaded(probe)), logits(pruned(probe)))
        assert torch.equal(logits(fresh.eval()(probe)), logits(pruned(probe)))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hidden_heads_and_mlp_in_one_call(name: str, tmp_path) -> None:
    model = randomize(DECODERS[name](True), 4)
    x = _tokens(torch.Generator().manual_seed(4))
    oracle = _oracle(model, x, 0.25, sparsity=0.5)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.5, hidden_sparsity=0.25)
    assert report.notes == ()
    c = pruned.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == \
        (24, 2, 1, 8, 24)
    _check(model, pruned, oracle, 4)
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    probe = _tokens(torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(logits(loaded(probe)), logits(pruned(probe)))


def test_hidden_size_stays_by_default() -> None:
    model = randomize(DECODERS["llama"](True), 0)
    pruned, report = prune_channels(copy.deepcopy(model), _tokens(torch.Generator().manual_seed(0)), 0.5)
    assert pruned.config.hidden_size == 32 and pruned.model.embed_tokens.weight.shape == (VOCAB, 32)
    assert pruned.model.norm.variance_epsilon == model.model.norm.variance_epsilon


def test_hidden_sparsity_is_validated() -> None:
    model = DECODERS["llama"](False)
    with pytest.raises(ValueError, match="hidden_sparsity"):
        prune_channels(model, _tokens(torch.Generator().manual_seed(0)), hidden_sparsity=1.5)
    assert math.isclose(model.config.rms_norm_eps, 1e-6)


# -- mean-centering LayerNorm: the hidden size stays, and the report says why ------------------------

_CENTERING = ("LayerNorm statistics span every channel; its mean-centering over the removed (zeroed) channels "
              "cannot be reproduced at a smaller width, so the hidden size stays (only RMS-type norms allow "
              "hidden-size pruning)")


def _opt() -> nn.Module:
    return T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                                        vocab_size=VOCAB, max_position_embeddings=16, word_embed_proj_dim=32,
                                        use_cache=False))


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "opt"])
def test_layernorm_streams_keep_their_hidden_size_with_the_reason(name: str) -> None:
    from real_zoo import hf_models, make_input

    factory, kind = (_opt, "tokens") if name == "opt" else hf_models()[name]
    model = randomize(factory(), 0)
    x = make_input(kind, torch.Generator().manual_seed(0))
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.3, hidden_sparsity=0.5)
    assert len(report.notes) >= 1 and report.notes[0].startswith("hidden size kept: ")
    assert _CENTERING in report.notes[0]
    if name != "vit":  # ViT's stream meets the class token first; the LayerNorm reason comes second
        assert report.notes[0].split(" is frozen (")[1].split(": ", 1)[1].startswith(_CENTERING)
    assert pruned.config.hidden_size == model.config.hidden_size == 32
    default, _ = prune_channels(copy.deepcopy(model), x, 0.3)  # the rest is pruned exactly as without the option
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    probe = make_input(kind, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(logits(pruned(probe)), logits(default(probe)))


def test_models_without_norms_on_a_stream_say_so() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    pruned, report = prune_channels(net, torch.randn(3, 4), 0.5, hidden_sparsity=0.5)
    assert report.notes == ("hidden size kept: no token embedding or norm carries prunable channels in this model",)
    assert pruned[0].out_features == 4  # ordinary channels still follow sparsity


# -- Gemma: (1 + w) norms and the sqrt(hidden_size) embedding scale ------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name,seeds", [("gemma", (0, 1, 2)), ("gemma2", (0,)), ("gemma3", (1,))])
def test_gemma_hidden_size_removal_equals_masking(name: str, seeds: tuple[int, ...], tie: bool, tmp_path) -> None:
    for seed in seeds:
        model = randomize(GEMMAS[name](tie), seed)
        config = copy.deepcopy(model.config)
        x = _tokens(torch.Generator().manual_seed(seed))
        oracle = _oracle(model, x, 0.5)
        pruned, report = prune_channels(copy.deepcopy(model), x, 0.0, hidden_sparsity=0.5)
        embed = pruned.model.embed_tokens
        assert embed.weight.shape == (VOCAB, 16) and (pruned.lm_head.weight is embed.weight) == tie
        assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (32, 16)  # heads and head_dim untouched
        # the embedding scale is sqrt(new width), as a model built with it computes; the weights absorb the rest
        assert embed.scalar_embed_scale == 4.0 and float(embed.embed_scale) == 4.0
        _check(model, pruned, oracle, seed)
        if name == "gemma3":  # its per-head q/k norms share rms_norm_eps, which the stream's norms had to change
            assert report.notes[0].startswith("Gemma3ForCausalLM.config keeps hidden_size=32: a model built with "
                                              "hidden_size=16 would differ (constants model.layers.0.self_attn."
                                              "q_norm.eps=1e-06 vs 2e-06")
            assert "apply_shapes" in report.notes[0]
            reloaded = apply_shapes(type(model)(config), report.shapes)
            reloaded.load_state_dict(pruned.state_dict())
        else:
            assert report.notes == () and pruned.config.hidden_size == 16
            pruned.save_pretrained(tmp_path / f"{seed}")
            reloaded = type(model).from_pretrained(tmp_path / f"{seed}")
        probe = _tokens(torch.Generator().manual_seed(11))
        with torch.no_grad():
            assert torch.equal(logits(reloaded.eval()(probe)), logits(pruned(probe)))


# -- T5: RMS norms (T5LayerNorm), a shared embedding, the tied head's d_model ** -0.5 ----------------


def _t5(tie: bool) -> nn.Module:
    return T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
        relative_attention_num_buckets=8, use_cache=False, tie_word_embeddings=tie, decoder_start_token_id=0,
        pad_token_id=0, feed_forward_proj="relu", dropout_rate=0.0))


class _Logits(nn.Module):
    """Only the logits: T5 also returns the encoder's hidden states, whose width is then an output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits


def _t5_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(generator), "decoder_input_ids": torch.randint(0, VOCAB, (2, 5), generator=generator)}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_t5_hidden_size_removal_equals_masking(tie: bool, tmp_path) -> None:
    """The tied head's ``model_dim ** -0.5`` takes the new width; the decoder's final norm absorbs the change."""
    model = _Logits(randomize(_t5(tie), 5)).eval()  # transformers 5 always ties; tie=False drops the scale
    head_tied = model.model.lm_head.weight is model.model.shared.weight
    x = _t5_inputs(torch.Generator().manual_seed(5))
    oracle = _oracle(model, x, 0.5)
    pruned, report = prune_channels(copy.deepcopy(model), x, 0.0, hidden_sparsity=0.5)
    assert report.notes == ()
    inner = pruned.model
    assert inner.config.d_model == 16 and inner.model_dim == 16 and inner.shared.weight.shape == (VOCAB, 16)
    assert inner.encoder.embed_tokens.weight is inner.shared.weight is inner.decoder.embed_tokens.weight
    assert (inner.lm_head.weight is inner.shared.weight) == head_tied
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        first = _t5_inputs(generator)
        assert rel_err(oracle(**first), model(**first)) > 1e-3
        for probe in (first, _t5_inputs(generator), _t5_inputs(generator)):
            assert rel_err(pruned(**probe), oracle(**probe)) < 1e-5
    inner.save_pretrained(tmp_path)
    loaded = _Logits(type(inner).from_pretrained(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**first), pruned(**first))


def test_t5_returning_encoder_states_keeps_its_width() -> None:
    model = randomize(_t5(True), 0)
    _, report = prune_channels(copy.deepcopy(model), _t5_inputs(torch.Generator().manual_seed(0)), 0.0,
                               hidden_sparsity=0.5)
    assert report.notes == ("hidden size kept: encoder.embed_tokens.weight[1] is frozen (model output)",)
