"""The layers one-shot pruning solves, each seen as an ``(out, in·k)`` matrix problem.

A :class:`Layer` pairs a module with the matrix view of its weight (rows index
outputs, columns index inputs, kernel positions innermost) and with the matching
view of its inputs: one row per token (``Linear``, transformers ``Conv1D``) or per
output position of a convolution (its im2col patches). ``y = rows(x) @ M.T + b``
holds for every supported layer, which is checked on the first calibration call,
so a subclass whose forward does something else is refused instead of being
solved on the wrong problem.

Supported: ``nn.Linear`` and subclasses, transformers' ``Conv1D`` (weight stored
``(in, out)``), ``nn.Conv1d/2d/3d`` and subclasses (any stride, padding mode,
dilation; grouped and depthwise convolutions are solved per group).

Example:
    >>> conv = nn.Conv2d(3, 4, 3, padding=1)
    >>> layer = Layer.of("conv", conv)
    >>> layer.matrix().shape, layer.groups
    (torch.Size([4, 27]), 1)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layerspec import WeightSpec, prunable_parameter_names, weight_spec

__all__ = ["Layer", "UnsupportedLayer", "is_conv1d", "layer_kind"]


class UnsupportedLayer(ValueError):
    """A layer in scope that one-shot pruning cannot solve (the message says what to pass to skip it)."""


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``)."""
    # only an already imported transformers can have built one: never import it here (slow)
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return isinstance(conv1d, type) and isinstance(module, conv1d)


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d_t"`` (transformers Conv1D), ``"conv"``, ``"unsupported"``, or ``None`` (not prunable).

    ``"unsupported"``: a layer with a prunable weight that one-shot cannot solve
    (transposed convolutions, ``Bilinear``, RNNs, ``MultiheadAttention``, custom
    registered layers). Embeddings are lookups, not computations on activations:
    one-shot leaves them to the other pruners (``None``).

    Example:
        >>> layer_kind(nn.Linear(2, 2)), layer_kind(nn.ConvTranspose2d(2, 2, 3)), layer_kind(nn.ReLU())
        ('linear', 'unsupported', None)
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d_t"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "unsupported"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return None
    if isinstance(module, (nn.Bilinear, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)):
        return "unsupported"
    return "unsupported" if _declared_prunable(module) else None


def _declared_prunable(module: nn.Module) -> bool:
    """A custom layer registered with ``prunekit.register_prunable`` (one-shot has no input view for it)."""
    return bool(prunable_parameter_names(module))


def _tf_same_padding(conv: nn.modules.conv._ConvNd, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """``F.pad`` amounts of TensorFlow's 'SAME' padding (as EfficientNet ports compute it in forward)."""
    pads: list[int] = []
    for size, k, s, d in zip(spatial, conv.kernel_size, conv.stride, conv.dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append(total // 2)
        pads.append(total - total // 2)
    flat: list[int] = []
    for i in reversed(range(len(spatial))):  # F.pad takes the last dimension first
        flat += pads[2 * i:2 * i + 2]
    return tuple(flat)


def im2col(conv: nn.modules.conv._ConvNd, x: torch.Tensor, pad: tuple[int, ...] | None = None) -> torch.Tensor:
    """The convolution's input patches: ``(positions, in·k)``, columns ordered like ``weight.reshape(out, -1)``.

    ``pad``: the ``F.pad`` amounts (default: the module's own padding and padding mode).

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> y = im2col(conv, x) @ conv.weight.reshape(3, -1).T
        >>> torch.allclose(y.T.reshape(1, 3, 3, 3), conv(x), atol=1e-6)
        True
    """
    nd = len(conv.kernel_size)
    if x.dim() == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    pad = conv._reversed_padding_repeated_twice if pad is None else pad
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if any(pad):
        x = F.pad(x, list(pad), mode=mode)
    for d in range(nd):
        span = conv.dilation[d] * (conv.kernel_size[d] - 1) + 1
        x = x.unfold(2 + d, span, conv.stride[d])
    x = x[(..., *[slice(None, None, dil) for dil in conv.dilation])]  # (N, C, *L, *k)
    n, c = x.shape[:2]
    positions = x.shape[2:2 + nd]
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))  # (N, *L, C, *k)
    return x.reshape(n * math.prod(positions), c * math.prod(conv.kernel_size))


def _conv_output_rows(y: torch.Tensor, nd: int) -> torch.Tensor:
    """A convolution's output ``(N, out, *L)`` as ``(positions, out)``, positions ordered like :func:`im2col`."""
    if y.dim() == nd + 1:
        y = y.unsqueeze(0)
    return y.movedim(1, -1).reshape(-1, y.shape[1])


@dataclass
class Layer:
    """One prunable layer and its ``(out, in·k)`` matrix view.

    Attributes:
        name: the module's name in the model.
        module: the module.
        kind: see :func:`layer_kind`.
        groups: independent row/column groups (a grouped convolution's ``groups``; else 1).
        pad: the input padding found to reproduce the module's outputs (convolutions).
    """

    name: str
    module: nn.Module
    kind: str
    spec: WeightSpec
    groups: int = 1
    pad: tuple[int, ...] | None = None

    @classmethod
    def of(cls, name: str, module: nn.Module) -> "Layer":
        """The :class:`Layer` of a supported module.

        Raises:
            UnsupportedLayer: the module is a prunable layer one-shot cannot solve.
        """
        kind = layer_kind(module)
        if kind in (None, "unsupported"):
            raise UnsupportedLayer(
                f"prune_oneshot: cannot solve {type(module).__name__} at '{name}' (one-shot solves Linear, "
                f"transformers Conv1D and Conv1d/2d/3d layers); pass exclude=[{name!r}] to leave it dense")
        spec = weight_spec(module, "weight")
        if spec is None:  # a prunekit.register_prunable override that declares no weight
            raise UnsupportedLayer(f"prune_oneshot: {type(module).__name__} at '{name}' has no prunable 'weight' "
                                   f"(see prunekit.register_prunable); pass exclude=[{name!r}]")
        groups = module.groups if kind == "conv" else 1
        return cls(name, module, kind, spec, groups)

    @property
    def weight(self) -> nn.Parameter:
        """The module's weight parameter."""
        return self.module.weight

    def matrix(self) -> torch.Tensor:
        """The weight as ``(out, in·k)`` through its layer spec (the transpose for ``Conv1D``)."""
        return self.spec.matrix(self.weight.detach())

    def write(self, matrix: torch.Tensor) -> None:
        """Store an ``(out, in·k)`` matrix back into the weight, in the weight's own layout."""
        w = self.weight
        w.data.copy_(self.spec.from_matrix(matrix, w.shape).to(w.dtype))

    @property
    def columns(self) -> int:
        """Columns of one group's matrix (``in·k`` per group)."""
        return self.matrix().shape[1]

    def input_rows(self, args: tuple[Any, ...]) -> torch.Tensor:
        """The layer's inputs as rows of the matrix problem: ``(tokens or positions, groups·in·k)``."""
        x = args[0].detach()
        if self.kind != "conv":
            return x.reshape(-1, x.shape[-1])
        return im2col(self.module, x, self.pad) if self.groups == 1 else self._grouped_rows(x)

    def _grouped_rows(self, x: torch.Tensor) -> torch.Tensor:
        per = x.shape[-len(self.module.kernel_size) - 1] // self.groups
        chunks = x.split(per, dim=-len(self.module.kernel_size) - 1)
        return torch.cat([im2col(self.module, c, self.pad) for c in chunks], dim=1)

    def verify(self, args: tuple[Any, ...], output: Any) -> None:
        """Check ``output == rows(args) @ M.T + b``; for convolutions also try TF 'SAME' padding.

        Raises:
            UnsupportedLayer: the module's forward computes something else.
        """
        if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            self._refuse("its forward does not take and return one tensor")
        if self.kind == "conv" and not self._matches(args, output):
            spatial = tuple(args[0].shape[-len(self.module.kernel_size):])
            self.pad = _tf_same_padding(self.module, spatial)
        if not self._matches(args, output):
            self._refuse("its output is not the standard " + ("convolution" if self.kind == "conv" else
                                                              "linear map") + " of its first input")

    def _matches(self, args: tuple[Any, ...], output: torch.Tensor) -> bool:
        try:
            rows = self.input_rows(args).double()
        except RuntimeError:
            return False
        W = self.matrix().double()
        rows_per_group = W.shape[0] // self.groups
        parts = [rows[:, g * W.shape[1]:(g + 1) * W.shape[1]] @ W[g * rows_per_group:(g + 1) * rows_per_group].T
                 for g in range(self.groups)]
        pred = torch.cat(parts, dim=1)
        bias = getattr(self.module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.shape == (W.shape[0],):
            pred = pred + bias.detach().double()
        nd = len(self.module.kernel_size) if self.kind == "conv" else 0
        got = _conv_output_rows(output.detach(), nd) if nd else output.detach().reshape(-1, output.shape[-1])
        if got.shape != pred.shape:
            return False
        tol = 1e-4 if output.dtype in (torch.float32, torch.float64) else 3e-2
        return bool(((got.double() - pred).abs().max() <= tol * (got.abs().max().double() + 1e-6)).item())

    def _refuse(self, why: str) -> None:
        raise UnsupportedLayer(f"prune_oneshot: {type(self.module).__name__} at '{self.name}': {why}, so its "
                               f"one-shot problem is unknown; pass exclude=[{self.name!r}] to leave it dense")
