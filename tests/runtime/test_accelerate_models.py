"""accelerate() on real architectures: transformers GPT-2 (Conv1D), BERT, Llama and ViT tiny configs.

Oracle: the same model with exact zeros, run dense. Accelerated layers must keep the
attributes model code reads (ViT reads ``projection.weight.dtype`` in its forward).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.runtime import SparseConv2d, SparseLinear, accelerate
from prunekit.runtime.layers import runtime_layers
from prunekit.runtime.selection import relative_error

tf = pytest.importorskip("transformers")


def _gpt2() -> nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                            bos_token_id=0, eos_token_id=0))


def _bert() -> nn.Module:
    return tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=32))


def _llama() -> nn.Module:
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                              max_position_embeddings=32))


def _vit() -> nn.Module:
    return tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, num_labels=5))


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def _pixels(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


MODELS = {"gpt2": (_gpt2, _ids), "bert": (_bert, _ids), "llama": (_llama, _ids), "vit": (_vit, _pixels)}


def _sparsify(model: nn.Module, seed: int, sparsity: float = 0.9) -> nn.Module:
    """The dense-with-zeros oracle: ~90% of every replaceable weight set to exact zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in runtime_layers(model):
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=g) >= sparsity)
    return model.eval()


def _main(out) -> torch.Tensor:
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def _check_attributes(orig: nn.Module, fast: nn.Module) -> None:
    """Every attribute that inspecting code reads agrees with the dense layer it replaced."""
    w = orig.weight.detach()
    assert torch.equal(fast.weight, w) and fast.weight.shape == w.shape
    assert fast.weight.dtype == fast.dtype == w.dtype and fast.weight.device == fast.device == w.device
    assert torch.equal(fast.bias, orig.bias.detach()) if orig.bias is not None else fast.bias is None
    if isinstance(orig, nn.Linear):
        assert (fast.in_features, fast.out_features) == (orig.in_features, orig.out_features)
    elif isinstance(orig, nn.Conv2d):
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode"):
            assert tuple(getattr(fast, name)) == tuple(getattr(orig, name)) if isinstance(
                getattr(orig, name), (tuple, list)) else getattr(fast, name) == getattr(orig, name), name
    else:  # transformers Conv1D: weight (in, out)
        assert fast.transposed and (fast.nx, fast.nf) == (orig.nx, orig.nf) == tuple(w.shape)
    assert list(fast.parameters()) == []  # nothing an optimizer could train


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("family", list(MODELS))
def test_transformers_models_match_the_dense_oracle(family, seed, single_thread):
    make, inputs = MODELS[family]
    torch.manual_seed(seed)
    model = _sparsify(make(), seed)
    x = inputs(seed)
    originals = dict(runtime_layers(model))
    fast, report = accelerate(model, x, formats=("csr",), repeats=1, progress=False)
    assert report.max_relative_error <= 1e-5
    replaced = dict(fast.named_modules())
    assert set(report.choices) == set(originals) and set(report.choices.values()) == {"csr"}
    for name, orig in originals.items():
        assert isinstance(replaced[name], SparseConv2d if isinstance(orig, nn.Conv2d) else SparseLinear), name
        _check_attributes(orig, replaced[name])
    for other in (x, inputs(seed + 10)):  # the example and a fresh input
        with torch.inference_mode():
            assert relative_error(_main(fast(other)), _main(model(other))) <= 1e-5
    if family == "gpt2":  # Conv1D layers are found and replaced (weight (in, out))
        assert report.layers[0].kind == "Conv1D" and replaced["transformer.h.0.attn.c_attn"].weight.shape == (32, 96)
        assert (report.layers[0].in_features, report.layers[0].out_features) == (32, 96)
    if family == "vit":  # its forward reads projection.weight.dtype
        assert isinstance(fast.vit.embeddings.patch_embeddings.projection, SparseConv2d)


def test_weight_view_is_read_only_and_untrainable():
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) > 0.8)
    sparse = SparseLinear.from_linear(lin, "csr")
    w = sparse.weight
    assert torch.equal(w, lin.weight.detach()) and not w.requires_grad
    with pytest.raises(RuntimeError, match="requires_grad"):
        w.requires_grad_()
    with pytest.raises(RuntimeError, match="nference"):
        nn.Parameter(sparse.weight)
    with pytest.raises(RuntimeError, match="Inplace"):
        sparse.weight.mul_(0)
    with pytest.raises(AttributeError, match="read-only"):
        sparse.weight = torch.zeros(8, 16)
    with pytest.raises(KeyError):
        sparse.weight = nn.Parameter(torch.zeros(8, 16))
    assert torch.equal(sparse.weight, lin.weight.detach())  # nothing above reached the module
    assert "weight" not in sparse.state_dict() and list(sparse.parameters()) == []
    conv = SparseConv2d(nn.Conv2d(3, 4, 3), "csr")
    with pytest.raises(AttributeError, match="read-only"):
        conv.weight = torch.zeros(4, 3, 3, 3)


# ---- nn.Conv2d / nn.Linear subclasses -------------------------------------------------------------

class DynamicSame(nn.Conv2d):
    """TensorFlow 'SAME' padding computed from each input's size (as EfficientNet ports do)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__(cin, cout, k, stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = nn.functional.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride)


class StaticSame(nn.Conv2d):
    """Fixed zero padding held in ``static_padding`` (for one image size)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, pad: tuple[int, int, int, int]) -> None:
        super().__init__(cin, cout, k, stride)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride)


class ReflectFirst(nn.Conv2d):
    """Pads by reflection in its forward: no sparse module reproduces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, [1, 1, 1, 1], mode="reflect"))


class Renamed(nn.Conv2d):
    """A subclass that keeps nn.Conv2d's forward."""


class Scaled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class Traced(nn.Linear):
    """Own forward, same function as nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dyn = DynamicSame(3, 8, 3, stride=2)
        self.static = StaticSame(8, 8, 3, 1, (1, 1, 1, 1))
        self.dyn5 = DynamicSame(8, 8, 5, stride=1)
        self.reflect = ReflectFirst(8, 8, 3)
        self.renamed = Renamed(8, 8, 1)
        self.scaled = Scaled(8, 16)
        self.traced = Traced(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dyn(x))
        x = torch.relu(self.static(x))
        x = torch.relu(self.dyn5(x))
        x = self.renamed(self.reflect(x)).mean(dim=(2, 3))
        return self.traced(torch.relu(self.scaled(x)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_and_linear_subclasses_reproduced_or_kept_dense_with_reason(seed, single_thread):
    torch.manual_seed(seed)
    model = _sparsify(SubclassNet(), seed)
    x = torch.randn(2, 3, 11, 13)
    fast, report = accelerate(model, x, formats=("csr",), repeats=1, progress=False)
    notes = {layer.name: " ".join(layer.notes) for layer in report.layers}
    for name in ("dyn", "static", "dyn5", "renamed"):
        assert isinstance(getattr(fast, name), SparseConv2d), (name, notes[name])
    assert fast.dyn.pre_pad == "same" and fast.static.pre_pad == (1, 1, 1, 1) and fast.renamed.pre_pad is None
    assert isinstance(fast.traced, SparseLinear)
    assert type(fast.reflect) is ReflectFirst and "ReflectFirst.forward differs" in notes["reflect"]
    assert type(fast.scaled) is Scaled and "Scaled.forward differs from nn.Linear.forward" in notes["scaled"]
    assert report.choices["reflect"] == report.choices["scaled"] == "dense"
    # Dynamic padding depends on the input size: other sizes (odd/even vs the stride) must agree too.
    for shape in ((2, 3, 11, 13), (1, 3, 16, 16), (3, 3, 9, 10)):
        xi = torch.randn(shape)
        with torch.inference_mode():
            assert relative_error(fast(xi), model(xi)) <= 1e-5, shape


def test_negative_control_plain_padding_would_be_wrong():
    """Without the detected pre-padding the same-padding subclass gives a different output."""
    torch.manual_seed(0)
    conv = _sparsify(nn.Sequential(DynamicSame(3, 4, 3, stride=2)), 0)[0]
    x = torch.randn(1, 3, 10, 11)
    with torch.inference_mode():
        ref = conv(x)
        assert relative_error(SparseConv2d(conv, "csr")(x), ref) <= 1e-5  # "auto" finds 'same'
        wrong = SparseConv2d(conv, "csr", pre_pad=None)(x)
    assert wrong.shape != ref.shape or relative_error(wrong, ref) > 1e-2
    with pytest.raises(TypeError, match="ReflectFirst.forward differs"):
        SparseConv2d(ReflectFirst(3, 4, 3))


def test_efficientnet_lite_same_padding_convs(single_thread):
    """The convolution classes of the efficientnet-lite-pytorch port (dynamic and static 'same')."""
    utils = pytest.importorskip("efficientnet_lite_pytorch.utils")
    torch.manual_seed(0)
    model = nn.Sequential(utils.Conv2dDynamicSamePadding(3, 8, 3, stride=2), nn.ReLU(),
                          utils.Conv2dStaticSamePadding(8, 8, 5, stride=2, image_size=8), nn.ReLU(),
                          utils.Conv2dDynamicSamePadding(8, 8, 3, stride=1, groups=8))
    _sparsify(model, 0)
    x = torch.randn(2, 3, 16, 15)
    fast, report = accelerate(model, x, formats=("csr",), repeats=1, progress=False)
    assert isinstance(fast[0], SparseConv2d) and fast[0].pre_pad == "same"
    assert isinstance(fast[2], SparseConv2d) and fast[2].pre_pad == tuple(model[2].static_padding.padding)
    assert report.choices["4"] == "dense" and "groups=8" in " ".join(report.layers[2].notes)
    for shape in ((2, 3, 16, 15), (1, 3, 17, 16)):
        xi = torch.randn(shape)
        with torch.inference_mode():
            assert relative_error(fast(xi), model(xi)) <= 1e-5
