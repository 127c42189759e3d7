"""Small random-init configs of real architectures (transformers and torch) for structural pruning tests."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 100


def hf_models() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """``{name: (factory, input kind)}``; input kind ``"tokens"`` or ``"image16"``/``"image32"``."""
    import transformers as T

    def gpt2() -> nn.Module:
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16,
                                              use_cache=False, bos_token_id=0, eos_token_id=0))

    def bert() -> nn.Module:
        return T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16),
                           add_pooling_layer=False)

    def llama() -> nn.Module:
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
                                                use_cache=False, max_position_embeddings=16))

    def qwen2() -> nn.Module:
        return T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB,
                                                use_cache=False, max_position_embeddings=16))

    def vit() -> nn.Module:
        return T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=48, image_size=16, patch_size=4,
                                                       num_labels=5))

    def resnet() -> nn.Module:
        return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                                             depths=[1, 1], num_labels=5))

    def mobilenet_v2() -> nn.Module:
        return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(depth_multiplier=0.25, image_size=32,
                                                                       num_labels=5))

    def convnext() -> nn.Module:
        return T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                                 num_stages=2, num_labels=5))

    return {"gpt2": (gpt2, "tokens"), "bert": (bert, "tokens"), "llama": (llama, "tokens"),
            "qwen2": (qwen2, "tokens"), "vit": (vit, "image16"), "resnet": (resnet, "image32"),
            "mobilenet_v2": (mobilenet_v2, "image32"), "convnext": (convnext, "image32")}


def make_input(kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "tokens":
        return torch.randint(0, VOCAB, (2, 7), generator=generator)
    size = int(kind.removeprefix("image"))
    return torch.randn(2, 3, size, size, generator=generator)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (norm scales, biases and BatchNorm statistics too), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        stats = [(n, b) for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
        for name, tensor in [*model.named_parameters(), *stats]:  # not rotary tables and the like
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model.eval()


def logits(out: object) -> torch.Tensor:
    """The main tensor of a model output (transformers ModelOutput or a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if "logits" in out else out["last_hidden_state"]


# -- torch architectures -----------------------------------------------------------------------------


class SamePadConv2d(nn.Conv2d):
    """TF-style 'same' padding computed in forward from the input size (as EfficientNet ports do)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet-Lite style block: expand 1x1, depthwise k x k (same padding), SE, project 1x1, residual."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(SamePadConv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.dw = nn.Sequential(SamePadConv2d(mid, mid, 3, stride, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.ReLU6())
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.project = nn.Sequential(SamePadConv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return out + x if self.residual else out


class EfficientLite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(SamePadConv2d(3, 16, 3, 2, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(MBConv(16, 16, 1, 1), MBConv(16, 24, 4, 2), MBConv(24, 24, 4, 1))
        self.head = nn.Sequential(SamePadConv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1), 1))


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, batch first) between an embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class UNetish(nn.Module):
    """Down with a strided conv, GroupNorm (4 groups), up with a ConvTranspose2d, skip concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.inc = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(4, 32)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.norm2 = nn.GroupNorm(2, 16)
        self.out = nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.inc(x))
        y = F.silu(self.norm(self.down(skip)))
        y = F.relu(self.norm2(self.up(y)))
        return self.out(torch.cat([skip, y], dim=1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w)


class Shuffle(nn.Module):
    """ShuffleNet-style: 1x1, channel shuffle (2 groups), depthwise 3x3, grouped 1x1 (3 groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.g1 = nn.Sequential(nn.Conv2d(24, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24))
        self.g2 = nn.Sequential(nn.Conv2d(24, 24, 1, groups=3, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.g2(self.dw(channel_shuffle(self.g1(F.relu(self.stem(x))), 2)))
        return self.fc(x.mean(dim=(2, 3)))


TORCH_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "efficient_lite": (EfficientLite, (2, 3, 17, 17)),
    "transformer_encoder": (Encoder, (2, 5, 6)),
    "unet_groupnorm_convtranspose": (UNetish, (2, 3, 8, 8)),
    "channel_shuffle": (Shuffle, (2, 3, 8, 8)),
}
