"""The model zoo: tiny random-init configs of real architectures, each with a seeded example input.

Each :class:`Family` builds a model in eval mode from a seed and gives a
matching example input (a mapping of keyword arguments: token ids with an
attention mask whose second row is padded for language models, ``pixel_values``
for vision models, ``x`` for the plain torch models). :func:`output` picks the
tensor to compare (``logits``, ``last_hidden_state`` or the plain output).
Every API under test takes the mapping as it is (``model(**inputs)``).

Sizes are tiny on purpose (hidden 32-64, 2 layers, vocab <= 128, images 32 px):
the zoo checks structure and exact equivalence, not quality.

Example:
    >>> fam = FAMILIES["lenet5"]
    >>> model, inputs = fam.build(0), fam.example(0)
    >>> output(model, inputs).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.apps.models import LeNet5, RowLSTM

__all__ = ["Family", "FAMILIES", "HF_FAMILIES", "TORCH_FAMILIES", "output", "SamePadConv2d",
           "EfficientNetLike", "TransformerEncoderNet"]

VOCAB = 96
SEQ = 8
IMAGE = 32


@dataclass(frozen=True)
class Family:
    """One architecture of the zoo.

    Attributes:
        name: short name used in test ids and the coverage table.
        build: ``seed -> model`` (random init drawn from the seed; eval mode).
        example: ``seed -> {argument: tensor}`` (a new input of the same shapes per seed).
        kind: ``"lm"``, ``"encoder"``, ``"seq2seq"``, ``"vision"`` or ``"torch"``.
        blocks: the block lists one-shot pruning should find, as its report names them; ``False``:
            the model has none (one-shot must ask for ``blocks=False``, then calibrates in one pass).
        first_in_last_block: a layer inside the last block whose input is the block input
            (through norms only), used to check one-shot calibration against a full forward.
        source: where the architecture comes from, for the coverage table.
    """

    name: str
    build: Callable[[int], nn.Module]
    example: Callable[[int], dict[str, torch.Tensor]]
    kind: str
    blocks: str | bool = False
    first_in_last_block: str | None = None
    source: str = "transformers"


def output(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor to compare: ``logits``, else ``last_hidden_state``, else the output itself (or its first entry)."""
    out = model(**inputs)
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# -- inputs ---------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + seed)


def _tokens(seed: int) -> dict[str, torch.Tensor]:
    gen = _generator(seed)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=gen)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - 3:] = 0  # a right-padded second row: the mask has to reach every block
    return {"input_ids": ids, "attention_mask": mask}


def _seq2seq(seed: int) -> dict[str, torch.Tensor]:
    inputs = _tokens(seed)
    inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=_generator(50 + seed))
    return inputs


def _pixels(seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, IMAGE, IMAGE, generator=_generator(seed))}


def _tensor(*shape: int) -> Callable[[int], dict[str, torch.Tensor]]:
    return lambda seed: {"x": torch.randn(2, *shape, generator=_generator(seed))}


# -- transformers families -----------------------------------------------------------------------


def _hf(class_name: str, config_name: str, **config: Any) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, class_name)(cfg).eval()
    build.__name__ = f"build_{class_name}"
    return build


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                max_position_embeddings=64)

HF_FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                       n_head=4, bos_token_id=1, eos_token_id=2), _tokens, "lm", "transformer.h", "transformer.h.1.attn.c_attn"),
    Family("bert", _hf("BertModel", "BertConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
           _tokens, "encoder", "encoder.layer", "encoder.layer.1.attention.self.query"),
    Family("llama", _hf("LlamaForCausalLM", "LlamaConfig", **_DECODER, num_attention_heads=4, num_key_value_heads=2),
           _tokens, "lm", "model.layers", "model.layers.1.self_attn.q_proj"),
    Family("qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", **_DECODER, num_attention_heads=4, num_key_value_heads=2),
           _tokens, "lm", "model.layers", "model.layers.1.self_attn.q_proj"),
    Family("opt", _hf("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
           _tokens, "lm", "model.decoder.layers", "model.decoder.layers.1.self_attn.q_proj"),
    Family("t5", _hf("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                     num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                     decoder_start_token_id=0), _seq2seq, "seq2seq", "encoder.block, decoder.block",
           "decoder.block.1.layer.0.SelfAttention.q"),
    Family("vit", _hf("ViTForImageClassification", "ViTConfig", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, image_size=IMAGE, patch_size=8, num_labels=10),
           _pixels, "vision", "vit.layers", "vit.layers.1.attention.q_proj"),
    Family("resnet", _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32],
                         depths=[1, 1], layer_type="basic", num_labels=10), _pixels, "vision",
           "resnet.encoder.stages"),
    Family("mobilenet_v2", _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", depth_multiplier=0.25,
                               image_size=IMAGE, num_labels=10), _pixels, "vision", "mobilenet_v2.layer"),
    # layer scale 1 instead of 1e-6: a trained ConvNeXt's blocks matter; at 1e-6 they barely touch the output
    Family("convnext", _hf("ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32],
                           depths=[1, 1], layer_scale_init_value=1.0, num_labels=10), _pixels, "vision",
           "convnext.encoder.stages"),
)}


# -- plain torch families ------------------------------------------------------------------------


class SamePadConv2d(nn.Conv2d):
    """A TensorFlow-style 'same'-padding convolution, as EfficientNet ports write it.

    Like those ports: the constructor has its own signature (``image_size`` is
    required), the padding lives in an ``nn.ZeroPad2d`` child computed for one
    input size, and ``forward`` calls ``F.conv2d`` itself.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *, image_size: int,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=bias)
        out = -(-image_size // stride)
        pad = max((out - 1) * stride + kernel_size - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise, squeeze-excite, 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, stride: int, size: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = SamePadConv2d(cin, mid, 1, image_size=size)
        self.bn0 = nn.BatchNorm2d(mid)
        self.depthwise = SamePadConv2d(mid, mid, 3, stride, image_size=size, groups=mid)
        self.bn1 = nn.BatchNorm2d(mid)
        self.se_reduce = SamePadConv2d(mid, max(1, cin // 4), 1, image_size=1, bias=True)
        self.se_expand = SamePadConv2d(max(1, cin // 4), mid, 1, image_size=1, bias=True)
        self.project = SamePadConv2d(mid, cout, 1, image_size=-(-size // stride))
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn0(self.expand(x)))
        y = F.relu6(self.bn1(self.depthwise(y)))
        s = self.se_expand(F.relu6(self.se_reduce(F.adaptive_avg_pool2d(y, 1))))
        y = self.bn2(self.project(torch.sigmoid(s) * y))
        return y + x if self.skip else y


class EfficientNetLike(nn.Module):
    """A two-block EfficientNet-style CNN built from :class:`SamePadConv2d` (32x32 inputs, 10 classes)."""

    def __init__(self, size: int = IMAGE) -> None:
        super().__init__()
        self.stem = SamePadConv2d(3, 16, 3, 2, image_size=size)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.ModuleList([_MBConv(16, 16, 1, size // 2), _MBConv(16, 24, 2, size // 2)])
        self.head = SamePadConv2d(24, 48, 1, image_size=size // 4)
        self.bn_head = nn.BatchNorm2d(48)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = F.relu6(self.bn_head(self.head(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TransformerEncoderNet(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, d_model 32, 4 heads) between a Linear embedding and a Linear head."""

    def __init__(self, features: int = 12, d_model: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def _torch(factory: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = factory().eval()
        # running statistics as a trained network has them, so BatchNorm is not an identity
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
        return model
    build.__name__ = f"build_{getattr(factory, '__name__', 'model')}"
    return build


TORCH_FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("lenet5", _torch(LeNet5), _tensor(1, 28, 28), "torch", False, source="prunekit.apps.models"),
    Family("row_lstm", _torch(lambda: RowLSTM(hidden_size=32, steps=8, features=8)), _tensor(8, 8), "torch", False,
           source="prunekit.apps.models"),
    Family("transformer_encoder", _torch(TransformerEncoderNet), _tensor(SEQ, 12), "torch", "encoder.layers",
           source="torch.nn"),
    Family("efficientnet_like", _torch(EfficientNetLike), _tensor(3, IMAGE, IMAGE), "torch", "blocks",
           source="tests.zoo"),
)}

FAMILIES: dict[str, Family] = {**HF_FAMILIES, **TORCH_FAMILIES}
