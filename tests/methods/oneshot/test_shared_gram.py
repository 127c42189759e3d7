"""One X Xᵀ per input tensor shared between the Linear layers that read it (q/k/v, gate/up): exact."""

from __future__ import annotations

import copy

import pytest
import torch

from prunekit.methods.oneshot import prune_oneshot
from prunekit.methods.oneshot import calibration as cal
from prunekit.methods.oneshot.layers import Layer

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def samples(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 97, (1, 16), generator=g)} for _ in range(3)]


def linears(model: torch.nn.Module) -> dict[str, Layer]:
    return {n: Layer.of(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n.startswith("model.layers.")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_grams_are_bit_identical_and_computed_once_per_input(seed, monkeypatch):
    model, data = tiny_llama(seed), samples(seed)
    run = lambda: [cal.call_model(model, s) for s in data]  # noqa: E731
    counted = []
    real = cal.SharedProduct.get

    def spy(self, layer, args, compute):
        out = real(self, layer, args, compute)
        counted.append(self.computed)
        return out

    plain = cal.gather_grams(run, linears(model), share=False)
    monkeypatch.setattr(cal.SharedProduct, "get", spy)
    shared = cal.gather_grams(run, linears(model), share=True)
    assert plain.keys() == shared.keys()
    for name in plain:
        assert torch.equal(plain[name], shared[name]), name
    # 7 Linear layers per block read 4 distinct inputs (q/k/v one, o, gate/up one, down): 4 products, not 7
    calls, blocks = len(data) * 2 * 7, 2
    assert len(counted) == calls and counted[-1] == len(data) * blocks * 4
    # Not vacuous: layers that share an input have equal Grams, the others do not
    block = "model.layers.0."
    assert torch.equal(shared[block + "self_attn.q_proj"], shared[block + "self_attn.v_proj"])
    assert not torch.equal(shared[block + "self_attn.q_proj"], shared[block + "mlp.gate_proj"])


def test_an_input_modified_in_place_between_two_layers_is_not_shared():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)

    def run():
        a(x)
        x.mul_(2.0)  # same object, new version: b must see its own product
        b(x)

    grams = cal.gather_grams(run, {"a": Layer.of("a", a), "b": Layer.of("b", b)})
    torch.testing.assert_close(grams["b"], 4.0 * grams["a"])


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_prune_oneshot_unchanged_by_sharing(method, monkeypatch):
    model, data = tiny_llama(3), samples(3)
    reference = copy.deepcopy(model)
    prune_oneshot(model, data, method=method, sparsity=0.5, layers="model.layers.*", progress=False)
    real = cal.gather_grams
    monkeypatch.setattr("prunekit.methods.oneshot.prune.gather_grams",
                        lambda run, layers: real(run, layers, share=False))
    prune_oneshot(reference, data, method=method, sparsity=0.5, layers="model.layers.*", progress=False)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
