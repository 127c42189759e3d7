"""A zoo of small architectures and independent helpers for structural pruning tests."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 40), nn.ReLU(), nn.Linear(40, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layer1 = Block(16, 16, 1)
        self.layer2 = Block(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dense = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(16 + i * growth), nn.ReLU(), nn.Conv2d(16 + i * growth, growth, 3, padding=1))
            for i in range(3))
        self.transition = nn.Sequential(nn.BatchNorm2d(16 + 3 * growth), nn.ReLU(),
                                        nn.Conv2d(16 + 3 * growth, 20, 1), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.dense:
            x = torch.cat([x, layer(x)], dim=1)
        return self.head(self.transition(x))


class MobileNet(nn.Module):
    """Depthwise-separable blocks, an inverted residual, a grouped conv and a chunk gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16), nn.ReLU6())
        self.dw = nn.Sequential(conv_bn(16, 16, 3, 1, groups=16), nn.ReLU6())   # depthwise
        self.pw = conv_bn(16, 24, 1)
        self.expand = nn.Sequential(conv_bn(24, 48, 1), nn.ReLU6())
        self.dw2 = nn.Sequential(conv_bn(48, 96, 3, 2, groups=48), nn.ReLU6())   # depthwise, multiplier 2
        self.project = conv_bn(96, 24, 1)
        self.down = conv_bn(24, 24, 1, 2)
        self.grouped = nn.Sequential(conv_bn(24, 32, 3, 1, groups=4), nn.ReLU())  # 4 groups
        self.gate = nn.Conv2d(32, 40, 1)
        self.fc = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        x = self.project(self.dw2(self.expand(x))) + self.down(x)  # inverted residual with a shortcut
        a, b = self.gate(self.grouped(x)).chunk(2, dim=1)
        x = a * torch.sigmoid(b)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class EncoderBlock(nn.Module):
    """Pre-embedding, one transformer encoder block (MHA + FFN + LayerNorm residuals), a head."""

    def __init__(self, features: int = 12, dim: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        x = self.norm2(x + self.ffn(x))
        return self.head(x.mean(dim=1))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 10)
        self.lstm = nn.LSTM(10, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24 + 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.lstm(torch.relu(self.proj(x)))
        return self.head(torch.cat([out[:, -1], h[-1]], dim=1))


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "vgg": (VGG, (3, 3, 16, 16)),
    "resnet": (ResNet, (3, 3, 16, 16)),
    "densenet": (DenseNet, (3, 3, 12, 12)),
    "mobilenet": (MobileNet, (3, 3, 16, 16)),
    "transformer": (EncoderBlock, (3, 7, 12)),
    "lstm": (Recurrent, (3, 5, 6)),
}


def build(name: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """The model with random weights and BatchNorm statistics (eval mode), and a random input."""
    factory, shape = ZOO[name]
    torch.manual_seed(seed)
    model = factory()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.2, 1.5)
                module.bias.normal_(0, 0.3)
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval(), torch.randn(shape)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def reference_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of convolutions and linear layers, counted from each call's tensors."""
    total = [0]

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            n, _, h, w = out.shape
            per_output = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            total[0] += n * module.weight.shape[0] * h * w * per_output
        else:
            total[0] += math.prod(out.shape[:-1]) * module.weight.shape[0] * module.weight.shape[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]
