"""Built-in surgeries: convolutions, linear, batch/layer/group norm, embedding.

Grouped convolutions (``1 < groups``) are pruned by whole groups: the input and
output channels of one group form one unit, so a depthwise convolution
(``groups == in_channels``) prunes channel by channel, tied to the channel
that feeds it. Layer and group norm statistics span all channels, so the
channels they normalize are frozen (removing a channel would change them).
Attention and LSTM surgeries live in :mod:`prunekit.structural.recurrent`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .flow import Flow
from .graph import Context
from .registry import Keep, register_surgery, slice_state


def kept(keep: Keep, param: str, dim: int, default: int) -> int:
    """How many indices of ``param`` along ``dim`` survive."""
    index = keep.get(param, {}).get(dim)
    return default if index is None else len(index)


def load_into(new: nn.Module, old: nn.Module, keep: Keep) -> nn.Module:
    """Load ``old``'s sliced state into ``new``; copy mode, device, dtype and requires_grad."""
    ref = next(old.parameters(), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(slice_state(old, keep))
    flags = {n: p.requires_grad for n, p in old.named_parameters()}
    for name, param in new.named_parameters():
        param.requires_grad_(flags.get(name, True))
    return new.train(old.training)


# -- convolution ---------------------------------------------------------------------------------


def couple_conv(m: nn.Module, ctx: Context, x: Flow, *rest: Any, **kwargs: Any) -> Flow:
    xin = ctx.input_atoms(x, 1, m.in_channels)
    out = ctx.new_atoms(m.out_channels)
    if m.groups == 1:
        ctx.member("weight", 1, xin)
    else:
        ipg, opg = m.in_channels // m.groups, m.out_channels // m.groups
        for g in range(m.groups):
            ctx.unite_all([*xin[g * ipg:(g + 1) * ipg], *out[g * opg:(g + 1) * opg]])
    ctx.member("weight", 0, out)
    if m.bias is not None:
        ctx.member("bias", 0, out)
    return ctx.out(out, 1)


def rebuild_conv(m: nn.Module, keep: Keep) -> nn.Module:
    out = kept(keep, "weight", 0, m.out_channels)
    if m.groups == 1:
        groups, inp = 1, kept(keep, "weight", 1, m.in_channels)
    else:
        groups = m.groups * out // m.out_channels
        inp = m.in_channels // m.groups * groups
    new = type(m)(inp, out, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=groups,
                  bias=m.bias is not None, padding_mode=m.padding_mode)
    return load_into(new, m, keep)


# -- linear / embedding --------------------------------------------------------------------------


def couple_linear(m: nn.Linear, ctx: Context, x: Flow) -> Flow:
    ctx.member("weight", 1, ctx.input_atoms(x, -1, m.in_features))
    out = ctx.new_atoms(m.out_features)
    ctx.member("weight", 0, out)
    if m.bias is not None:
        ctx.member("bias", 0, out)
    return ctx.out(out, -1)


def rebuild_linear(m: nn.Linear, keep: Keep) -> nn.Module:
    new = type(m)(kept(keep, "weight", 1, m.in_features), kept(keep, "weight", 0, m.out_features),
                  bias=m.bias is not None)
    return load_into(new, m, keep)


def couple_embedding(m: nn.Embedding, ctx: Context, x: Flow, *rest: Any) -> Flow:
    out = ctx.new_atoms(m.embedding_dim)
    ctx.member("weight", 1, out)
    return ctx.out(out, -1)


def rebuild_embedding(m: nn.Embedding, keep: Keep) -> nn.Module:
    new = nn.Embedding(m.num_embeddings, kept(keep, "weight", 1, m.embedding_dim), padding_idx=m.padding_idx,
                       max_norm=m.max_norm, norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq,
                       sparse=m.sparse)
    return load_into(new, m, keep)


# -- normalization -------------------------------------------------------------------------------


def _norm_members(m: nn.Module, ctx: Context, atoms: tuple[int, ...]) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if isinstance(getattr(m, name, None), torch.Tensor):
            ctx.member(name, 0, atoms)


def couple_batchnorm(m: nn.modules.batchnorm._BatchNorm, ctx: Context, x: Flow) -> Flow:
    atoms = ctx.input_atoms(x, 1, m.num_features)
    _norm_members(m, ctx, atoms)
    return ctx.out(atoms, 1)


def rebuild_batchnorm(m: nn.modules.batchnorm._BatchNorm, keep: Keep) -> nn.Module:
    n = m.num_features
    for name in ("weight", "running_mean"):
        n = kept(keep, name, 0, n) if name in keep else n
    new = type(m)(n, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats)
    return load_into(new, m, keep)


def couple_layernorm(m: nn.LayerNorm, ctx: Context, x: Flow) -> Flow:
    if len(m.normalized_shape) != 1 or not x.tracked:
        return ctx.untracked() if not x.tracked else _freeze_all(ctx, x, "normalizes over several dims")
    atoms = ctx.input_atoms(x, -1, m.normalized_shape[0])
    ctx.freeze(atoms, "LayerNorm statistics span every channel")
    _norm_members(m, ctx, atoms)
    return ctx.out(atoms, -1)


def couple_groupnorm(m: nn.GroupNorm, ctx: Context, x: Flow) -> Flow:
    atoms = ctx.input_atoms(x, 1, m.num_channels)
    ctx.freeze(atoms, "GroupNorm statistics span several channels")
    _norm_members(m, ctx, atoms)
    return ctx.out(atoms, 1)


def _freeze_all(ctx: Context, x: Flow, reason: str) -> Any:
    ctx.freeze(x.atoms, reason)
    return ctx.untracked()


def rebuild_frozen(m: nn.Module, keep: Keep) -> nn.Module:
    raise RuntimeError(f"internal: {type(m).__name__} channels are frozen and never rebuilt")


for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_surgery(_conv, couple_conv, rebuild_conv)
register_surgery(nn.Linear, couple_linear, rebuild_linear)
register_surgery(nn.Embedding, couple_embedding, rebuild_embedding)
register_surgery(nn.modules.batchnorm._BatchNorm, couple_batchnorm, rebuild_batchnorm)
register_surgery(nn.LayerNorm, couple_layernorm, rebuild_frozen)
register_surgery(nn.GroupNorm, couple_groupnorm, rebuild_frozen)

from . import recurrent  # noqa: E402,F401  (registers attention and LSTM)
