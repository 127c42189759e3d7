"""Sparse 2-D convolution for inference: a sparse weight times the input, pointwise or after im2col.

**Pointwise (1x1) convolutions** (``groups=1``) need no im2col: for NCHW input one
image's activations ``x[n]`` seen as ``(in, H*W)`` are exactly the batch-contiguous
``X^T`` that prunekit's kernels read, so :class:`SparseConv2d` computes
``y[n] = W @ x[n].view(in, H*W) + b`` straight into the NCHW output (no unfold, no
transpose; the layout of Elsen et al., "Fast Sparse ConvNets", and XNNPACK). Padding
(the layer's own or a subclass's) is applied first and a stride is a subsampling
(``x[:, :, ::s, ::s]``, one copy of the smaller input); channels_last input costs one
transposing copy per image inside the product; the output is NCHW-contiguous.

**Other convolutions**: a convolution with weight ``(out, in, kh, kw)`` is the matrix
product of the weight seen as ``(out, in*kh*kw)`` with the unfolded input patches
``(in*kh*kw, B*L)`` (``L`` output positions). :class:`SparseConv2d` unfolds the
input (``torch.nn.functional.unfold``), lays the patches out feature-major (the
layout prunekit's kernels read without a copy), multiplies by the weight held in
a :class:`~prunekit.runtime.SparseLinear` of any sparse format, and folds the
result back to ``(B, out, H', W')``. The unfold and the two layout copies cost
memory traffic that a dense convolution does not pay, so this wins only for
highly sparse weights and enough work per call; :func:`prunekit.accelerate`
times it against the dense layer and keeps the faster.

``nn.Conv2d`` subclasses that pad in their own ``forward`` (EfficientNet ports'
TensorFlow-style "same" convolutions, dynamic or with a fixed ``static_padding``)
are reproduced by padding first; :func:`conv_padding` finds which padding a
subclass applies by running it on probe inputs of several sizes and comparing
with each known pattern, and refuses any subclass that matches none.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .modules import SparseLinear

__all__ = ["SparseConv2d", "conv_padding", "conv_supported", "same_pad"]

# Padding applied before the convolution: None (none), "same" (TensorFlow 'SAME', computed per input size)
# or (left, right, top, bottom) zeros.
PrePad = Union[None, str, tuple[int, int, int, int]]
# Probe outputs must equal a candidate pattern's to this relative error (both run F.conv2d on the same data).
PROBE_RTOL = 1e-6


def conv_supported(conv: nn.Module) -> str | None:
    """``None`` if :class:`SparseConv2d` can replace ``conv`` (any ``nn.Conv2d``, subclasses included), else why not.

    Whether a subclass's own ``forward`` can be reproduced is :func:`conv_padding`'s question.

    Example:
        >>> conv_supported(nn.Conv2d(3, 8, 3)) is None, conv_supported(nn.Conv2d(4, 4, 3, groups=2))
        (True, 'groups=2 (only groups=1)')
    """
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} (only nn.Conv2d and its subclasses)"
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros')"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only explicit padding)"
    return None


def same_pad(size: tuple[int, int], kernel: tuple[int, ...], stride: tuple[int, ...],
             dilation: tuple[int, ...]) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' zero padding ``(left, right, top, bottom)`` for an input of ``size = (H, W)``.

    The output has ``ceil(H / stride)`` rows; odd totals put the extra row/column at the end.

    Example:
        >>> same_pad((224, 224), (3, 3), (2, 2), (1, 1)), same_pad((7, 8), (3, 3), (1, 1), (1, 1))
        ((0, 1, 0, 1), (1, 1, 1, 1))
    """
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


def conv_padding(conv: nn.Conv2d, x: torch.Tensor | None = None) -> tuple[PrePad, str | None]:
    """How ``conv``'s forward pads its input: ``(pre_pad, None)``, or ``(None, why it cannot be reproduced)``.

    A plain ``nn.Conv2d`` forward gives ``(None, None)`` without running anything. A
    subclass with its own ``forward`` (or ``_conv_forward``) is run on probe inputs of
    several sizes (``x``'s first sample, if given, among them) and compared with each
    known pattern: none, its ``static_padding`` (an ``nn.ZeroPad2d``), TensorFlow 'SAME'.

    Example:
        >>> class Doubled(nn.Conv2d):
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> conv_padding(nn.Conv2d(3, 4, 3)), conv_padding(Doubled(3, 4, 3))[1][:40]
        ((None, None), 'Doubled.forward differs from nn.Conv2d.f')
    """
    cls = type(conv)
    if cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward:
        return None, None
    probes = _probes(conv, x)
    try:
        with torch.no_grad():
            refs = [conv(p) for p in probes]
    except Exception as exc:  # a forward that only runs on some sizes cannot be checked: keep it dense
        return None, (f"{cls.__name__}.forward differs from nn.Conv2d.forward and fails on a probe input "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})")
    for pre_pad in _candidates(conv):
        if all(outputs_match(_reference(conv, p, pre_pad), r) for p, r in zip(probes, refs)):
            return pre_pad, None
    return None, (f"{cls.__name__}.forward differs from nn.Conv2d.forward and matches no known padding "
                  "(none, static_padding, TensorFlow 'same') on probe inputs")


def _probes(conv: nn.Conv2d, x: torch.Tensor | None) -> list[torch.Tensor]:
    """Inputs of several sizes (odd and even, relative to the stride) that ``conv`` should accept."""
    k = [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    s = list(conv.stride) if len(conv.stride) == 2 else [conv.stride[0]] * 2
    base = [kk + 2 * ss for kk, ss in zip(k, s)]
    sizes = [(base[0], base[1] + 1), (base[0] + 3, base[1] + 2)]
    weight = conv.weight
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(1, conv.in_channels, *hw, generator=g).to(weight.dtype).to(weight.device) for hw in sizes]
    if isinstance(x, torch.Tensor) and x.dim() in (3, 4):
        first = x if x.dim() == 3 else x[:1]
        out.insert(0, first.detach())
        h, w = first.shape[-2:]
        out.append(torch.randn(*first.shape[:-2], h + 1, w + 2, generator=g).to(first.dtype).to(first.device))
    return out


def _candidates(conv: nn.Conv2d) -> list[PrePad]:
    cands: list[PrePad] = [None]
    static = getattr(conv, "static_padding", None)
    if isinstance(static, nn.ZeroPad2d):
        cands.append(tuple(int(p) for p in static.padding))
    cands.append("same")
    return cands


def _reference(conv: nn.Conv2d, x: torch.Tensor, pre_pad: PrePad) -> torch.Tensor:
    """``conv`` as a plain ``nn.Conv2d`` after ``pre_pad``."""
    with torch.no_grad():
        x = _pad(x, pre_pad, tuple(conv.kernel_size), _pair(conv.stride), tuple(conv.dilation))
        return nn.Conv2d._conv_forward(conv, x, conv.weight, conv.bias)


def outputs_match(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same shape and ``max|out - ref| <= PROBE_RTOL * max|ref|``."""
    if not isinstance(ref, torch.Tensor) or out.shape != ref.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((out.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    return diff <= PROBE_RTOL * max(scale, 1e-30)


def _pair(value: tuple[int, ...] | list[int]) -> tuple[int, int]:
    value = tuple(value)
    return value if len(value) == 2 else (value[0], value[0])


def _pad(x: torch.Tensor, pre_pad: PrePad, kernel: tuple[int, ...], stride: tuple[int, ...],
         dilation: tuple[int, ...]) -> torch.Tensor:
    if pre_pad is None:
        return x
    pads = same_pad(tuple(x.shape[-2:]), kernel, stride, dilation) if pre_pad == "same" else pre_pad
    return F.pad(x, list(pads)) if any(pads) else x


class SparseConv2d(nn.Module):
    """A pruned ``nn.Conv2d`` run as a sparse matrix product (pointwise, or after im2col); for inference only.

    Args:
        conv: the ``nn.Conv2d`` (or subclass) to replace (``groups=1``, zero padding given as
            numbers); it is not changed.
        fmt, blocksize, pattern: the :class:`~prunekit.runtime.SparseLinear` format
            for the weight seen as ``(out_channels, in_channels*kh*kw)``.
        pre_pad: padding the replaced layer's ``forward`` applies before convolving:
            ``None`` (none), ``"same"`` (TensorFlow 'SAME' for each input size) or
            ``(left, right, top, bottom)``. Default ``"auto"``: found by :func:`conv_padding`
            (nothing to find for a plain ``nn.Conv2d``); a subclass whose forward matches no known
            pattern is refused.

    The sparse weight lives in the submodule ``matmul`` (a ``SparseLinear``), so
    ``state_dict``, ``deepcopy`` and ``.to()`` work as for ``SparseLinear``. Code that
    inspects layers still finds ``weight`` (a read-only dense copy made on each read,
    ``(out, in, kh, kw)``), ``bias``, ``dtype``, ``device`` and the ``nn.Conv2d`` hyper-parameters.

    Example:
        >>> conv = nn.Conv2d(4, 8, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(torch.rand_like(conv.weight) > 0.9)
        >>> sparse = SparseConv2d(conv, "csr")
        >>> with torch.inference_mode():
        ...     y = sparse(torch.randn(2, 4, 5, 5))
        >>> tuple(y.shape), sparse.weight.shape == conv.weight.shape
        ((2, 8, 5, 5), True)
    """

    groups = 1
    padding_mode = "zeros"
    transposed = False
    output_padding = (0, 0)

    def __init__(self, conv: nn.Conv2d, fmt: str = "csr", blocksize: int | None = None,
                 pattern: tuple[int, int] | None = None, *, pre_pad: PrePad | str = "auto") -> None:
        super().__init__()
        why = conv_supported(conv)
        if why is None and isinstance(pre_pad, str) and pre_pad == "auto":
            pre_pad, why = conv_padding(conv)
        if why is not None:
            raise TypeError(f"SparseConv2d: cannot replace this convolution: {why}")
        if not (pre_pad is None or pre_pad == "same" or (isinstance(pre_pad, tuple) and len(pre_pad) == 4
                                                         and all(isinstance(p, int) for p in pre_pad))):
            raise ValueError(f"SparseConv2d: pre_pad must be None, 'same', 'auto' or (left, right, top, bottom), "
                             f"got {pre_pad!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), _pair(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.pre_pad = pre_pad
        weight = conv.weight.detach().reshape(conv.out_channels, -1)
        self.matmul = SparseLinear(weight, conv.bias, fmt, blocksize, pattern)
        self.fmt, self.blocksize, self.pattern = fmt, self.matmul.blocksize, self.matmul.pattern

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in, kh, kw)`` weight with its zeros (see :attr:`SparseLinear.weight`)."""
        with torch.inference_mode():
            return self.matmul.to_dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @weight.setter
    def weight(self, value: object) -> None:
        raise AttributeError("SparseConv2d.weight is read-only (the weight is stored sparse); build a new module "
                             "from a dense convolution instead")

    @property
    def bias(self) -> torch.Tensor | None:
        """The dense bias (``None`` if the convolution had none)."""
        return self.matmul.bias

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored weight values."""
        return self.matmul.dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored weight values."""
        return self.matmul.device

    @property
    def pointwise(self) -> bool:
        """Whether this is a 1x1 convolution, run without im2col (see the module docs)."""
        return tuple(self.kernel_size) == (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d: input must have shape (B, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got {tuple(getattr(x, 'shape', ()))}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        x = _pad(x, self.pre_pad, self.kernel_size, self.stride, self.dilation)
        y = self._pointwise(x) if self.pointwise else self._im2col(x)
        return y[0] if unbatched else y

    def _pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """1x1 convolution of a padded ``(B, in, H, W)`` input: one ``W @ x[n].view(in, H*W)`` per image."""
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, [pw, pw, ph, ph])
        sh, sw = self.stride
        if sh != 1 or sw != 1:  # a 1x1 kernel with stride s reads every s-th row and column
            x = x[:, :, ::sh, ::sw]
        batch, c, h, w = x.shape
        # x[n] as (in, H*W) is a view for NCHW input (a copy after subsampling). Its transpose is the
        # (B=H*W, in) input SparseLinear expects, whose X^T the kernels then read in place; the product
        # comes back as a view of a contiguous (out, H*W), i.e. one image of the NCHW output.
        if batch == 1:  # the common inference case, without the per-image list and stack
            y = self.matmul(x.reshape(c, h * w).t()).t()
        elif not ops.eager(x):
            # Traced (torch.export with a dynamic batch, torch.compile): one product over (in, B*H*W)
            # instead of a Python loop over a batch size the trace does not know; one copy of x.
            y = self.matmul(x.transpose(0, 1).reshape(c, batch * h * w).t()).t()
            return y.reshape(self.out_channels, batch, h, w).transpose(0, 1).contiguous()
        else:
            y = torch.stack([self.matmul(x[n].reshape(c, h * w).t()).t() for n in range(batch)])
        return y.reshape(batch, self.out_channels, h, w).contiguous()

    def _im2col(self, x: torch.Tensor) -> torch.Tensor:
        """Any convolution of a padded ``(B, in, H, W)`` input: unfold, sparse product, fold back."""
        batch, _, h, w = x.shape
        out_h, out_w = (_out_size(n, k, s, p, d) for n, k, s, p, d in
                        zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation))
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, K, L)
        # Feature-major patches (K, B*L): SparseLinear sees their transpose, which its kernels read in place.
        xt = cols.transpose(0, 1).reshape(cols.shape[1], -1)
        y = self.matmul(xt.t())  # (B*L, out), a view of the contiguous (out, B*L)
        # Contiguous like nn.Conv2d's output, so a following .view() works as it did.
        return y.t().reshape(self.out_channels, batch, out_h, out_w).transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        pre = "" if self.pre_pad is None else f", pre_pad={self.pre_pad!r}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}{pre}, format={self.fmt}")


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1
