"""Multiply-accumulate counts of a forward pass, from the layers' real call shapes.

Counted: convolutions (``out.numel() * in_channels/groups * prod(kernel)``),
linear layers (``out.numel() * in_features``), ``nn.MultiheadAttention``
(projections plus the two attention matmuls) and ``nn.LSTM`` (4 gates of input
and hidden products per step, layer and direction). Everything else
(activations, norms, pooling, additions) is ignored, as is customary.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import torch
from torch import nn

from ..._modes import in_mode
from .graph import call_model

__all__ = ["count_macs", "count_params"]


def _is_conv1d(module: nn.Module) -> bool:
    mod = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(mod, "Conv1D", None) if mod is not None else None
    return isinstance(conv1d, type) and isinstance(module, conv1d)


def count_params(model: nn.Module) -> int:
    """Number of parameter entries.

    Example:
        >>> count_params(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


def _layer_macs(module: nn.Module, inputs: tuple, output: Any) -> int:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return inputs[0].numel() * module.out_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if _is_conv1d(module):  # transformers' Conv1D: weight (in, out)
        return output.numel() * module.weight.shape[0]
    if isinstance(module, nn.MultiheadAttention):
        query, key = inputs[0], inputs[1]
        tokens_q, tokens_k = query.numel() // query.shape[-1], key.numel() // key.shape[-1]
        inner = module.in_proj_weight.shape[0] // 3
        source = key.shape[1 if query.dim() == 3 and module.batch_first else 0]
        proj = tokens_q * inner * query.shape[-1] + 2 * tokens_k * inner * key.shape[-1]
        attention = 2 * tokens_q * source * inner
        return proj + attention + tokens_q * inner * module.out_proj.out_features
    if isinstance(module, nn.LSTM):
        x = inputs[0]
        steps = x.numel() // x.shape[-1]
        h = module.hidden_size
        directions = 2 if module.bidirectional else 1
        first = module.input_size
        later = h * directions
        per_dir = 4 * h * (first + h) + (module.num_layers - 1) * 4 * h * (later + h)
        return steps * directions * per_dir
    return 0


def count_macs(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """MACs of one forward pass of ``model`` on ``example_input`` (run in eval mode under ``no_grad``).

    Example:
        >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 4, 4))  # 8*4*4 outputs * 3*3*3
        3456
    """
    total = [0]

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        total[0] += _layer_macs(module, args, output[0] if isinstance(output, tuple) else output)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention, nn.LSTM)) or _is_conv1d(m)]
    try:
        with in_mode(model, training=False), torch.no_grad():  # running statistics must not move
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]
