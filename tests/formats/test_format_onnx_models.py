"""ONNX export of real architectures: tiny GPT-2, Llama (caches), BERT, ViT and a CNN, checked with onnxruntime.

Every case leaves one submodule in a different train/eval mode from the root
(dropout p=0, so outputs stay deterministic) and checks that every module's own
flag and the model's cache setting come back unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
import prunekit.formats.onnx_export as ox
from prunekit.runtime.layers import runtime_layers

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
tf = pytest.importorskip("transformers")

VOCAB = 100


def _gpt2() -> nn.Module:
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                                             bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0)).eval()
    model.transformer.h[1].train()
    return model


def _llama() -> nn.Module:
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                               max_position_embeddings=32)).eval()
    model.model.layers[0].train()
    return model


def _bert() -> nn.Module:
    model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    model.encoder.layer[0].attention.train()
    return model


def _vit() -> nn.Module:
    model = tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=64, num_labels=5))
    model.train()  # root in train mode, one block in eval: the exact mix must come back
    model.vit.layers[1].eval()
    return model


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Dropout(p=0.0))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _cnn() -> nn.Module:
    model = _CNN().eval()
    model.features[5].train()  # dropout p=0 in train mode
    return model


def _ids(g: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 6), generator=g)


def _ids_and_mask(g: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    """Keyword inputs (GPT-2's second positional parameter is its cache): ids and a right-padding mask."""
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": _ids(g, batch), "attention_mask": mask}


def _pixels(g: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=g)


CASES = {"gpt2": (_gpt2, _ids_and_mask), "llama": (_llama, _ids), "bert": (_bert, _ids), "vit": (_vit, _pixels),
         "cnn": (_cnn, _pixels)}


def _sparsify(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in runtime_layers(model):
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) >= 0.8)
    return model


def _torch_outputs(model: nn.Module, x) -> list[np.ndarray]:
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(**x) if isinstance(x, dict) else model(x)
    finally:
        for m, t in was.items():
            m.training = t
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t.numpy() for t in leaves if isinstance(t, torch.Tensor)]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CASES))
def test_real_models_export_and_match_onnxruntime(family, tmp_path, single_thread):
    make, inputs = CASES[family]
    torch.manual_seed(0)
    model = _sparsify(make(), 0)
    modes = {name: m.training for name, m in model.named_modules()}
    assert len(set(modes.values())) == 2  # a real mix of train and eval
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    g = torch.Generator().manual_seed(0)
    path = tmp_path / f"{family}.onnx"
    result = prunekit.export_onnx(model, inputs(g, 2), path)
    assert result.max_rel_error <= 1e-4
    assert {name: m.training for name, m in model.named_modules()} == modes
    if family in ("gpt2", "llama"):
        assert use_cache is True and config.use_cache is True  # disabled for the export only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, batch in ((1, 2), (2, 3)):  # fresh inputs, another batch size too (dim 0 is dynamic)
        x = inputs(torch.Generator().manual_seed(seed), batch)
        feeds = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {
            session.get_inputs()[0].name: x.numpy()}
        got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()} if isinstance(x, dict)
                          else feeds)
        want = _torch_outputs(model, x)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_second_check_input_draws_token_ids_from_the_whole_vocabulary():
    model = tf.BertModel(tf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, vocab_size=VOCAB, max_position_embeddings=32))
    ids = torch.randint(0, 5, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    pixels = torch.randn(2, 3)
    second_ids, second_mask, second_pixels = ox._random_like(model, (ids, mask, pixels))
    assert second_ids.shape == ids.shape and second_ids.dtype == ids.dtype
    assert 0 <= int(second_ids.min()) and int(second_ids.max()) < VOCAB and int(second_ids.max()) >= 5
    assert torch.equal(second_mask, mask)  # later integer inputs (masks, token types) stay as given
    assert second_pixels.shape == pixels.shape and not torch.equal(second_pixels, pixels)
    # Negative control: without an embedding, ids stay within the example's own range.
    plain, = ox._random_like(nn.Linear(2, 2), (ids,))
    assert int(plain.max()) < 5 and not torch.equal(plain, ids)


class _Cache:
    """Stands in for a KV cache object a model returns next to its tensors."""


class _ReturnsCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor):
        return {"y": self.lin(x), "past": _Cache()}


def test_a_cache_in_the_output_is_refused_in_one_line(tmp_path):
    with pytest.raises(RuntimeError) as info:
        prunekit.export_onnx(_ReturnsCache(), torch.randn(2, 4), tmp_path / "m.onnx")
    message = str(info.value)
    assert "\n" not in message and "_ReturnsCache" in message and "_Cache" in message
    assert "use_cache=False" in message
    assert not list(tmp_path.iterdir())


def test_decoder_cache_is_what_disabling_avoids(tmp_path, monkeypatch):
    """Negative control: without disabling the cache, GPT-2's output holds a DynamicCache and is refused."""
    import contextlib

    monkeypatch.setattr(ox, "cache_disabled", lambda model: contextlib.nullcontext())
    model = _gpt2()
    with pytest.raises(RuntimeError, match="holds a DynamicCache") as info:
        prunekit.export_onnx(model, torch.randint(0, VOCAB, (2, 5)), tmp_path / "m.onnx")
    assert "\n" not in str(info.value)
    assert model.transformer.h[1].training and not model.training  # modes restored on failure too


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:  # data-dependent Python control flow: torch.export cannot capture it
            return self.lin(x)
        return -self.lin(x)


@pytest.mark.slow
def test_export_failure_names_the_cause_on_its_first_line(tmp_path):
    with pytest.raises(RuntimeError) as info:
        prunekit.export_onnx(_Branchy(), torch.randn(2, 4), tmp_path / "m.onnx")
    first = str(info.value).splitlines()[0]
    assert first.startswith("export_onnx: torch.onnx.export failed on _Branchy: ")
    assert "Failed to export the model" not in first  # the wrapper's generic text is not the cause
    root = info.value
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    assert type(root).__name__ in first
    assert not list(tmp_path.iterdir())
