"""How channels flow through torch functions and tensor methods.

Each rule is ``rule(p, func, value, args, kwargs) -> Flow(s)`` where ``p`` is the
:class:`~prunekit.methods.structural.propagate.Capture`, ``value`` the real result on
the example input and ``args``/``kwargs`` the call's arguments with every
tensor replaced by its Flow. An op that reads several channels into one (a mean
over channels, a softmax across them, a constant slice) freezes them; an op
with no rule whose inputs carry channels raises a
:class:`~prunekit.methods.structural.flow.GraphError` naming the op and module.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .flow import Flow
from .graph import DimInt, Member

Rule = Callable[..., Any]


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``name`` at position ``index``."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _dynamic(size: Any) -> bool:
    """A size that follows pruning: ``-1`` or one read from a tracked dim."""
    return isinstance(size, DimInt) or (isinstance(size, int) and size == -1)


def unary(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Elementwise on its first argument: channels pass through."""
    x = args[0]
    if not isinstance(value, torch.Tensor):
        return Flow(None)
    if not isinstance(x, Flow) or not x.tracked:
        return elementwise(p, func, value, args, kwargs)
    if _shape(value) != x.shape:
        p.fail(func, f"changes the shape {x.shape} -> {_shape(value)}")
    return Flow(_shape(value), x.dim, x.atoms)


def spatial(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Pooling, interpolation: channels on dim 1 pass through."""
    x = args[0]
    out = _shape(value if isinstance(value, torch.Tensor) else value[0])
    if not x.tracked:
        return Flow(out)
    if x.dim != 1 or len(out) != len(x.shape) or out[1] != x.shape[1]:
        p.fail(func, f"expects channels on dim 1 and keeps them; got dim {x.dim}, {x.shape} -> {out}")
    flow = Flow(out, 1, x.atoms)
    return flow if isinstance(value, torch.Tensor) else (flow, Flow(out))


def pad(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``F.pad``: fine unless it pads the channel dim itself."""
    x, widths = args[0], arg(args, kwargs, 1, "pad")
    padded = {len(x.shape) - 1 - i // 2 for i, w in enumerate(widths) if w}
    if x.dim in padded:
        p.uf.freeze(x.atoms, f"{p.where()}: padded along the channel dim")
        return Flow(_shape(value))
    return Flow(_shape(value), x.dim, x.atoms)


def elementwise(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Broadcasting op (add, mul, where, ...): channels that meet are coupled.

    A model parameter used as it is (a layer scale, a bias) whose only non-1 dim
    lines up with the channels becomes a member: it is sliced with them.
    """
    if not isinstance(value, torch.Tensor):
        return Flow(None)
    out = _shape(value)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Flow) and a.is_tensor]
    tracked = [t for t in tensors if t.tracked]
    if not tracked:
        return Flow(out)
    main = next((t for t in tracked if t.shape[t.dim] == out[t.dim + len(out) - len(t.shape)]), tracked[0])
    dim = main.dim + len(out) - len(main.shape)
    where = p.where()
    for t in tensors:
        if t is main:
            continue
        d = dim - (len(out) - len(t.shape))
        size = t.shape[d] if 0 <= d < len(t.shape) else 1
        if t.tracked and t.dim == d and size == out[dim]:
            p.uf.unite(main.atoms, t.atoms)
        elif not t.tracked and size == out[dim] and size != 1 and _as_member(p, t, d, main.atoms):
            pass
        elif size != 1:
            p.uf.freeze(main.atoms, f"{where}: combined with a tensor whose channels cannot change")
        if t.tracked and not (t.dim == d and size == out[dim]):
            p.uf.freeze(t.atoms, f"{where}: broadcast against other channels")
    return Flow(out, dim, main.atoms)


def _as_member(p: Any, t: Flow, dim: int, atoms: tuple[int, ...]) -> bool:
    if t.source is None or any(s != 1 for i, s in enumerate(t.shape) if i != dim and i < dim):
        return False
    path, name = t.source
    p.graph.add_member(Member(path, name, dim, tuple(atoms)))
    return True


def cat(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Concatenation: along the channel dim atoms are concatenated (offsets), else coupled."""
    parts = [t for t in arg(args, kwargs, 0, "tensors") if t.shape != (0,)]  # legacy empty tensors
    out = _shape(value)
    dim = arg(args, kwargs, 1, "dim", 0) % len(out)
    tracked = [t for t in parts if t.tracked]
    if not tracked:
        return Flow(out)
    if any(t.dim != dim for t in tracked):
        return elementwise(p, func, value, tuple(parts), {})  # couples the parts' channels like an add
    atoms: list[int] = []
    for t in parts:
        if t.tracked:
            atoms.extend(t.atoms)
        else:
            fresh = p.uf.new(t.shape[dim])
            p.uf.freeze(fresh, f"{p.where()}: concatenated tensor whose channels cannot change")
            atoms.extend(fresh)
    return Flow(out, dim, tuple(atoms))


def stack(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``torch.stack``: a new dim; the parts' channels are coupled."""
    parts = list(arg(args, kwargs, 0, "tensors"))
    out = _shape(value)
    new = arg(args, kwargs, 1, "dim", 0) % len(out)
    flow = elementwise(p, func, torch.empty(parts[0].shape, device="meta"), tuple(parts), {})
    if not flow.tracked:
        return Flow(out)
    return Flow(out, flow.dim + (new <= flow.dim), flow.atoms)


def split(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> tuple[Flow, ...]:
    """``split``: equal pieces sized from the tracked dim are coupled; other constant sizes freeze."""
    return _pieces(p, func, value, args, kwargs, equal=False)


def chunk(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> tuple[Flow, ...]:
    """``chunk(n)``: equal pieces; channel ``i`` of every piece is coupled so they stay equal."""
    return _pieces(p, func, value, args, kwargs, equal=True)


def _pieces(p: Any, func: Any, value: Any, args: tuple, kwargs: dict, equal: bool) -> tuple[Flow, ...]:
    x = args[0]
    shapes = [_shape(v) for v in value]
    if not x.tracked:
        return tuple(Flow(s) for s in shapes)
    dim = arg(args, kwargs, 2, "dim", 0) % len(x.shape)
    if dim != x.dim:
        return tuple(Flow(s, x.dim, x.atoms) for s in shapes)
    sizes = [s[dim] for s in shapes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    pieces = [x.atoms[a:a + n] for a, n in zip(starts, sizes)]
    size_arg = arg(args, kwargs, 1, "split_size_or_sections" if not equal else "chunks")
    attr = None if equal or _dynamic(size_arg) else _size_attribute(p, size_arg, ("split_size",))
    if len(set(sizes)) == 1 and (equal or _dynamic(size_arg) or attr is not None):
        for piece in pieces[1:]:
            p.uf.unite(pieces[0], piece)
        if attr is not None:
            p.graph.size_attrs.append((attr[0], attr[1], pieces[0]))
    else:
        p.uf.freeze(x.atoms, f"{p.where()}: split into pieces of constant sizes {sizes} "
                             "(use chunk() for equal pieces that can shrink)")
    return tuple(Flow(s, dim, piece) for s, piece in zip(shapes, pieces))


def _size_attribute(p: Any, size: Any, names: tuple[str, ...]) -> tuple[str, str] | None:
    """The enclosing module's int attribute (one of ``names``) holding ``size``, kept in step after pruning."""
    if not p.stack or not isinstance(size, int):
        return None
    path, module = p.stack[-1]
    for name in names:
        if type(getattr(module, name, None)) is int and getattr(module, name) == size:
            return path, name
    return None


def flatten(p: Any, func: Any, value: Any, args: tuple, kwargs: dict, start: int | None = None,
            end: int | None = None) -> Flow:
    """``flatten(start, end)``: a channel flattened with trailing dims owns every feature it becomes."""
    x = args[0]
    out = _shape(value)
    if not x.tracked:
        return Flow(out)
    n = len(x.shape)
    start = (arg(args, kwargs, 1, "start_dim", 0) if start is None else start) % n
    end = (arg(args, kwargs, 2, "end_dim", -1) if end is None else end) % n
    if x.dim < start:
        return Flow(out, x.dim, x.atoms)
    if x.dim > end:
        return Flow(out, x.dim - (end - start), x.atoms)
    return _merge(x, start, end, out, start)


def _merge(x: Flow, start: int, end: int, out: tuple[int, ...], out_dim: int) -> Flow:
    d = x.dim
    outer = math.prod(x.shape[start:d])
    inner = math.prod(x.shape[d + 1:end + 1])
    atoms = tuple(a for _ in range(outer) for a in x.atoms for _ in range(inner))
    return Flow(out, out_dim, atoms)


def _segments(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """Align two shapes of equal numel into runs ``(a0, a1, b0, b1)`` with equal products."""
    i = j = 0
    runs = []
    while i < len(a) or j < len(b):
        i0, j0, pa, pb = i, j, 1, 1
        if i < len(a):
            pa, i = a[i], i + 1
        if j < len(b):
            pb, j = b[j], j + 1
        while pa != pb and (i < len(a) or j < len(b)):
            if (pa < pb and i < len(a)) or j >= len(b):
                pa, i = pa * a[i], i + 1
            else:
                pb, j = pb * b[j], j + 1
        runs.append((i0, i, j0, j))
    return runs


def reshape(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``view``/``reshape``: the channel dim may merge with neighbours or split (heads, channel shuffle).

    Split into several dims, exactly one of them must be sized ``-1`` or from
    the tensor's own size (``x.size(1) // g``): it carries the units; every
    other sub-dim keeps its size, so its channels are united into those units.
    """
    x = args[0]
    out = _shape(value)
    if not x.tracked:
        return Flow(out)
    sizes = tuple(args[1:]) if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size") or ())
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) != len(out):
        sizes = (None,) * len(out)
    run = next(r for r in _segments(x.shape, out) if r[0] <= x.dim < r[1])
    i0, i1, j0, j1 = run
    real = [j for j in range(j0, j1) if out[j] != 1]
    if len(real) <= 1:
        j = real[0] if real else j0
        if sizes[j] is not None and not _dynamic(sizes[j]):
            p.uf.freeze(x.atoms, f"{p.where()}: reshaped to a constant size {sizes[j]} on the channel dim "
                                 "(write -1 there)")
        return _merge(x, i0, i1 - 1, out, j)
    if i1 - i0 > 1 and any(x.shape[i] != 1 for i in range(i0, i1) if i != x.dim):
        p.fail(func, f"reshapes {x.shape} -> {out} across the channel dim {x.dim}")
    free = [j for j in real if sizes[j] is not None and _dynamic(sizes[j])]
    if len(free) != 1:
        p.uf.freeze(x.atoms, f"{p.where()}: the channel dim is split into constant sizes "
                             f"{[out[j] for j in real]} (write -1 for the one that may shrink)")
        return Flow(out)
    grid = torch.tensor(x.atoms).reshape([out[j] for j in real]).movedim(real.index(free[0]), 0)
    grid = grid.reshape(grid.shape[0], -1)
    for row in grid.tolist():
        p.uf.unite_all(row)
    return Flow(out, free[0], tuple(row[0] for row in grid.tolist()))


def permute(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``permute``: the channel dim moves with its axis."""
    x = args[0]
    dims = args[1:] if len(args) > 1 else (kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not x.tracked:
        return Flow(_shape(value))
    order = [d % len(x.shape) for d in dims]
    return Flow(_shape(value), order.index(x.dim), x.atoms)


def transpose(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``transpose(a, b)`` / ``t()`` / ``.T``: swap the channel dim if it is one of the two."""
    x = args[0]
    if not x.tracked:
        return Flow(_shape(value))
    n = len(x.shape)
    if getattr(func, "__name__", "") in ("t", "__get__") and n == 2:
        a, b = 0, 1
    else:
        a, b = (arg(args, kwargs, 1, "dim0", -2) % n, arg(args, kwargs, 2, "dim1", -1) % n) if n > 1 else (0, 0)
    dim = b if x.dim == a else a if x.dim == b else x.dim
    return Flow(_shape(value), dim, x.atoms)


def unsqueeze(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``unsqueeze(d)``: the channel dim shifts if the new axis comes before it."""
    x = args[0]
    out = _shape(value)
    new = arg(args, kwargs, 1, "dim") % len(out)
    return Flow(out, x.dim + (new <= x.dim), x.atoms)


def squeeze(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``squeeze``: size-1 dims before the channel dim go away."""
    x = args[0]
    out = _shape(value)
    if x.shape[x.dim] == 1 and len(out) < len(x.shape):
        p.uf.freeze(x.atoms, f"{p.where()}: squeezes a one-channel dim")
        return Flow(out)
    dims = arg(args, kwargs, 1, "dim")
    n = len(x.shape)
    if dims is None:
        gone = [d for d in range(n) if x.shape[d] == 1]
    else:
        gone = [d % n for d in ((dims,) if isinstance(dims, int) else dims) if x.shape[d % n] == 1]
    return Flow(out, x.dim - sum(d < x.dim for d in gone), x.atoms)


def expand(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``expand``/``expand_as``/``broadcast_to``: new leading dims; the channel dim keeps its size."""
    x = args[0]
    out = _shape(value)
    dim = x.dim + len(out) - len(x.shape)
    if out[dim] != x.shape[x.dim]:
        p.fail(func, f"expands the channel dim {x.shape} -> {out}")
    return Flow(out, dim, x.atoms)


def repeat_interleave(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``repeat_interleave(n, dim)`` on the channel dim: each channel's copies stay with it (GQA)."""
    x, repeats, dim = args[0], arg(args, kwargs, 1, "repeats"), arg(args, kwargs, 2, "dim")
    if dim is None or not isinstance(repeats, int):
        p.fail(func, "only an int number of repeats along a given dim is supported")
    dim %= len(x.shape)
    if dim != x.dim:
        return Flow(_shape(value), x.dim, x.atoms)
    return Flow(_shape(value), dim, tuple(a for a in x.atoms for _ in range(repeats)))


def reduce(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Any:
    """``mean``/``sum``/``amax``/``var``... over dims: over the channel dim it freezes them."""
    x = args[0]
    tensor = value if isinstance(value, torch.Tensor) else (value[0] if isinstance(value, tuple) else None)
    if tensor is None:
        return Flow(None)
    out = _shape(tensor)
    dims = arg(args, kwargs, 1, "dim")
    keep = bool(arg(args, kwargs, 2, "keepdim", False))
    n = len(x.shape)
    dims = set(range(n)) if dims is None else {d % n for d in ((dims,) if isinstance(dims, int) else dims)}
    if x.dim in dims:
        p.uf.freeze(x.atoms, f"{p.where()}: reduced over the channel dim")
        flow = Flow(out)
    else:
        flow = Flow(out, x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.atoms)
    return flow if isinstance(value, torch.Tensor) else tuple(flow for _ in value)


def softmax(p: Any, func: Any, value: Any, args: tuple, kwargs: dict, dim: int | None = None) -> Flow:
    """``softmax`` across channels freezes them (removing one changes every other)."""
    x = args[0]
    dim = arg(args, kwargs, 1, "dim") if dim is None else dim
    if x.tracked and dim is not None and dim % len(x.shape) == x.dim:
        p.uf.freeze(x.atoms, f"{p.where()}: softmax across the channel dim")
        return Flow(x.shape)
    return unary(p, func, value, args, kwargs)


def normalize(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Functional layer/group/rms norm: statistics span the channels, so they are frozen."""
    x = args[0]
    if x.tracked:
        p.uf.freeze(x.atoms, f"{p.where()}: normalization statistics span every channel")
    return Flow(_shape(value))


def matmul(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``matmul``/``@``/``bmm``: batch dims couple like an add; contracted channels couple; rows/cols pass."""
    a, b = args[0], args[1]
    out = _shape(value)
    if len(a.shape) < 2 or len(b.shape) < 2:
        p.fail(func, "matrix-vector products of tracked tensors are not supported")
    result = Flow(out)
    if a.tracked and a.dim == len(a.shape) - 1:
        _contract(p, func, a, b, len(b.shape) - 2)
    if b.tracked and b.dim == len(b.shape) - 2 and not (a.tracked and a.dim == len(a.shape) - 1):
        p.uf.freeze(b.atoms, f"{p.where()}: contracted with a tensor whose channels cannot change")
    if a.tracked and a.dim == len(a.shape) - 2:
        result = Flow(out, len(out) - 2, a.atoms)
    if b.tracked and b.dim == len(b.shape) - 1:
        if result.tracked:
            p.fail(func, "both operands carry channels into the output")
        result = Flow(out, len(out) - 1, b.atoms)
    batch = [t for t in (a, b) if t.tracked and t.dim < len(t.shape) - 2]
    if batch:
        if result.tracked:
            p.fail(func, "channels on a batch dim and on a matrix dim at once")
        shapes = [Flow(t.shape[:-2], t.dim if t.tracked and t.dim < len(t.shape) - 2 else None,
                       t.atoms if t.tracked and t.dim < len(t.shape) - 2 else None) for t in (a, b)]
        flow = elementwise(p, func, torch.empty(out[:-2], device="meta"), tuple(shapes), {})
        result = Flow(out, flow.dim, flow.atoms)
    return result


def _contract(p: Any, func: Any, a: Flow, b: Flow, b_dim: int) -> None:
    if b.tracked and b.dim == b_dim:
        p.uf.unite(a.atoms, b.atoms)  # zeroed channels contribute nothing to the sum, removed ones neither
    else:
        p.uf.freeze(a.atoms, f"{p.where()}: contracted with a tensor whose channels cannot change")


def linear(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``F.linear(x, weight, bias)`` with the model's own parameters: a linear layer written functionally."""
    x, w, bias = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    out = _shape(value)
    if w.tracked or (isinstance(bias, Flow) and bias.tracked):
        p.fail(func, "a weight computed from pruned channels is not supported")
    if x.tracked and x.dim == len(x.shape) - 1:
        if w.source is None:
            p.uf.freeze(x.atoms, f"{p.where()}: multiplied by a weight that is not a model parameter")
        else:
            p.graph.add_member(Member(*w.source, 1, x.atoms))
        return Flow(out)
    if x.tracked:
        return Flow(out, x.dim, x.atoms)
    return Flow(out)


def attention(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``F.scaled_dot_product_attention``: heads (dim -3) of q, k, v are coupled (GQA: a KV head with its queries)."""
    q, k, v = args[0], arg(args, kwargs, 1, "key"), arg(args, kwargs, 2, "value")
    mask = arg(args, kwargs, 3, "attn_mask")
    out = _shape(value)
    for t in (q, k, v):
        if t.tracked and t.dim != len(t.shape) - 3:
            p.fail(func, f"channels on dim {t.dim} of a {len(t.shape)}-D input; only whole heads (dim -3) can go")
    hq, hk = q.shape[-3], k.shape[-3]
    heads = q.atoms if q.tracked else None
    if heads is None:
        for t in (k, v):
            if t.tracked:
                p.uf.freeze(t.atoms, f"{p.where()}: attends with queries whose heads cannot change")
        return Flow(out)
    for t in (k, v):
        if t.tracked and hq % t.shape[-3] == 0:
            rep = hq // t.shape[-3]
            p.uf.unite(heads, tuple(t.atoms[h // rep] for h in range(hq)))
        else:
            p.uf.freeze(heads, f"{p.where()}: keys/values whose heads cannot change")
    if isinstance(mask, Flow) and mask.tracked:  # a per-head bias (T5's relative positions): heads meet
        if mask.dim == len(mask.shape) - 3 and mask.shape[-3] == hq:
            p.uf.unite(heads, mask.atoms)
        else:
            p.uf.freeze(mask.atoms, f"{p.where()}: an attention mask whose channels cannot change")
    elif isinstance(mask, Flow) and mask.is_tensor and len(mask.shape) >= 3 and mask.shape[-3] == hq != 1:
        p.uf.freeze(heads, f"{p.where()}: a per-head attention mask")
    del hk
    return Flow(out, len(out) - 3, heads)


def getitem(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Any:
    """Indexing keeps channels only under a full slice of the channel dim."""
    container, index = args[0], args[1]
    out = _shape(value) if isinstance(value, torch.Tensor) else None
    if not container.tracked or out is None:
        return Flow(out)
    dim = _index_dim(container, index)
    if dim is None:
        p.uf.freeze(container.atoms, f"{p.where()}: indexes into the channel dim")
        return Flow(out)
    return Flow(out, dim, container.atoms)


def _index_dim(x: Flow, index: Any) -> int | None:
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (Flow, list)) for i in items):  # advanced indexing moves dims around: stay safe
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(x.shape) - sum(i is not None for i in items if i is not Ellipsis)
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    in_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if in_dim == x.dim:
            return out_dim if item == slice(None) else None
        in_dim += 1
        out_dim += not isinstance(item, int)
    return out_dim + (x.dim - in_dim)


def no_tensor(p: Any, func: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Shape queries, comparisons to bool and the like: nothing to follow."""
    return Flow(None) if not isinstance(value, torch.Tensor) else Flow(_shape(value))


_UNARY_FUNCS = (F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh,
                F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.dropout, F.dropout1d, F.dropout2d,
                F.dropout3d, F.alpha_dropout, F.hardtanh, F.softplus, torch.neg, operator.neg, torch.abs, torch.exp,
                torch.clamp, torch.square, torch.sqrt, torch.rsqrt, F.relu_, torch.erf, torch.pow, F.selu, F.celu,
                F.gelu, torch.nn.functional.silu, torch.clip, torch.log, torch.sin, torch.cos, F.prelu,
                torch.nan_to_num)
_BINARY_FUNCS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                 operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                 torch.minimum, torch.where, torch.addcmul, torch.lerp, torch.masked_fill)
_SPATIAL_FUNCS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                  F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.lp_pool2d, F.pixel_unshuffle,
                  F.max_pool2d_with_indices, F.upsample, F.upsample_nearest, F.upsample_bilinear)
_REDUCE = ("mean", "sum", "amax", "amin", "var", "std", "norm", "prod", "logsumexp", "max", "min", "argmax",
           "argmin", "var_mean", "std_mean")

FUNCTIONS: dict[Any, Rule] = {
    **{f: unary for f in _UNARY_FUNCS},
    **{f: elementwise for f in _BINARY_FUNCS},
    **{f: spatial for f in _SPATIAL_FUNCS},
    **{getattr(torch, n): reduce for n in _REDUCE},
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack, torch.split: split,
    torch.chunk: chunk, torch.flatten: flatten, torch.reshape: reshape, torch.permute: permute,
    torch.transpose: transpose, torch.swapaxes: transpose, torch.unsqueeze: unsqueeze, torch.squeeze: squeeze,
    torch.broadcast_to: expand, torch.repeat_interleave: repeat_interleave,
    F.softmax: softmax, F.log_softmax: softmax, torch.softmax: softmax,
    F.layer_norm: normalize, F.group_norm: normalize, F.rms_norm: normalize, F.normalize: normalize,
    F.pad: pad, torch.matmul: matmul, torch.bmm: matmul, F.linear: linear,
    F.scaled_dot_product_attention: attention, operator.getitem: getitem,
}

METHODS: dict[str, Rule] = {
    **{m: unary for m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach",
                          "float", "half", "double", "bfloat16", "to", "type", "type_as", "abs", "neg", "exp",
                          "clamp", "clamp_", "clip", "square", "sqrt", "rsqrt", "requires_grad_", "cpu", "cuda",
                          "__neg__", "__abs__", "pow", "__pow__", "pow_", "erf", "log", "sin", "cos", "data",
                          "real", "exp_", "neg_", "sqrt_", "detach_", "nan_to_num", "float_power", "reciprocal",
                          "__invert__", "logical_not", "__rpow__", "masked_fill_", "zero_", "fill_")},
    **{m: elementwise for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__", "__radd__",
                                "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
                                "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "rsub",
                                "masked_fill", "where", "maximum", "minimum", "lerp", "addcmul", "copy_",
                                "__and__", "__or__", "eq", "ne", "lt", "gt", "le", "ge", "__eq__", "__ne__",
                                "__lt__", "__gt__", "__le__", "__ge__", "true_divide", "floor_divide")},
    **{m: reduce for m in _REDUCE},
    "split": split, "chunk": chunk, "flatten": flatten, "view": reshape, "reshape": reshape,
    "permute": permute, "transpose": transpose, "swapaxes": transpose, "t": transpose, "T": transpose,
    "mT": transpose, "unsqueeze": unsqueeze, "squeeze": squeeze, "expand": expand, "expand_as": expand,
    "repeat_interleave": repeat_interleave, "softmax": softmax, "log_softmax": softmax,
    "matmul": matmul, "__matmul__": matmul, "bmm": matmul, "__getitem__": getitem,
    "size": no_tensor, "dim": no_tensor, "numel": no_tensor, "__len__": no_tensor, "item": no_tensor,
    "tolist": no_tensor, "__bool__": no_tensor, "__format__": no_tensor, "__repr__": no_tensor,
    "dtype": no_tensor, "device": no_tensor, "ndim": no_tensor, "is_floating_point": no_tensor,
    "element_size": no_tensor, "stride": no_tensor, "data_ptr": no_tensor, "is_contiguous": no_tensor,
    "shape": no_tensor, "requires_grad": no_tensor, "is_cuda": no_tensor, "layout": no_tensor, "grad_fn": no_tensor,
}


def rule_for(func: Any, name: str | None = None) -> Rule | None:
    """The rule of a torch function or tensor method (by identity, then by name), or ``None``."""
    try:
        rule = FUNCTIONS.get(func)
    except TypeError:  # unhashable callables
        rule = None
    if rule is not None:
        return rule
    name = name or getattr(func, "__name__", "")
    qual = getattr(func, "__qualname__", "")
    if qual.startswith(("TensorBase.", "Tensor.")) or getattr(func, "__name__", "") == "__get__":
        return METHODS.get(name)
    if getattr(torch, name, None) is func or getattr(F, name, None) is func:
        return METHODS.get(name) if name in _REDUCE or name in ("where", "pow") else None
    return None
