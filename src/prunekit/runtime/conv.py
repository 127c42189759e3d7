"""Sparse 2-D convolution for inference: im2col, then a sparse weight times the patches.

A convolution with weight ``(out, in, kh, kw)`` is the matrix product of the
weight seen as ``(out, in*kh*kw)`` with the unfolded input patches
``(in*kh*kw, B*L)`` (``L`` output positions). :class:`SparseConv2d` unfolds the
input (``torch.nn.functional.unfold``), lays the patches out feature-major (the
layout prunekit's kernels read without a copy), multiplies by the weight held in
a :class:`~prunekit.runtime.SparseLinear` of any sparse format, and folds the
result back to ``(B, out, H', W')``. The unfold and the two layout copies cost
memory traffic that a dense convolution does not pay, so this wins only for
highly sparse weights and enough work per call; :func:`prunekit.accelerate`
times it against the dense layer and keeps the faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import SparseLinear

__all__ = ["SparseConv2d", "conv_supported"]


def conv_supported(conv: nn.Module) -> str | None:
    """``None`` if :class:`SparseConv2d` can replace ``conv``, else why not.

    Example:
        >>> conv_supported(nn.Conv2d(3, 8, 3)) is None, conv_supported(nn.Conv2d(4, 4, 3, groups=2))
        (True, 'groups=2 (only groups=1)')
    """
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} (only nn.Conv2d)"
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros')"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only explicit padding)"
    return None


class SparseConv2d(nn.Module):
    """A pruned ``nn.Conv2d`` run as im2col + a sparse matrix product; for inference only.

    Args:
        conv: the ``nn.Conv2d`` to replace (``groups=1``, zero padding given as
            numbers); it is not changed.
        fmt, blocksize, pattern: the :class:`~prunekit.runtime.SparseLinear` format
            for the weight seen as ``(out_channels, in_channels*kh*kw)``.

    The sparse weight lives in the submodule ``matmul`` (a ``SparseLinear``), so
    ``state_dict``, ``deepcopy`` and ``.to()`` work as for ``SparseLinear``.

    Example:
        >>> conv = nn.Conv2d(4, 8, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(torch.rand_like(conv.weight) > 0.9)
        >>> sparse = SparseConv2d(conv, "csr")
        >>> with torch.inference_mode():
        ...     y = sparse(torch.randn(2, 4, 5, 5))
        >>> tuple(y.shape)
        (2, 8, 5, 5)
    """

    def __init__(self, conv: nn.Conv2d, fmt: str = "csr", blocksize: int | None = None,
                 pattern: tuple[int, int] | None = None) -> None:
        super().__init__()
        why = conv_supported(conv)
        if why is not None:
            raise TypeError(f"SparseConv2d: cannot replace this convolution: {why}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        weight = conv.weight.detach().reshape(conv.out_channels, -1)
        self.matmul = SparseLinear(weight, conv.bias, fmt, blocksize, pattern)
        self.fmt, self.blocksize, self.pattern = fmt, self.matmul.blocksize, self.matmul.pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d: input must have shape (B, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got {tuple(getattr(x, 'shape', ()))}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        batch, _, h, w = x.shape
        out_h, out_w = (_out_size(n, k, s, p, d) for n, k, s, p, d in
                        zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation))
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, K, L)
        # Feature-major patches (K, B*L): SparseLinear sees their transpose, which its kernels read in place.
        xt = cols.transpose(0, 1).reshape(cols.shape[1], -1)
        y = self.matmul(xt.t())  # (B*L, out), a view of the contiguous (out, B*L)
        # Contiguous like nn.Conv2d's output, so a following .view() works as it did.
        y = y.t().reshape(self.out_channels, batch, out_h, out_w).transpose(0, 1).contiguous()
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, format={self.fmt}")


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1
