"""How channels flow through functions and tensor methods (and parameter-free layers).

Each rule is ``rule(p, node, value, args, kwargs) -> Flow(s)`` where ``p`` is the
:class:`~prunekit.structural.propagate.Propagator`, ``value`` the real result
on the example input and ``args``/``kwargs`` the call's arguments with every
traced value replaced by its Flow. An op that reads several channels into one
(a mean over channels, a softmax across them, a constant slice) freezes them.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .flow import Flow

Rule = Callable[..., Any]


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``name`` at position ``index``."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def unary(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Elementwise on its first argument: channels pass through."""
    x = args[0]
    if not isinstance(value, torch.Tensor):
        return Flow(None)
    if x.tracked and _shape(value) != x.shape:
        p.fail(node, f"changes the shape {x.shape} -> {_shape(value)}")
    return Flow(_shape(value), x.dim, x.atoms)


def spatial(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Pooling, interpolation, padding of trailing dims: channels on dim 1 pass through."""
    x = args[0]
    out = _shape(value)
    if not x.tracked:
        return Flow(out)
    if x.dim != 1 or len(out) != len(x.shape) or out[1] != x.shape[1]:
        p.fail(node, f"expects channels on dim 1 and keeps them; got dim {x.dim}, {x.shape} -> {out}")
    return Flow(out, 1, x.atoms)


def elementwise(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Broadcasting binary op (add, mul, ...): channels that meet are coupled."""
    out = _shape(value)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Flow) and a.is_tensor]
    tracked = [t for t in tensors if t.tracked]
    if not tracked:
        return Flow(out)
    offsets = [len(out) - len(t.shape) for t in tensors]
    main = next((t for t in tracked if t.shape[t.dim] == out[t.dim + len(out) - len(t.shape)]), tracked[0])
    dim = main.dim + len(out) - len(main.shape)
    where = p.where(node)
    for t, off in zip(tensors, offsets):
        if t is main:
            continue
        d = dim - off
        size = t.shape[d] if 0 <= d < len(t.shape) else 1
        if t.tracked and t.dim == d and size == out[dim]:
            p.uf.unite(main.atoms, t.atoms)
        elif size != 1:
            p.uf.freeze(main.atoms, f"{where}: combined with a tensor whose channels cannot change")
        if t.tracked and not (t.dim == d and size == out[dim]):
            p.uf.freeze(t.atoms, f"{where}: broadcast against other channels")
    return Flow(out, dim, main.atoms)


def cat(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Concatenation: along the channel dim atoms are concatenated (offsets), else coupled."""
    parts = list(arg(args, kwargs, 0, "tensors"))
    out = _shape(value)
    dim = arg(args, kwargs, 1, "dim", 0) % len(out)
    tracked = [t for t in parts if t.tracked]
    if not tracked:
        return Flow(out)
    if any(t.dim != dim for t in tracked):
        return elementwise(p, node, value, tuple(parts), {})  # couples the parts' channels like an add
    atoms: list[int] = []
    for t in parts:
        if t.tracked:
            atoms.extend(t.atoms)
        else:
            fresh = p.uf.new(t.shape[dim])
            p.uf.freeze(fresh, f"{p.where(node)}: concatenated tensor whose channels cannot change")
            atoms.extend(fresh)
    return Flow(out, dim, tuple(atoms))


def split(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> tuple[Flow, ...]:
    """``split``: constant section sizes, so channels split along are frozen."""
    return _pieces(p, node, value, args, kwargs, equal=False)


def chunk(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> tuple[Flow, ...]:
    """``chunk(n)``: equal pieces; channel ``i`` of every piece is coupled so they stay equal."""
    return _pieces(p, node, value, args, kwargs, equal=True)


def _pieces(p: Any, node: Any, value: Any, args: tuple, kwargs: dict, equal: bool) -> tuple[Flow, ...]:
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
    if equal and len(set(sizes)) == 1:
        for piece in pieces[1:]:
            p.uf.unite(pieces[0], piece)
    else:
        p.uf.freeze(x.atoms, f"{p.where(node)}: split into pieces of constant sizes {sizes} "
                             "(use chunk() for equal pieces that can shrink)")
    return tuple(Flow(s, dim, piece) for s, piece in zip(shapes, pieces))


def flatten(p: Any, node: Any, value: Any, args: tuple, kwargs: dict, start: int | None = None,
            end: int | None = None) -> Flow:
    """``flatten(start, end)``: a channel flattened with trailing dims owns every feature it becomes."""
    x = args[0]
    out = _shape(value)
    if not x.tracked:
        return Flow(out)
    n = len(x.shape)
    start = (arg(args, kwargs, 1, "start_dim", 0) if start is None else start) % n
    end = (arg(args, kwargs, 2, "end_dim", -1) if end is None else end) % n
    return _merge(x, start, end, out)


def _merge(x: Flow, start: int, end: int, out: tuple[int, ...]) -> Flow:
    d = x.dim
    if d < start:
        return Flow(out, d, x.atoms)
    if d > end:
        return Flow(out, d - (end - start), x.atoms)
    outer = math.prod(x.shape[start:d])
    inner = math.prod(x.shape[d + 1:end + 1])
    atoms = tuple(a for _ in range(outer) for a in x.atoms for _ in range(inner))
    return Flow(out, start, atoms)


def reshape(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``view``/``reshape``: allowed when it only merges the channel dim with trailing dims."""
    x = args[0]
    out = _shape(value)
    if not x.tracked:
        return Flow(out)
    d, s = x.dim, x.shape
    sizes = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size") or ())
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    for end in range(d, len(s)):
        if out[:d] == s[:d] and len(out) > d and out[d] == math.prod(s[d:end + 1]) and out[d + 1:] == s[end + 1:]:
            if d < len(sizes) and isinstance(sizes[d], int) and sizes[d] != -1:
                p.uf.freeze(x.atoms, f"{p.where(node)}: reshaped to a constant size {sizes[d]} on the channel dim "
                                     "(write -1 there)")
            return _merge(x, d, end, out)
    p.fail(node, f"reshapes {s} -> {out} across the channel dim {d}")
    return Flow(out)  # unreachable


def permute(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``permute``: the channel dim moves with its axis."""
    x = args[0]
    dims = args[1:] if len(args) > 1 else (kwargs.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not x.tracked:
        return Flow(_shape(value))
    order = [d % len(x.shape) for d in dims]
    return Flow(_shape(value), order.index(x.dim), x.atoms)


def transpose(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``transpose(a, b)`` / ``t()``: swap the channel dim if it is one of the two."""
    x = args[0]
    if not x.tracked:
        return Flow(_shape(value))
    n = len(x.shape)
    a, b = (arg(args, kwargs, 1, "dim0", 0) % n, arg(args, kwargs, 2, "dim1", 1) % n) if n > 1 else (0, 0)
    dim = b if x.dim == a else a if x.dim == b else x.dim
    return Flow(_shape(value), dim, x.atoms)


def unsqueeze(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``unsqueeze(d)``: the channel dim shifts if the new axis comes before it."""
    x = args[0]
    out = _shape(value)
    if not x.tracked:
        return Flow(out)
    new = arg(args, kwargs, 1, "dim") % len(out)
    return Flow(out, x.dim + (new <= x.dim), x.atoms)


def reduce(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """``mean``/``sum``/``amax``/``amin`` over dims: over the channel dim it freezes them."""
    x = args[0]
    if not isinstance(value, torch.Tensor):
        return Flow(None)
    out = _shape(value)
    if not x.tracked:
        return Flow(out)
    dims = arg(args, kwargs, 1, "dim")
    keep = bool(arg(args, kwargs, 2, "keepdim", False))
    n = len(x.shape)
    dims = set(range(n)) if dims is None else {d % n for d in ((dims,) if isinstance(dims, int) else dims)}
    if x.dim in dims:
        p.uf.freeze(x.atoms, f"{p.where(node)}: reduced over the channel dim")
        return Flow(out)
    return Flow(out, x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.atoms)


def softmax(p: Any, node: Any, value: Any, args: tuple, kwargs: dict, dim: int | None = None) -> Flow:
    """``softmax`` across channels freezes them (removing one changes every other)."""
    x = args[0]
    dim = arg(args, kwargs, 1, "dim") if dim is None else dim
    if x.tracked and dim is not None and dim % len(x.shape) == x.dim:
        p.uf.freeze(x.atoms, f"{p.where(node)}: softmax across the channel dim")
        return Flow(x.shape)
    return unary(p, node, value, args, kwargs)


def normalize(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Functional layer/group norm: statistics span the channels, so they are frozen."""
    x = args[0]
    if x.tracked:
        p.uf.freeze(x.atoms, f"{p.where(node)}: normalization statistics span every channel")
    return Flow(_shape(value))


def getitem(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Any:
    """Indexing a tuple picks its element; indexing a tensor keeps channels only under a full slice."""
    container, index = args[0], args[1]
    if isinstance(container, (tuple, list)):
        return container[index]
    if not isinstance(container, Flow) or not container.is_tensor:
        return Flow(None)
    out = _shape(value) if isinstance(value, torch.Tensor) else None
    if not container.tracked or out is None:
        return Flow(out)
    dim = _index_dim(container, index)
    if dim is None:
        p.uf.freeze(container.atoms, f"{p.where(node)}: indexes into the channel dim")
        return Flow(out)
    return Flow(out, dim, container.atoms)


def _index_dim(x: Flow, index: Any) -> int | None:
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, Flow) for i in items):
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


def no_tensor(p: Any, node: Any, value: Any, args: tuple, kwargs: dict) -> Flow:
    """Shape queries and the like: not a tensor."""
    return Flow(None) if not isinstance(value, torch.Tensor) else Flow(_shape(value))


_UNARY_FUNCS = (F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh,
                F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.dropout, F.dropout1d, F.dropout2d,
                F.hardtanh, F.softplus, torch.neg, operator.neg, torch.abs, torch.exp, torch.clamp, torch.square,
                torch.sqrt, torch.rsqrt, F.relu_, torch.erf)
_BINARY_FUNCS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                 operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                 torch.minimum)
_SPATIAL_FUNCS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                  F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate)

FUNCTIONS: dict[Any, Rule] = {
    **{f: unary for f in _UNARY_FUNCS},
    **{f: elementwise for f in _BINARY_FUNCS},
    **{f: spatial for f in _SPATIAL_FUNCS},
    torch.cat: cat, torch.concat: cat, torch.split: split, torch.chunk: chunk,
    torch.flatten: flatten, torch.reshape: reshape, torch.permute: permute, torch.transpose: transpose,
    torch.unsqueeze: unsqueeze, torch.mean: reduce, torch.sum: reduce, torch.amax: reduce, torch.amin: reduce,
    F.softmax: softmax, F.log_softmax: softmax, torch.softmax: softmax,
    F.layer_norm: normalize, F.group_norm: normalize,
    operator.getitem: getitem, getattr: no_tensor,
}

METHODS: dict[str, Rule] = {
    **{m: unary for m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach",
                          "float", "half", "double", "to", "type_as", "abs", "neg", "exp", "clamp", "clamp_",
                          "square", "sqrt", "requires_grad_", "cpu", "cuda")},
    **{m: elementwise for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")},
    "split": split, "chunk": chunk, "flatten": flatten, "view": reshape, "reshape": reshape,
    "permute": permute, "transpose": transpose, "t": transpose, "unsqueeze": unsqueeze,
    "mean": reduce, "sum": reduce, "amax": reduce, "amin": reduce, "softmax": softmax, "log_softmax": softmax,
    "size": no_tensor, "dim": no_tensor, "numel": no_tensor,
}

_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                  nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                  nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ReflectionPad2d,
                    nn.ReplicationPad2d)


def module_rule(module: nn.Module) -> Rule | None:
    """The rule for a parameter-free layer, or ``None`` if it has none."""
    if isinstance(module, _UNARY_MODULES):
        return unary
    if isinstance(module, _SPATIAL_MODULES):
        return spatial
    if isinstance(module, nn.Flatten):
        return lambda *a: flatten(*a, start=module.start_dim, end=module.end_dim)
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        return lambda *a: softmax(*a, dim=module.dim)
    return None
