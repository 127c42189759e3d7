"""prunekit's sparse kernels as torch custom operators, so accelerated models compile and export.

:func:`register` defines, once per process:

- ``prunekit::spmm_csr(Tensor crow, Tensor col, Tensor values, Tensor? bias, Tensor x) -> Tensor``
- ``prunekit::spmm_rows(Tensor gptr, Tensor col, Tensor values, int rows, Tensor? bias, Tensor x) -> Tensor``
- ``prunekit::spmm_nm(Tensor offsets, Tensor values, int n, int m, Tensor? bias, Tensor x) -> Tensor``

Each computes ``y = x @ W.T + bias`` for ``x`` of shape ``(B, in)`` float32 and a weight stored as
:mod:`~prunekit.runtime.kernels` lays it out (CSR with int32 indices; row blocks from
:func:`~prunekit.runtime.kernels.row_blocks`; N:M from :func:`~prunekit.runtime.kernels.nm_pack`,
``values`` and ``offsets`` of shape ``(out, in // m * n)``). The result is ``(B, out)``, the
contiguous ``(B, out)`` tensor for any strides of ``x`` (eager :class:`~prunekit.runtime.SparseLinear` calls
also keep the kernels' transposed layout along chains of sparse layers: see
:func:`~prunekit.runtime.kernels.batch_major`).

Every op has a fake implementation (shapes, dtypes and strides only), which ``torch.compile`` and
``torch.export`` use while tracing, and a CPU implementation that runs the compiled kernel when
:func:`~prunekit.runtime.kernels.available` and otherwise a pure-torch product of the same stored
arrays (``torch.sparse`` CSR times dense; same result to fp32 rounding). So an exported program runs
wherever prunekit is importable, compiler or not: call :func:`register` (or
:func:`prunekit.runtime.exported.load`) before
``torch.export.load``. The ops are inference-only: a grad-requiring input raises. Index arrays are
trusted (built by :class:`~prunekit.runtime.SparseLinear` or the packing functions): their sizes,
dtypes and layouts are checked, their values are not (that would cost a pass over them per call).

:class:`~prunekit.runtime.SparseLinear` runs the kernels directly when called eagerly on plain
tensors (:func:`eager`): going through the dispatcher to a Python kernel costs 5-10 µs per call.
Under tracing it calls the ops, so the graph holds ``torch.ops.prunekit.*`` and no Python objects.

Other kernels are made operators the same way with :func:`define`.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable

import torch

from . import kernels

__all__ = ["NAMESPACE", "define", "eager", "register", "spmm_csr", "spmm_nm", "spmm_rows"]

NAMESPACE = "prunekit"
_lock = threading.RLock()
_library: torch.library.Library | None = None
_defined: dict[str, torch._ops.OpOverload] = {}
_registered = False


def define(name: str, schema: str, cpu: Callable[..., torch.Tensor],
           fake: Callable[..., torch.Tensor]) -> torch._ops.OpOverload:
    """Define the operator ``prunekit::<name>`` once: its schema, CPU implementation and fake implementation.

    ``schema`` is the argument list and result, e.g. ``"(Tensor x, int n) -> Tensor"`` (tensors, ints,
    floats, bools; ``Tensor?`` for an optional tensor; no Python objects). ``fake`` gets the same arguments
    as tensors without data and must return an empty result of the real one's shape, dtype and strides;
    ``cpu`` computes it. Defining a name again returns the existing operator (its implementations stay).

    Returns:
        The operator, ``torch.ops.prunekit.<name>.default``.

    Example:
        >>> op = define("doc_twice", "(Tensor x) -> Tensor", lambda x: x * 2, lambda x: torch.empty_like(x))
        >>> op(torch.ones(2)).tolist()
        [2.0, 2.0]
    """
    global _library
    with _lock:
        if name in _defined:
            return _defined[name]
        if _library is None:
            _library = torch.library.Library(NAMESPACE, "FRAGMENT")
        _library.define(name + schema)
        _library.impl(name, cpu, "CPU")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_library)
        _defined[name] = getattr(getattr(torch.ops, NAMESPACE), name).default
        return _defined[name]


def register() -> None:
    """Define prunekit's fp32 sparse operators (``torch.ops.prunekit.spmm_csr``, ``spmm_rows``, ``spmm_nm``).

    Idempotent and thread-safe; :class:`~prunekit.runtime.SparseLinear` calls it when it is built.
    A process that only loads an exported program calls it before ``torch.export.load``.

    Example:
        >>> register()
        >>> torch.ops.prunekit.spmm_csr.default.name()
        'prunekit::spmm_csr'
    """
    global _registered
    if _registered:
        return
    with _lock:
        if not _registered:
            define("spmm_csr", "(Tensor crow, Tensor col, Tensor values, Tensor? bias, Tensor x) -> Tensor",
                   _csr_cpu, _csr_fake)
            define("spmm_rows", "(Tensor gptr, Tensor col, Tensor values, int rows, Tensor? bias, Tensor x) -> Tensor",
                   _rows_cpu, _rows_fake)
            define("spmm_nm", "(Tensor offsets, Tensor values, int n, int m, Tensor? bias, Tensor x) -> Tensor",
                   _nm_cpu, _nm_fake)
            _registered = True


def eager(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` runs eagerly on real data: no ``torch.compile``/``torch.export``/``jit`` trace,
    no tensor subclass, no dispatch or function mode. Then the kernel may be called directly, skipping the
    dispatcher; otherwise the caller must go through the operator.

    Example:
        >>> eager(torch.ones(2))
        True
    """
    return not (_is_compiling() or type(x) is not torch.Tensor or _is_tracing() or _dispatch_modes()
                or _function_modes())


# Bound once: eager() is on every SparseLinear call (each lookup costs about as much as the call itself).
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack


def spmm_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
             x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` in CSR (int32 ``crow``/``col``, float32 ``values``), by the operator.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
        >>> m = w.to_sparse_csr()
        >>> crow, col = m.crow_indices().int(), m.col_indices().int()
        >>> spmm_csr(crow, col, m.values(), torch.tensor([0.5, -1.0]), torch.ones(1, 3)).tolist()
        [[3.5, -1.0]]
    """
    register()
    return torch.ops.prunekit.spmm_csr.default(crow, col, values, bias, x)


def spmm_rows(gptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int, bias: torch.Tensor | None,
              x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` as row blocks of ``rows`` rows (:func:`~prunekit.runtime.kernels.row_blocks`).

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
        >>> spmm_rows(*kernels.row_blocks(w, 2), 2, None, torch.ones(1, 3)).tolist()
        [[3.0, 3.0]]
    """
    register()
    return torch.ops.prunekit.spmm_rows.default(gptr, col, values, rows, bias, x)


def spmm_nm(offsets: torch.Tensor, values: torch.Tensor, n: int, m: int, bias: torch.Tensor | None,
            x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` for an ``n:m`` weight packed by :func:`~prunekit.runtime.kernels.nm_pack`.

    Example:
        >>> w = torch.tensor([[0.0, 5.0, 0.0, 7.0]])
        >>> spmm_nm(*kernels.nm_pack(w, 2, 4), 2, 4, None, torch.ones(1, 4)).tolist()
        [[12.0]]
    """
    register()
    return torch.ops.prunekit.spmm_nm.default(offsets, values, n, m, bias, x)


# -- checks shared by the fake and the CPU implementations (sizes, dtypes, layouts: O(1) per call) ----------------


def _fail(op: str, what: str) -> None:
    raise ValueError(f"prunekit::{op}: {what}")


def _check_common(op: str, index: tuple[tuple[str, torch.Tensor, torch.dtype], ...], values: torch.Tensor,
                  bias: torch.Tensor | None, x: torch.Tensor, out: int) -> None:
    for name, t, dtype in (*index, ("values", values, torch.float32)):
        if t.dtype != dtype or not t.is_contiguous():
            _fail(op, f"{name} must be a contiguous {dtype} tensor, got {t.dtype} {tuple(t.shape)}; build it with "
                      "SparseLinear or prunekit.runtime.kernels")
    if x.dtype != torch.float32 or x.dim() != 2:
        _fail(op, f"x must be a 2-D float32 tensor (B, in), got {x.dtype} {tuple(x.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.shape != (out,)):
        _fail(op, f"bias must be a contiguous float32 tensor of shape ({out},), got {bias.dtype} {tuple(bias.shape)}")


def _check_csr(crow, col, values, bias, x) -> int:
    if crow.dim() != 1 or crow.shape[0] < 1 or col.dim() != 1 or values.shape != col.shape:
        _fail("spmm_csr", f"needs crow (out + 1,), col and values (nnz,), got {tuple(crow.shape)}, "
                          f"{tuple(col.shape)}, {tuple(values.shape)}")
    out = crow.shape[0] - 1
    _check_common("spmm_csr", (("crow", crow, torch.int32), ("col", col, torch.int32)), values, bias, x, out)
    return out


def _check_rows(gptr, col, values, rows, bias, x) -> int:
    if rows < 1 or gptr.dim() != 1 or gptr.shape[0] < 1 or col.dim() != 1 or values.shape != (col.shape[0], rows):
        _fail("spmm_rows", f"needs gptr (groups + 1,), col (k,) and values (k, rows={rows}), got "
                           f"{tuple(gptr.shape)}, {tuple(col.shape)}, {tuple(values.shape)}")
    out = (gptr.shape[0] - 1) * rows
    _check_common("spmm_rows", (("gptr", gptr, torch.int32), ("col", col, torch.int32)), values, bias, x, out)
    return out


def _check_nm(offsets, values, n, m, bias, x) -> int:
    if n < 1 or n > 16 or 16 % n or not n < m <= 256:
        _fail("spmm_nm", f"{n}:{m} needs n a power of two dividing 16 and n < m <= 256")
    if values.dim() != 2 or offsets.shape != values.shape or x.dim() != 2 or x.shape[1] % m \
            or values.shape[1] != x.shape[1] // m * n:
        _fail("spmm_nm", f"offsets and values must both be (out, in // m * n) for {n}:{m} and x (B, in), got "
                         f"{tuple(offsets.shape)}, {tuple(values.shape)}, x {tuple(x.shape)}")
    out = values.shape[0]
    _check_common("spmm_nm", (("offsets", offsets, torch.uint8),), values, bias, x, out)
    return out


def _empty_result(out: int, x: torch.Tensor) -> torch.Tensor:
    """The result: a contiguous ``(B, out)`` tensor, whatever the strides of ``x``.

    (A layout that followed the input's, as :class:`~prunekit.runtime.SparseLinear` does eagerly, would
    depend on strides the compiler may still change after it has asked this function; measured with
    torch 2.13's inductor, which then asserted the other layout.)
    """
    return x.new_empty((x.shape[0], out), dtype=torch.float32)


def _row_major_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` laid out so that the kernels return a contiguous result (a transposed view is copied)."""
    return x.contiguous() if x.shape[0] > 1 and kernels.batch_major(x) else x


# -- fake implementations (tracing: shapes only) ---------------------------------------------------------------------


def _csr_fake(crow, col, values, bias, x):
    return _empty_result(_check_csr(crow, col, values, bias, x), x)


def _rows_fake(gptr, col, values, rows, bias, x):
    return _empty_result(_check_rows(gptr, col, values, rows, bias, x), x)


def _nm_fake(offsets, values, n, m, bias, x):
    return _empty_result(_check_nm(offsets, values, n, m, bias, x), x)


# -- CPU implementations: the compiled kernel, else the same product in torch ---------------------------------------


def _csr_cpu(crow, col, values, bias, x):
    # One expression for the common case (each check costs ~0.2 µs); the detailed checks name what is wrong.
    if not (crow.dtype == _I32 and col.dtype == _I32 and values.dtype == _F32 and x.dtype == _F32
            and x.dim() == 2 and crow.dim() == 1 and values.shape == col.shape and col.dim() == 1
            and crow.is_contiguous() and col.is_contiguous() and values.is_contiguous()
            and _bias_ok(bias, crow.shape[0] - 1)):
        _check_csr(crow, col, values, bias, x)
    if _grad_needed(values, bias, x):
        _no_grad_error("spmm_csr")
    if kernels.available()[0]:
        return kernels.linear_unchecked(crow, col, values, bias, _row_major_input(x))
    return _sparse_product(crow, col, values, bias, x, crow.shape[0] - 1)


def _rows_cpu(gptr, col, values, rows, bias, x):
    out = (gptr.shape[0] - 1) * rows
    if not (gptr.dtype == _I32 and col.dtype == _I32 and values.dtype == _F32 and x.dtype == _F32
            and x.dim() == 2 and gptr.dim() == 1 and rows >= 1 and values.shape == (col.shape[0], rows)
            and col.dim() == 1 and gptr.is_contiguous() and col.is_contiguous() and values.is_contiguous()
            and _bias_ok(bias, out)):
        _check_rows(gptr, col, values, rows, bias, x)
    if _grad_needed(values, bias, x):
        _no_grad_error("spmm_rows")
    if kernels.available()[0]:
        return kernels.rows_linear_unchecked(gptr, col, values, rows, bias, _row_major_input(x))
    return _sparse_product(*_rows_as_csr(gptr, col, values, rows), bias, x, out)


def _nm_cpu(offsets, values, n, m, bias, x):
    if not (offsets.dtype == torch.uint8 and values.dtype == _F32 and x.dtype == _F32 and x.dim() == 2
            and n in _NM_N and n < m <= 256 and values.dim() == 2 and offsets.shape == values.shape
            and x.shape[1] % m == 0 and values.shape[1] == x.shape[1] // m * n and offsets.is_contiguous()
            and values.is_contiguous() and _bias_ok(bias, values.shape[0])):
        _check_nm(offsets, values, n, m, bias, x)
    if _grad_needed(values, bias, x):
        _no_grad_error("spmm_nm")
    if kernels.available()[0]:
        return kernels.nm_linear_unchecked(offsets, values, n, m, bias, _row_major_input(x))
    return _sparse_product(*_nm_as_csr(offsets, values, n, m), bias, x, values.shape[0])


_I32, _F32, _NM_N = torch.int32, torch.float32, (1, 2, 4, 8, 16)


def _bias_ok(bias: torch.Tensor | None, out: int) -> bool:
    return bias is None or (bias.dtype == _F32 and bias.dim() == 1 and bias.shape[0] == out and bias.is_contiguous())


def _grad_needed(values: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _no_grad_error(op: str) -> None:
    raise RuntimeError(f"prunekit::{op} is inference-only: call it under torch.inference_mode() or "
                       "torch.no_grad(), or on tensors that do not require grad")


def _sparse_product(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                    x: torch.Tensor, out: int) -> torch.Tensor:
    """``(W @ x.T + bias[:, None]).T`` with torch's CSR product, laid out like the kernel's result."""
    if out == 0 or x.shape[0] == 0 or col.numel() == 0:
        # A new tensor, never a view of bias (an operator's result must not alias its inputs).
        yt = torch.zeros(out, x.shape[0]) if bias is None else bias.unsqueeze(1).repeat(1, x.shape[0])
        return yt.t().contiguous()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Sparse CSR tensor support is in beta")
        w = torch.sparse_csr_tensor(crow, col, values, (out, x.shape[1]), check_invariants=False)
        yt = torch.mm(w, x.t()) if bias is None else torch.addmm(bias.unsqueeze(1), w, x.t())
    return yt.t().contiguous()


def _rows_as_csr(gptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                 rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row blocks as plain CSR: row ``g * rows + j`` has block ``g``'s columns and the ``j``-th of its values."""
    counts = (gptr[1:] - gptr[:-1]).long()
    row_len = counts.repeat_interleave(rows)
    crow = torch.zeros(row_len.numel() + 1, dtype=torch.int64)
    torch.cumsum(row_len, 0, out=crow[1:])
    row = torch.repeat_interleave(torch.arange(row_len.numel()), row_len)
    src = gptr.long()[row // rows] + torch.arange(row.numel()) - crow[row]  # index into col / values
    return crow.to(torch.int32), col[src], values[src, row % rows].contiguous()


def _nm_as_csr(offsets: torch.Tensor, values: torch.Tensor, n: int,
               m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padded N:M weight as CSR: every row ``in // m * n`` entries, column = group start + offset."""
    out, per_row = values.shape
    cols = (torch.arange(per_row) // n * m).unsqueeze(0) + offsets.long()
    crow = torch.arange(out + 1, dtype=torch.int64) * per_row
    return crow.to(torch.int32), cols.reshape(-1).to(torch.int32), values.reshape(-1)
