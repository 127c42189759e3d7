"""Built-in surgeries: convolutions, linear, batch/layer/group norm, embedding.

Surgery works *in place*: parameters are sliced on the existing module and its
size attributes updated, so subclasses (same-padding convolutions of EfficientNet
ports, transformers' layers) keep their type and their own ``forward``. Weight
layouts come from :func:`prunekit.core.layerspec.weight_spec` (``ConvTranspose``
stores ``(in, out/groups, *k)``, transformers' ``Conv1D`` ``(in, out)``).

Grouped convolutions (``1 < groups``) are pruned by whole groups: the input and
output channels of one group form one unit, so a depthwise convolution
(``groups == in_channels``) prunes channel by channel, tied to the channel
that feeds it. LayerNorm statistics span all channels, so the channels it
normalizes are frozen; GroupNorm statistics are per group, so whole groups go.
Attention and LSTM surgeries live in :mod:`prunekit.methods.structural.recurrent`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ...core.layerspec import weight_spec
from .flow import Flow, GraphError

if TYPE_CHECKING:  # annotations only: the registry reads this module, not the other way round
    from .graph import Context
    from .registry import Keep


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


def slice_state(module: nn.Module, keep: Keep) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with each tensor in ``keep`` cut to its kept indices.

    Example:
        >>> lin = nn.Linear(3, 4)
        >>> state = slice_state(lin, {"weight": {0: torch.tensor([0, 2])}, "bias": {0: torch.tensor([0, 2])}})
        >>> tuple(state["weight"].shape), tuple(state["bias"].shape)
        ((2, 3), (2,))
    """
    state = module.state_dict(keep_vars=False)
    unknown = sorted(set(keep) - set(state))
    if unknown:
        raise KeyError(f"slice_state: {type(module).__name__} has no tensors {unknown}")
    out = {}
    for name, tensor in state.items():
        for dim, index in keep.get(name, {}).items():
            tensor = tensor.index_select(dim, index.to(tensor.device))
        out[name] = tensor.detach().clone()
    return out


def slice_inplace(module: nn.Module, keep: Keep) -> None:
    """Cut the tensors named in ``keep`` to their kept indices, on ``module`` itself.

    Parameters stay parameters (same ``requires_grad``), buffers stay buffers;
    the module object, its type and its ``forward`` are untouched.

    Example:
        >>> lin = nn.Linear(3, 4)
        >>> slice_inplace(lin, {"weight": {0: torch.tensor([0, 2])}})
        >>> tuple(lin.weight.shape)
        (2, 3)
    """
    for name, dims in keep.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        tensor = getattr(owner, leaf, None)
        if not isinstance(tensor, torch.Tensor):
            raise KeyError(f"slice_inplace: {type(module).__name__} has no tensor {name!r}")
        new = tensor.detach()
        for dim, index in dims.items():
            new = new.index_select(dim, index.to(new.device))
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(new.clone(), requires_grad=tensor.requires_grad)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = new.clone()
        else:
            raise KeyError(f"slice_inplace: {type(owner).__name__}.{leaf} is neither a parameter nor a buffer")


def _axes(m: nn.Module) -> tuple[int, int]:
    spec = weight_spec(m, "weight")
    if spec is None:
        raise GraphError(f"internal: {type(m).__name__} has no weight layout")
    return spec.out_axis, spec.in_axis


# -- convolution ---------------------------------------------------------------------------------


def couple_conv(m: nn.Module, ctx: Context, x: Flow, *rest: Any, **kwargs: Any) -> Flow:
    """Convolutions and transposed convolutions; ``groups > 1`` prunes whole groups."""
    out_axis, in_axis = _axes(m)
    xin = ctx.input_atoms(x, 1, m.in_channels)
    out = ctx.new_atoms(m.out_channels)
    if m.groups == 1:
        ctx.member("weight", in_axis, xin)
        ctx.member("weight", out_axis, out)
    else:
        ipg, opg = m.in_channels // m.groups, m.out_channels // m.groups
        for g in range(m.groups):
            ctx.unite_all([*xin[g * ipg:(g + 1) * ipg], *out[g * opg:(g + 1) * opg]])
        # the full axis of a grouped weight is dim 0: outputs (conv) or inputs (transposed)
        ctx.member("weight", 0, out if out_axis == 0 else xin)
    if m.bias is not None:
        ctx.member("bias", 0, out)
    return ctx.out(out, 1)


def rebuild_conv(m: nn.Module, keep: Keep) -> nn.Module:
    """Slice the weight in place and update ``in_channels``/``out_channels``/``groups``."""
    transposed = _axes(m)[0] == 1
    old_in, old_out, old_groups = m.in_channels, m.out_channels, m.groups
    slice_inplace(m, keep)
    full = m.weight.shape[0]  # outputs (conv) or inputs (transposed)
    if old_groups == 1:
        per = m.weight.shape[1]
        m.in_channels, m.out_channels = (full, per) if transposed else (per, full)
    else:
        groups = old_groups * full // (old_in if transposed else old_out)
        if transposed:
            m.in_channels, m.out_channels = full, old_out // old_groups * groups
        else:
            m.in_channels, m.out_channels = old_in // old_groups * groups, full
        m.groups = groups
    return m


# -- linear / embedding --------------------------------------------------------------------------


def couple_linear(m: nn.Module, ctx: Context, x: Flow, *rest: Any, **kwargs: Any) -> Flow:
    """``nn.Linear`` and linear layers stored (in, out) such as transformers' ``Conv1D``."""
    out_axis, in_axis = _axes(m)
    ctx.member("weight", in_axis, ctx.input_atoms(x, -1, m.weight.shape[in_axis]))
    out = ctx.new_atoms(m.weight.shape[out_axis])
    ctx.member("weight", out_axis, out)
    if getattr(m, "bias", None) is not None:
        ctx.member("bias", 0, out)
    return ctx.out(out, -1)


def rebuild_linear(m: nn.Module, keep: Keep) -> nn.Module:
    """Slice in place; ``in_features``/``out_features`` (``nx``/``nf`` for ``Conv1D``) follow."""
    slice_inplace(m, keep)
    out_axis, in_axis = _axes(m)
    sizes = {"out_features": out_axis, "nf": out_axis, "in_features": in_axis, "nx": in_axis}
    for attr, axis in sizes.items():
        if type(getattr(m, attr, None)) is int:
            setattr(m, attr, m.weight.shape[axis])
    return m


def couple_embedding(m: nn.Embedding, ctx: Context, x: Flow, *rest: Any, **kwargs: Any) -> Flow:
    out = ctx.new_atoms(m.embedding_dim)
    ctx.member("weight", 1, out)
    return ctx.out(out, -1)


def rebuild_embedding(m: nn.Embedding, keep: Keep) -> nn.Module:
    slice_inplace(m, keep)
    m.embedding_dim = m.weight.shape[1]
    return m


# -- normalization -------------------------------------------------------------------------------


def _norm_members(m: nn.Module, ctx: Context, atoms: tuple[int, ...]) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if isinstance(getattr(m, name, None), torch.Tensor):
            ctx.member(name, 0, atoms)


def couple_batchnorm(m: nn.modules.batchnorm._BatchNorm, ctx: Context, x: Flow, *rest: Any) -> Flow:
    atoms = ctx.input_atoms(x, 1, m.num_features)
    _norm_members(m, ctx, atoms)
    return ctx.out(atoms, 1)


def rebuild_batchnorm(m: nn.modules.batchnorm._BatchNorm, keep: Keep) -> nn.Module:
    slice_inplace(m, keep)
    first = next(iter(keep.values()))
    m.num_features = len(next(iter(first.values())))
    return m


_CENTERING = ("; its mean-centering over the removed (zeroed) channels cannot be reproduced at a smaller width, "
              "so the hidden size stays (only RMS-type norms allow hidden-size pruning)")


def couple_layernorm(m: nn.LayerNorm, ctx: Context, x: Flow, *rest: Any) -> Flow:
    """Statistics span every channel: the channels it normalizes are frozen (also channels-first ports)."""
    if not x.tracked:
        return ctx.untracked()
    ctx.freeze(x.atoms, "LayerNorm statistics span every channel" + (_CENTERING if ctx.graph.hidden else ""))
    if len(m.normalized_shape) == 1 and x.dim == len(x.shape) - 1 and x.shape[-1] == m.normalized_shape[0]:
        _norm_members(m, ctx, x.atoms)
    if isinstance(ctx.value, torch.Tensor) and tuple(ctx.value.shape) == x.shape:
        return Flow(x.shape, x.dim, x.atoms)
    return ctx.untracked()


def rebuild_layernorm(m: nn.LayerNorm, keep: Keep) -> nn.Module:
    slice_inplace(m, keep)
    m.normalized_shape = (m.weight.shape[0],) if m.weight is not None else m.normalized_shape
    return m


def couple_groupnorm(m: nn.GroupNorm, ctx: Context, x: Flow, *rest: Any) -> Flow:
    """Statistics are per group: one unit is one whole group of channels (``num_groups`` shrinks)."""
    atoms = ctx.input_atoms(x, 1, m.num_channels)
    per = m.num_channels // m.num_groups
    for g in range(m.num_groups):
        ctx.unite_all(atoms[g * per:(g + 1) * per])
    _norm_members(m, ctx, atoms)
    return ctx.out(atoms, 1)


def rebuild_groupnorm(m: nn.GroupNorm, keep: Keep) -> nn.Module:
    per = m.num_channels // m.num_groups
    slice_inplace(m, keep)
    first = next(iter(keep.values()))
    m.num_channels = len(next(iter(first.values())))
    m.num_groups = m.num_channels // per
    return m


def builtin_surgeries() -> dict[type, tuple[Callable[..., Any], Callable[[nn.Module, Keep], nn.Module]]]:
    """``{layer type: (couple, rebuild)}`` for the layers of this module (read by :mod:`.registry`).

    Example:
        >>> [f.__name__ for f in builtin_surgeries()[nn.Linear]]
        ['couple_linear', 'rebuild_linear']
    """
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return {
        **{conv: (couple_conv, rebuild_conv) for conv in convs},
        nn.Linear: (couple_linear, rebuild_linear),
        nn.Embedding: (couple_embedding, rebuild_embedding),
        nn.modules.batchnorm._BatchNorm: (couple_batchnorm, rebuild_batchnorm),
        nn.LayerNorm: (couple_layernorm, rebuild_layernorm),
        nn.GroupNorm: (couple_groupnorm, rebuild_groupnorm),
    }
