"""Surgeries for ``nn.MultiheadAttention`` (whole heads) and ``nn.LSTM`` (hidden units).

Attention: a head is one unit: its ``head_dim`` rows of q, k and v in
``in_proj_weight``/``in_proj_bias`` and its columns of ``out_proj.weight``.
The embedding channels (in_proj columns, out_proj rows) are ordinary channels.
A standard ``nn.MultiheadAttention`` requires ``num_heads * head_dim ==
embed_dim``, so once heads are gone the layer becomes a
:class:`PrunedMultiheadAttention`: a subclass with the same parameters and
``state_dict`` keys whose inner width is ``num_heads * head_dim``. If the
attention weights are used (``need_weights``), heads are frozen: averaging over
fewer heads would change them. ``kdim``/``vdim``, ``add_bias_kv`` and
``add_zero_attn`` are not supported.

LSTM: hidden unit ``j`` is one unit across every layer and direction (a
standard ``nn.LSTM`` has a single ``hidden_size``): rows ``j`` of each gate in
``weight_ih``/``weight_hh``/biases, column ``j`` of ``weight_hh`` and of the
next layer's ``weight_ih``, and feature ``j`` of the output and of ``h_n``/``c_n``.
``proj_size > 0`` is not supported.
"""

from __future__ import annotations

import math
import operator
import types
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .flow import Flow
from .layers import kept, load_into, slice_inplace

if TYPE_CHECKING:  # annotations only: the registry reads this module, not the other way round
    from .graph import Context
    from .registry import Keep

__all__ = ["PrunedMultiheadAttention"]


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width ``num_heads * head_dim`` may differ from ``embed_dim``.

    Same parameters and ``state_dict`` keys as the standard layer
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``)
    and the same call signature; returned attention weights average over the
    remaining heads. ``out_dim`` is the output width (``embed_dim`` by default).

    Example:
        >>> mha = PrunedMultiheadAttention(16, num_heads=2, head_dim=4, batch_first=True)
        >>> out, _ = mha(*(torch.randn(3, 5, 16),) * 3, need_weights=False)
        >>> tuple(out.shape), tuple(mha.in_proj_weight.shape)
        ((3, 5, 16), (24, 16))
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, out_dim: int | None = None,
                 dropout: float = 0.0, bias: bool = True, batch_first: bool = False) -> None:
        nn.Module.__init__(self)
        inner = num_heads * head_dim
        self.embed_dim, self.kdim, self.vdim, self._qkv_same_embed_dim = embed_dim, embed_dim, embed_dim, True
        self.num_heads, self.head_dim, self.dropout, self.batch_first = num_heads, head_dim, dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(inner, out_dim or embed_dim, bias=bias)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention as in ``nn.MultiheadAttention.forward`` (``is_causal`` needs ``attn_mask``, as there)."""
        batched = query.dim() == 3
        q, k, v = (_to_nld(t, batched, self.batch_first) for t in (query, key, value))
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        heads, d = self.num_heads, self.head_dim
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (F.linear(t, w, b).view(n, t.shape[1], heads, d).transpose(1, 2)
                   for t, w, b in zip((q, k, v), self.in_proj_weight.chunk(3), biases))
        scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
        mask = _additive_mask(attn_mask, key_padding_mask, n, heads, length, source, scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        # out_proj is applied functionally, as in nn.MultiheadAttention (its module hooks never fire)
        out = F.linear(torch.matmul(weights, v).transpose(1, 2).reshape(n, length, heads * d),
                       self.out_proj.weight, self.out_proj.bias)
        out = out.transpose(0, 1) if batched and not self.batch_first else out if batched else out.squeeze(0)
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights if batched else weights.squeeze(0)


def _to_nld(t: torch.Tensor, batched: bool, batch_first: bool) -> torch.Tensor:
    if not batched:
        return t.unsqueeze(0)
    return t if batch_first else t.transpose(0, 1)


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, heads: int,
                   length: int, source: int, dtype: torch.dtype) -> torch.Tensor | None:
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    total = None
    if attn_mask is not None:
        total = additive(attn_mask)
        total = total.view(n, heads, length, source) if total.dim() == 3 else total
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(n, 1, 1, source)
        total = pad if total is None else total + pad
    return total


def couple_mha(m: nn.MultiheadAttention, ctx: Context, query: Flow, key: Flow, value: Flow, *args: Any,
               **kwargs: Any) -> tuple[Flow, Any]:
    if not (m._qkv_same_embed_dim or getattr(m, "_prunekit_pruned", False)) or m.bias_k is not None or m.add_zero_attn:
        ctx.fail("kdim/vdim different from embed_dim, add_bias_kv and add_zero_attn are not supported")
    e_in, inner = m.in_proj_weight.shape[1], m.in_proj_weight.shape[0] // 3
    d = inner // m.num_heads
    q = ctx.input_atoms(query, -1, e_in)
    ctx.unite(q, ctx.input_atoms(key, -1, e_in))
    ctx.unite(q, ctx.input_atoms(value, -1, e_in))
    heads = ctx.new_atoms(m.num_heads)
    inner_atoms = tuple(heads[i // d] for i in range(inner))
    ctx.member("in_proj_weight", 0, inner_atoms * 3)
    ctx.member("in_proj_weight", 1, q)
    if m.in_proj_bias is not None:
        ctx.member("in_proj_bias", 0, inner_atoms * 3)
    out = ctx.new_atoms(m.out_proj.out_features)
    ctx.member("out_proj.weight", 0, out)
    ctx.member("out_proj.weight", 1, inner_atoms)
    if m.out_proj.bias is not None:
        ctx.member("out_proj.bias", 0, out)
    if _weights_used(ctx):
        ctx.freeze(heads, "attention weights are used (need_weights): they depend on the number of heads")
    return ctx.out(out, -1, index=0), ctx.untracked(index=1)


def _weights_used(ctx: Context) -> bool:
    if ctx.value[1] is None:
        return False
    for user in ctx.node.users:
        if user.target is operator.getitem and user.args[1] == 0:
            continue
        if user.target is operator.getitem and not user.users:
            continue
        return True
    return False


def rebuild_mha(m: nn.MultiheadAttention, keep: Keep) -> nn.Module:
    """Slice in place; with heads gone the instance runs :class:`PrunedMultiheadAttention`'s forward.

    ``type(m)`` stays; ``_qkv_same_embed_dim`` is cleared so that torch's fused
    fast paths (``nn.TransformerEncoderLayer`` in inference), which assume
    ``num_heads * head_dim == embed_dim``, are not taken.
    """
    d = m.in_proj_weight.shape[0] // 3 // m.num_heads
    slice_inplace(m, keep)
    inner = m.in_proj_weight.shape[0] // 3
    m.embed_dim = m.kdim = m.vdim = m.in_proj_weight.shape[1]
    m.num_heads, m.head_dim = inner // d, d
    m.out_proj.in_features, m.out_proj.out_features = inner, m.out_proj.weight.shape[0]
    if not isinstance(m, PrunedMultiheadAttention) and (inner != m.embed_dim or m.out_proj.out_features != m.embed_dim):
        m.forward = types.MethodType(PrunedMultiheadAttention.forward, m)
        m._qkv_same_embed_dim = False
        m._prunekit_pruned = True
    return m


def couple_lstm(m: nn.LSTM, ctx: Context, x: Flow, hx: Any = None) -> tuple[Flow, tuple[Flow, Flow]]:
    if m.proj_size:
        ctx.fail("proj_size > 0 is not supported")
    hidden = ctx.new_atoms(m.hidden_size)
    rows = tuple(hidden[i % m.hidden_size] for i in range(4 * m.hidden_size))
    features = ctx.input_atoms(x, -1, m.input_size)
    directions = ("", "_reverse") if m.bidirectional else ("",)
    for layer in range(m.num_layers):
        for suffix in directions:
            name = f"l{layer}{suffix}"
            ctx.member(f"weight_ih_{name}", 0, rows)
            ctx.member(f"weight_ih_{name}", 1, features)
            ctx.member(f"weight_hh_{name}", 0, rows)
            ctx.member(f"weight_hh_{name}", 1, hidden)
            if m.bias:
                ctx.member(f"bias_ih_{name}", 0, rows)
                ctx.member(f"bias_hh_{name}", 0, rows)
        features = hidden * len(directions)
    if hx is not None:
        for state in hx:
            ctx.unite(hidden, ctx.input_atoms(state, -1, m.hidden_size))
    out, (h_n, c_n) = ctx.value
    return ctx.out(features, -1, index=0), (Flow(tuple(h_n.shape), h_n.dim() - 1, hidden),
                                            Flow(tuple(c_n.shape), c_n.dim() - 1, hidden))


def rebuild_lstm(m: nn.LSTM, keep: Keep) -> nn.Module:
    new = nn.LSTM(kept(keep, "weight_ih_l0", 1, m.input_size), kept(keep, "weight_hh_l0", 1, m.hidden_size),
                  num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
                  bidirectional=m.bidirectional)
    return load_into(new, m, keep)


def builtin_surgeries() -> dict[type, tuple[Callable[..., Any], Callable[[nn.Module, Keep], nn.Module]]]:
    """``{layer type: (couple, rebuild)}`` for attention and LSTM (read by :mod:`.registry`).

    Example:
        >>> sorted(t.__name__ for t in builtin_surgeries())
        ['LSTM', 'MultiheadAttention']
    """
    return {nn.MultiheadAttention: (couple_mha, rebuild_mha), nn.LSTM: (couple_lstm, rebuild_lstm)}
