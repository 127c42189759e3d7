"""One-shot on tiny random-init models of real architectures: block discovery, exact block inputs, exact sparsity.

The central check: for every block, the inputs ``prune_oneshot`` calibrated it on
are the inputs that block receives in a full forward of the final pruned model
(with its default config, KV cache on), within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from prunekit.methods.oneshot import find_blocks, prune_oneshot
from prunekit.methods.oneshot.blocks import flatten
from prunekit.methods.oneshot.layers import is_conv1d, layer_kind

from .zoo import FAMILIES, family

transformers = pytest.importorskip("transformers")

MAIN = ["gpt2", "llama", "qwen2", "bert", "t5"]
OTHERS = [f for f in FAMILIES if f not in MAIN]

EXPECTED_BLOCKS = {
    "gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers",
    "phi3": "model.layers", "phi": "model.layers", "gemma2": "model.layers", "gemma3": "model.layers",
    "opt": "model.decoder.layers", "bert": "encoder.layer", "vit": "layers", "t5": "encoder.block, decoder.block",
}


def tensor_leaves(args, kwargs) -> dict[str, torch.Tensor]:
    """``{position: tensor}`` of a block call's inputs; the first positional argument is the hidden states."""
    out = {}
    for key, value in [*((f"arg{i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        leaves: list = []
        flatten(value, leaves)
        out.update({f"{key}/{j}": t for j, t in enumerate(leaves) if isinstance(t, torch.Tensor)})
    return out


def blocks_of(model):
    return [(f"{n}.{i}", b) for n, lst in find_blocks(model) for i, b in enumerate(lst)]


def forward_block_inputs(model, samples) -> dict[str, list[dict[str, torch.Tensor]]]:
    """What each block receives in full forwards of ``model`` as it stands (its own config: KV cache on)."""
    seen: dict[str, list] = {name: [] for name, _ in blocks_of(model)}
    handles = [block.register_forward_pre_hook(
        lambda m, a, k, name=name: seen[name].append(tensor_leaves(a, k)), with_kwargs=True)
        for name, block in blocks_of(model)]
    with torch.no_grad():
        for s in samples:
            model(**s)
    for h in handles:
        h.remove()
    return seen


def max_difference(got: dict, want: dict) -> float:
    """Largest difference over every block, sample and tensor input (the inputs must match one to one)."""
    worst = 0.0
    assert got.keys() == want.keys()
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(got[name], want[name]):
            assert g.keys() == w.keys(), (name, set(g) ^ set(w))
            for key in w:
                assert g[key].shape == w[key].shape, (name, key)
                worst = max(worst, (g[key].double() - w[key].double()).abs().max().item() if w[key].numel() else 0.0)
    return worst


def prune_recording(model, samples, **kwargs):
    fed: dict[str, list] = {}
    report = prune_oneshot(model, samples, progress=False, on_block_inputs=lambda name, inputs: fed.__setitem__(
        name, [tensor_leaves(a, k) for a, k in inputs]), **kwargs)
    return report, fed


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", MAIN + OTHERS)
def test_block_inputs_equal_a_full_forward_of_the_pruned_model(name, seed):
    if seed == 1 and name not in MAIN:
        pytest.skip("second seed on the main families only (time)")
    model, samples = family(name, seed)
    use_cache = getattr(model.config, "use_cache", None)
    dense = forward_block_inputs(model, samples)
    report, fed = prune_recording(model, samples, method="sparsegpt", sparsity="2:4" if seed else 0.5)
    assert report.blocks == EXPECTED_BLOCKS[name]
    assert getattr(model.config, "use_cache", None) == use_cache and not model.training  # config and mode restored
    pruned = forward_block_inputs(model, samples)
    assert max_difference(fed, pruned) <= 1e-5
    # negative control: the dense model's block inputs (what one-pass calibration uses) fail the same check
    assert max_difference(dense, pruned) > 1e-3


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_cache_captured_during_calibration_would_have_shifted_the_inputs(name):
    """Why the cache is off: block 0's kwargs captured with ``use_cache=True`` hold a cache object; a calibration
    pass fills it with the dense keys, so re-running the pruned block on them gives block 1 inputs that are off,
    while the same kwargs without the cache reproduce the pruned model's full forward."""
    model, samples = family(name, 0)
    samples = [{"input_ids": samples[0]["input_ids"]}]  # no padding mask: the stale keys go unnoticed
    captured = {}

    def grab(module, args, kwargs):
        captured["in"] = (args, kwargs)
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad(), pytest.raises(_Stop):
        model(**samples[0], use_cache=True)
    handle.remove()
    args, kwargs = captured["in"]
    with torch.no_grad():
        model.model.layers[0](*args, **kwargs)  # the calibration pass on the dense block
        prune_oneshot(model, None, method="magnitude", sparsity=0.5, layers="model.layers.0", progress=False)
        want = forward_block_inputs(model, samples)["model.layers.1"][0]["arg0/0"]
        stale = model.model.layers[0](*args, **kwargs)
        clean = model.model.layers[0](*args, **{**kwargs, "cache": None, "use_cache": False})
    assert (stale - want).norm() / want.norm() > 0.05
    torch.testing.assert_close(clean, want, rtol=0, atol=1e-5)


def _check_layers(model, report, target: str) -> None:
    for r in report.layers:
        module = model.get_submodule(r.name)
        weight = module.weight.detach()
        matrix = weight.t() if is_conv1d(module) else weight.reshape(weight.shape[0], -1)  # (out, in) view
        if ":" in target:
            n, m = map(int, target.split(":"))
            assert torch.all(matrix.ne(0).reshape(matrix.shape[0], -1, m).sum(-1) == n), r.name
        else:
            assert int(weight.eq(0).sum()) == round(weight.numel() * float(target)), r.name
        assert r.shape == tuple(weight.shape)


@pytest.mark.parametrize("target", ["0.5", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("name", MAIN + OTHERS)
def test_every_block_layer_is_pruned_exactly(name, method, target):
    seed = (len(name) + len(method)) % 3
    model, samples = family(name, seed)
    solvable = {n for n, m in model.named_modules() if layer_kind(m) in ("linear", "conv1d_t", "conv")}
    in_blocks = {n for n in solvable if any(n.startswith(b + ".") for b, _ in blocks_of(model))}
    report = prune_oneshot(model, samples, method=method, sparsity=target if ":" in target else float(target),
                           progress=False)
    assert {r.name for r in report.layers} == in_blocks
    assert set(report.skipped) == solvable - in_blocks
    _check_layers(model, report, target)
    with torch.no_grad():
        out = model(**samples[0])
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tied_embedding_is_left_dense_unless_named(name):
    model, samples = family(name, 0)
    head, embed = model.lm_head.weight, model.get_input_embeddings().weight
    assert head is embed
    before = embed.detach().clone()
    report = prune_oneshot(model, samples, method="wanda", sparsity=0.5, progress=False, blocks=False)
    assert "lm_head" in report.skipped and "tied input embedding" in report.reasons["lm_head"]
    assert torch.equal(embed, before) and "lm_head" not in {r.name for r in report.layers}
    # named exactly: pruned, and the report lists every name of the weight
    report = prune_oneshot(model, None, method="magnitude", sparsity=0.5, progress=False, layers=["lm_head"])
    (result,) = report.layers
    assert result.name == "lm_head" and "lm_head.weight" in result.aliases and len(result.aliases) == 2
    assert embed.eq(0).float().mean().item() == 0.5


def test_untied_head_outside_the_blocks_is_pruned_in_one_pass():
    model, samples = family("qwen2", 0)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    report = prune_oneshot(model, samples, method="wanda", sparsity=0.5, progress=False, blocks=False)
    assert "lm_head" in {r.name for r in report.layers} and report.skipped == []


def test_samples_asking_for_a_cache_are_calibrated_without_one():
    model, samples = family("llama", 0)
    with_cache = [{**s, "use_cache": True} for s in samples]
    other = family("llama", 0)[0]
    prune_oneshot(model, with_cache, method="sparsegpt", sparsity=0.5, progress=False)
    prune_oneshot(other, samples, method="sparsegpt", sparsity=0.5, progress=False)
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n
    cache = transformers.DynamicCache(config=model.config)
    with pytest.raises(ValueError, match="must not carry a cache"):
        prune_oneshot(model, [{**samples[0], "past_key_values": cache}], method="wanda", progress=False)


def test_report_says_what_was_left_and_why():
    model, samples = family("gpt2", 0)
    report = prune_oneshot(model, samples, method="wanda", sparsity=0.5, progress=False)
    assert report.skipped == ["lm_head"] and "tied input embedding transformer.wte.weight" in report.reasons["lm_head"]
    assert report.full_captures == ["transformer.h.0"]  # every later block re-ran its pruned predecessor
    model, samples = family("t5", 0)
    report = prune_oneshot(model, samples, method="wanda", sparsity=0.5, progress=False)
    assert report.full_captures == ["encoder.block.0", "decoder.block.0"]  # the decoder sees the pruned encoder
