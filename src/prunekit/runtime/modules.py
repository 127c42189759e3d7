"""Sparse execution modules: drop-in, inference-only replacements for dense layers.

:class:`SparseLinear` holds a pruned ``nn.Linear`` weight in a torch sparse
layout (CSR, or BSR with square blocks) and a dense bias. The dense layer with
exact zeros is the oracle: outputs agree with it to float rounding.

Formulation (measured on a 2-core AVX-512 CPU, torch 2.13 + MKL, 768x3072
layers; see ``bench/runtime.py``): ``addmm(b[:, None], W, x.T).T`` is the
fastest correct form for batch >= 2 (MKL sparse times a dense matrix; the
transposed result is returned as a view, so a following ``SparseLinear``
receives a contiguous ``x.T`` for free); for CSR with one row,
``addmv(b, W, x)`` is about twice as fast as ``addmm``; ``F.linear`` with a
sparse weight fails under ``torch.inference_mode()``. Indices are stored as
int32 (MKL's native width; int64 indices are converted on every call, ~25%
slower at batch 1). MKL's BSR supports square blocks only.

Format ``"prunekit-rows"`` stores row blocks (:func:`~prunekit.runtime.kernels.row_blocks`:
``blocksize`` consecutive output rows share one column list, the block's
weights stored side by side), the layout of ``Blocks((r, c))`` pruning with
``r > 1``; prunekit's row-block kernel reuses every loaded activation across
the block's rows. Without the kernel it falls back to CSR.

Format ``"prunekit-nm"`` is for N:M sparsity along the input dimension
(``NM(n, m)`` pruning): it stores the weight as ``"csr"`` (every row the same
length, groups with fewer than ``n`` nonzeros padded with zeros) plus 1-byte
offsets within each group of ``m`` (buffer ``offsets``), which is all the N:M
kernel reads: 5 bytes per kept weight instead of CSR's 8, no row pointers.

Format ``"prunekit"`` stores the weight exactly as ``"csr"`` (int32 indices)
and runs prunekit's own kernel (:mod:`prunekit.runtime.kernels`, compiled at
first use) for float32 on the CPU: it keeps each output row's accumulators for
up to 64 batch columns in vector registers (AVX-512 or AVX2), reusing each loaded weight across them. When the kernel is unavailable, or for other dtypes/devices, the
module falls back to the ``"csr"`` path (same results to float rounding).

The three ``"prunekit*"`` formats work under ``torch.compile(fullgraph=True)`` and ``torch.export``:
traced, they call prunekit's operators (:mod:`prunekit.runtime.ops`), so the graph holds
``torch.ops.prunekit.spmm_csr/spmm_rows/spmm_nm`` on the module's buffers and an exported program
runs without this class (after :func:`prunekit.runtime.ops.register`), kernel or not. Eager calls
skip the dispatcher and call the kernel directly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from .._validate import check_choice, check_int
from . import kernels, ops

__all__ = ["SparseLinear", "FORMATS", "SPARSE_FORMATS"]

FORMATS = ("dense", "csr", "bsr", "prunekit", "prunekit-rows", "prunekit-nm")
SPARSE_FORMATS = ("csr", "bsr", "prunekit", "prunekit-rows", "prunekit-nm")
_KERNEL_FORMATS = ("prunekit", "prunekit-rows", "prunekit-nm")  # run by prunekit's kernels (ops.py)


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored sparse; for inference only.

    Args:
        weight: dense 2-D weight ``(out_features, in_features)``, floating point,
            usually with most entries exactly zero.
        bias: dense ``(out_features,)`` bias or ``None``.
        fmt: ``"csr"``, ``"bsr"``, ``"prunekit"`` (CSR run by prunekit's own kernel) or
            ``"prunekit-rows"`` (row blocks run by prunekit's row-block kernel) or ``"prunekit-nm"``
            (N:M run by prunekit's N:M kernel; see the module docs).
        blocksize: for ``fmt="bsr"`` the block edge ``b`` (blocks are ``b x b``; both weight
            dimensions must be multiples of ``b``); for ``fmt="prunekit-rows"`` the number of
            consecutive output rows per block (must divide ``out_features``). Only for those two.
        pattern: ``(n, m)`` for ``fmt="prunekit-nm"`` (at most ``n`` nonzeros in every ``m``
            consecutive inputs; ``n`` a power of two dividing 16, ``m <= 256`` dividing
            ``in_features``). Only for that format.
        transposed: the replaced layer stored its weight ``(in, out)`` (transformers ``Conv1D``);
            only :attr:`weight` reads back in that layout, the computation is the same.

    Inputs of any shape ``(*, in_features)`` are accepted, as for ``nn.Linear``.
    The module has no parameters (the sparse weight is stored as buffers
    ``crow_indices``, ``col_indices``, ``values``; so ``state_dict``,
    ``deepcopy`` and ``.to()`` work). It does not support autograd: calling it
    with grad enabled on an input that requires grad raises ``RuntimeError``;
    run it under ``torch.inference_mode()`` or ``torch.no_grad()``. Code that
    inspects layers still finds ``weight`` (a read-only dense copy made on each
    read), ``bias``, ``dtype``, ``device``, ``in_features`` and ``out_features``.

    Example:
        >>> lin = nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(torch.rand(32, 64) > 0.9)
        >>> sp = SparseLinear.from_linear(lin, "csr")
        >>> with torch.inference_mode():
        ...     y = sp(torch.randn(5, 64))
        >>> tuple(y.shape)
        (5, 32)
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "csr",
                 blocksize: int | None = None, pattern: tuple[int, int] | None = None, *,
                 transposed: bool = False) -> None:
        super().__init__()
        if not isinstance(transposed, bool):
            raise TypeError(f"SparseLinear: transposed must be a bool, got {type(transposed).__name__}")
        self.transposed = transposed
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.layout != torch.strided:
            raise TypeError(f"SparseLinear: weight must be a dense 2-D tensor, got "
                            f"{getattr(weight, 'layout', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
        if not weight.is_floating_point():
            raise TypeError(f"SparseLinear: weight must be floating point, got {weight.dtype}")
        self.fmt = check_choice("SparseLinear", "fmt", fmt, SPARSE_FORMATS)
        out_features, in_features = weight.shape
        if fmt in ("bsr", "prunekit-rows"):
            if blocksize is None:
                raise ValueError(f"SparseLinear: blocksize is required for fmt={fmt!r}")
            blocksize = check_int("SparseLinear", "blocksize", blocksize, minimum=1)
            if out_features % blocksize or (fmt == "bsr" and in_features % blocksize):
                what = "both weight dimensions" if fmt == "bsr" else "out_features of the weight"
                raise ValueError(f"SparseLinear: blocksize {blocksize} must divide {what} {tuple(weight.shape)}")
        elif blocksize is not None:
            raise ValueError(f"SparseLinear: blocksize is only for fmt='bsr' or 'prunekit-rows', got "
                             f"blocksize={blocksize!r} with fmt={fmt!r}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
            raise ValueError(f"SparseLinear: bias must be a tensor of shape ({out_features},), "
                             f"got {tuple(getattr(bias, 'shape', ()))}")
        if (fmt == "prunekit-nm") != (pattern is not None):
            raise ValueError(f"SparseLinear: pattern=(n, m) is required for fmt='prunekit-nm' and only for it, "
                             f"got pattern={pattern!r} with fmt={fmt!r}")
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        self.pattern = None if pattern is None else _check_pattern(pattern)
        with torch.no_grad(), _quiet():
            w = weight.detach()
            if fmt == "prunekit-nm":
                crow, col, values, offsets = _compress_nm(w, *self.pattern)
                self.register_buffer("offsets", offsets)
            else:
                crow, col, values = _compress(w, fmt, blocksize)
            # Own storage: a view of torch's sparse tensor (its values()) cannot be traced by torch.compile.
            self.register_buffer("crow_indices", _own(crow))
            self.register_buffer("col_indices", _own(col))
            self.register_buffer("values", _own(values))
            self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if fmt in _KERNEL_FORMATS:  # before any forward, which may be traced by torch.compile/export
            ops.register()
        self.nnz = int((w != 0).sum())
        self._cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "csr", blocksize: int | None = None,
                    pattern: tuple[int, int] | None = None) -> "SparseLinear":
        """Build from an ``nn.Linear`` (its weight's exact zeros are dropped); ``linear`` is not changed."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, fmt, blocksize, pattern)

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, fmt: str = "csr", blocksize: int | None = None,
                    pattern: tuple[int, int] | None = None) -> "SparseLinear":
        """Build from a transformers ``Conv1D`` (``y = x @ W + b`` with ``W`` stored ``(in, out)``).

        The result computes the same function; its :attr:`weight` reads back in the
        ``(in, out)`` layout and it has ``nf`` / ``nx`` like the ``Conv1D``.

        Example:
            >>> class Conv1D(nn.Module):  # the layout of transformers.pytorch_utils.Conv1D
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.weight, self.bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.zeros(4))
            >>> sp = SparseLinear.from_conv1d(Conv1D())
            >>> (sp.nx, sp.nf), tuple(sp.weight.shape)
            ((6, 4), (6, 4))
        """
        weight = getattr(conv1d, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"SparseLinear.from_conv1d: expected a module with a 2-D (in, out) weight, got "
                            f"{type(conv1d).__name__}")
        return cls(weight.t(), getattr(conv1d, "bias", None), fmt, blocksize, pattern, transposed=True)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight with its zeros, in the replaced layer's layout (``(out, in)``; ``(in, out)`` when
        :attr:`transposed`), so code that inspects layers keeps working.

        It is rebuilt from the sparse buffers on every read (the module keeps no dense copy) and is
        an inference tensor: torch refuses to make it require grad or to edit it in place outside
        ``torch.inference_mode()``, and edits never reach the module. Reading ``.dtype`` or
        ``.device`` of the module itself is free.
        """
        with torch.inference_mode():
            dense = self.to_dense_weight()
            return dense.t().contiguous() if self.transposed else dense

    @weight.setter
    def weight(self, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__}.weight is read-only (the weight is stored sparse); build a new "
                             "module from a dense layer instead")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored weight values."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored weight values."""
        return self.values.device

    @property
    def nf(self) -> int:
        """Output features under transformers ``Conv1D``'s name."""
        return self.out_features

    @property
    def nx(self) -> int:
        """Input features under transformers ``Conv1D``'s name."""
        return self.in_features

    @property
    def density(self) -> float:
        """Fraction of nonzero weights (stored BSR blocks may also hold zeros)."""
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0

    def to_dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor."""
        return self.matrix().to_dense()

    def matrix(self) -> torch.Tensor:
        """The weight as a torch sparse tensor (CSR, or BSR for ``fmt="bsr"``; built from the buffers; cached)."""
        key = (self.crow_indices.data_ptr(), self.col_indices.data_ptr(), self.values.data_ptr(),
               self.values.dtype, self.values.device, self.values.shape)
        if self._cache is None or self._cache[0] != key:
            shape = (self.out_features, self.in_features)
            # Built outside inference mode so the cached tensor is usable in any later mode.
            with torch.inference_mode(False), torch.no_grad(), _quiet():
                if self.fmt == "prunekit-rows":  # (r x 1) blocks; torch multiplies them as plain CSR
                    r = self.blocksize
                    mat = torch.sparse_bsr_tensor(self.crow_indices, self.col_indices,
                                                  self.values.reshape(-1, r, 1), shape, check_invariants=False)
                    mat = mat.to_dense().to_sparse_csr()
                    mat = torch.sparse_csr_tensor(mat.crow_indices().to(self.crow_indices.dtype),
                                                  mat.col_indices().to(self.col_indices.dtype), mat.values(), shape,
                                                  check_invariants=False)
                else:
                    ctor = torch.sparse_bsr_tensor if self.fmt == "bsr" else torch.sparse_csr_tensor
                    mat = ctor(self.crow_indices, self.col_indices, self.values, shape, check_invariants=False)
            self._cache = (key, mat)
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseLinear: input must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input must have shape (*, {self.in_features}), got {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("SparseLinear is inference-only: call it under torch.inference_mode() or "
                               "torch.no_grad(), or on an input that does not require grad")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.fmt in _KERNEL_FORMATS and self._kernel_ok(x2):
            y = self._kernel(x2)
            if y is not None:
                # Row-major in, row-major out; a transposed input (a previous kernel's output) gives the
                # kernel's own Y^T back as a view, so chains of sparse layers never transpose (kernels.batch_major).
                return y.reshape(*lead, self.out_features)
        b = self.bias
        w = self.matrix()
        if x2.shape[0] == 1 and self.fmt != "bsr":
            v = x2[0]
            y = (torch.mv(w, v) if b is None else torch.addmv(b, w, v)).unsqueeze(0)
        else:
            xt = x2.t()
            y = (torch.mm(w, xt) if b is None else torch.addmm(b.unsqueeze(1), w, xt)).t()
        return y.reshape(*lead, self.out_features)

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor | None:
        """``x2 @ W.T + b`` by prunekit's kernel for this format, or ``None`` to take the torch path.

        Eager calls on plain tensors run the kernel directly (the dispatcher would add 5-10 µs per call);
        under ``torch.compile``/``torch.export`` (or any mode or subclass) the operator is called instead, so
        the graph holds ``torch.ops.prunekit.*``, whose fake implementation traces and whose CPU
        implementation runs the kernel, or a pure-torch product where the kernel is unavailable.
        """
        b = self.bias
        if ops.eager(x2):
            if not kernels.available()[0]:
                return None
            if self.fmt == "prunekit-nm":
                n, m = self.pattern
                return kernels.nm_linear_unchecked(self.offsets, self.values.view(self.out_features, -1), n, m, b, x2)
            if self.fmt == "prunekit-rows":
                return kernels.rows_linear_unchecked(self.crow_indices, self.col_indices, self.values, self.blocksize,
                                                     b, x2)
            return kernels.linear_unchecked(self.crow_indices, self.col_indices, self.values, b, x2)
        if self.fmt == "prunekit-nm":
            n, m = self.pattern
            return torch.ops.prunekit.spmm_nm.default(self.offsets, self.values.view(self.out_features, -1), n, m,
                                                      b, x2)
        if self.fmt == "prunekit-rows":
            return torch.ops.prunekit.spmm_rows.default(self.crow_indices, self.col_indices, self.values,
                                                        self.blocksize, b, x2)
        return torch.ops.prunekit.spmm_csr.default(self.crow_indices, self.col_indices, self.values, b, x2)

    def _kernel_ok(self, x2: torch.Tensor) -> bool:
        f32, v, b = torch.float32, self.values, self.bias
        return (x2.dtype == f32 and v.dtype == f32 and x2.device.type == "cpu"
                and v.device.type == "cpu" and self.crow_indices.dtype == torch.int32
                and self.col_indices.dtype == torch.int32 and (b is None or b.dtype == f32 and b.device.type == "cpu")
                and v.is_contiguous())

    def __getstate__(self) -> dict:
        # The cached sparse tensor cannot be deep-copied or pickled; it is rebuilt on demand.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.fmt in _KERNEL_FORMATS:  # a copy or an unpickled module can be compiled before any other use
            ops.register()

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.blocksize is not None else ""
        block += f", pattern={self.pattern[0]}:{self.pattern[1]}" if self.pattern is not None else ""
        layout = ", transposed=True" if self.transposed else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.fmt}{block}, density={_pct(self.density)}{layout}")


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous in storage of its own (not a view of another tensor, such as a sparse one's values)."""
    return t.clone(memory_format=torch.contiguous_format) if t._base is not None else t.contiguous()


def _check_pattern(pattern: Any) -> tuple[int, int]:
    if (isinstance(pattern, (str, bytes)) or not isinstance(pattern, (tuple, list)) or len(pattern) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)):
        raise TypeError(f"SparseLinear: pattern must be a pair (n, m) of integers, got {pattern!r}")
    return int(pattern[0]), int(pattern[1])


def _compress_nm(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, ...]:
    """CSR of the zero-padded N:M weight (every row ``in // m * n`` entries) and the 1-byte group offsets."""
    if w.dtype != torch.float32:
        raise TypeError(f"SparseLinear: fmt='prunekit-nm' is float32 only, got {w.dtype}")
    if w.numel() >= 2**31 - 1:
        raise ValueError(f"SparseLinear: fmt='prunekit-nm' needs int32 indices; weight {tuple(w.shape)} is too large")
    offsets, values = kernels.nm_pack(w, n, m)
    per_row = values.shape[1]
    cols = (torch.arange(per_row) // n * m).unsqueeze(0) + offsets.long()
    crow = torch.arange(w.shape[0] + 1, dtype=torch.int64) * per_row
    return crow.to(torch.int32), cols.reshape(-1).to(torch.int32), values.reshape(-1), offsets


def _compress(w: torch.Tensor, fmt: str, blocksize: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow_indices, col_indices, values)`` of ``w`` in ``fmt``; int32 indices where they fit."""
    if fmt == "prunekit-rows":
        if w.dtype != torch.float32:
            raise TypeError(f"SparseLinear: fmt='prunekit-rows' is float32 only, got {w.dtype}")
        if max(w.shape) >= 2**31 - 1 or w.numel() >= 2**31 - 1:
            raise ValueError(f"SparseLinear: fmt='prunekit-rows' needs int32 indices; weight {tuple(w.shape)} "
                             "is too large")
        return kernels.row_blocks(w, blocksize)
    matrix = w.to_sparse_bsr((blocksize, blocksize)) if fmt == "bsr" else w.to_sparse_csr()
    crow, col = matrix.crow_indices(), matrix.col_indices()
    if max(crow.numel(), int(crow[-1]) if crow.numel() else 0, w.shape[1]) < 2**31 - 1:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    elif fmt == "prunekit":
        raise ValueError(f"SparseLinear: fmt='prunekit' needs int32 indices; weight {tuple(w.shape)} is too large")
    return crow, col, matrix.values()


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's 'sparse CSR/BSR support is in beta' warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Sparse (CSR|BSR|CSC|BSC) tensor support is in beta")
        yield


def _pct(x: float) -> str:
    if x == 0 or x >= 0.001 or math.isnan(x):
        return f"{x:.1%}"
    return f"{x:.2e}"
