"""prunekit's own CPU kernels: sparse weight (CSR or row blocks) times dense activations, fp32.

Computes ``Y^T = W @ X^T + b[:, None]`` with ``W`` (out x in) in CSR with int32
indices and ``X^T`` (in x B) stored so that the ``B`` batch values of each input
feature are contiguous. For each output row ``i`` the kernel accumulates
``sum_k w_ik * X^T[j_k, :]`` into accumulators for up to 64 batch columns held
in registers (four AVX-512 vectors, four sets for nonzeros k mod 4), so every
loaded weight is reused across them (larger batches are done in chunks of
:data:`BATCH_CHUNK`). Batch 1 is a sparse matrix-vector product with 16-lane
AVX-512 gathers.

N:M (:func:`nm_pack`, for ``NM(n, m)`` along the inputs): every row has the same
number of entries, each a value and a 1-byte offset inside its group of ``m``; at
batch 1, when ``m`` divides 32, the entries of a 32-input window are picked from
two loaded vectors of the input by one in-register permute instead of a gather.

Row blocks (:func:`row_blocks`, for ``(r, c)`` block sparsity with ``r > 1``):
groups of ``r`` consecutive output rows share one column list, and the kernel
keeps the accumulators of up to 8 rows at once, so every loaded activation
vector serves all of them (batch > 1); at batch 1 one vector multiply-add
serves up to 16 rows. The paths above are the AVX-512 build. With AVX2 + FMA (no AVX-512) the
kernels use 8-lane paths: 64-column batch chunks with masked tails (the chunk is fixed at 64 there,
so the bits do not depend on :data:`BATCH_CHUNK`), at batch 1 eight weights times eight scalar-loaded
activations per FMA (gathers are slower on such CPUs), row blocks of 4 rows x 3 vectors, and the N:M
window permute for 1:2, 2:4 and 4:8. Otherwise plain C. :func:`available` names the build
(avx512 / avx2 / generic). Output rows
are split across OpenMP threads (static schedule) and each row is computed by
exactly one thread in a fixed order, so results do not depend on the thread
count. Accumulation is fp32 (the compiler may contract ``a*b+c`` to FMA; the
order of the sum is fixed: nonzeros of a row in column order, bias added last).

The C source (``prunekit/runtime/csrc/spmm.c``) is compiled at first use with the system C compiler
(``$CC`` or ``gcc``/``cc``; ``-O3 -march=native -fopenmp``) into a cache
directory (``$PRUNEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/prunekit``, else
``~/.cache/prunekit``) keyed by a hash of the source, flags, compiler and CPU;
it is written to a temporary file and renamed into place, so concurrent first
uses are safe. Set ``PRUNEKIT_KERNEL=0`` to disable it. :func:`available`
reports whether it built, loaded and passed a self-test, and why not.

The functions here call the library through ``ctypes``, invisible to ``torch.compile`` and
``torch.export``; :mod:`prunekit.runtime.ops` wraps the fp32 kernels as torch operators
(``torch.ops.prunekit.*``, with a pure-torch fallback where the library is unavailable).

The OpenMP runtime is ``libgomp.so.1``; torch's CPU wheels ship the same soname
and load it first, so the kernel shares torch's thread pool rather than
starting a second one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "batch_major", "library", "spmm_t", "spmm", "spmm_rows", "row_blocks", "spmm_nm", "nm_pack"]

# The C sources are real files of the package (csrc/*.c), compiled together at first use into one
# library (see _build): spmm.c holds the fp32 kernels, the other files add their own functions to it.
# Headers (csrc/*.h) are part of the cache key and written next to the sources, but not compiled alone.
_SOURCES = {path.name: path.read_text(encoding="utf-8")
            for pattern in ("*.c", "*.h") for path in sorted((Path(__file__).parent / "csrc").glob(pattern))}

_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-std=c11",
          "-fno-fast-math"]
_ABI = 10
_lock = threading.Lock()
_state: tuple[bool, str, object] | None = None
# Below this many multiply-adds a call runs on one thread (thread start-up would dominate).
PARALLEL_MIN_WORK = 16384
# Bytes of X^T (input-feature tile x up to 32 batch columns) per tile; 0 = no tiling. Tiling keeps a
# tile of X^T in L1 but re-reads/writes the partial sums per tile; on the 2-core AVX-512 machine of
# bench/runtime.py it was slower for 768x3072 layers at batch 64 (8/16/24 KiB tiles: 0.43-0.98 ms vs
# 0.23 ms untiled at 90%), so it is off by default.
TILE_BYTES = int(os.environ.get("PRUNEKIT_KERNEL_TILE_BYTES", "0"))
# Batch columns per pass over the weights (32, 48 or 64). 64 (four vectors per nonzero, one index and one
# weight load per 64 multiply-adds) measured ~10% faster than 32 on 768x3072 and 3072x768 layers at 90%,
# batch 64, on the 2-core AVX-512 machine of bench/runtime.py.
BATCH_CHUNK = int(os.environ.get("PRUNEKIT_KERNEL_BATCH_CHUNK", "64"))


def _cache_dir() -> Path:
    if os.environ.get("PRUNEKIT_CACHE_DIR"):
        return Path(os.environ["PRUNEKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prunekit"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, gcc or cc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"C compiler {cc} does not run: {exc}") from exc
    parts = [f"{name}\0{text}" for name, text in _SOURCES.items()]
    key = hashlib.sha256("\0".join([*parts, *_FLAGS, cc, version, _cpu_id(), platform.machine()]).encode()
                         ).hexdigest()[:16]
    cache = _cache_dir()
    lib = cache / f"prunekit_spmm_{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        sources = []
        for name, text in _SOURCES.items():
            (Path(tmp) / name).write_text(text)
            if name.endswith(".c"):
                sources.append(Path(tmp) / name)
        out = Path(tmp) / "spmm.so"
        try:
            proc = subprocess.run([cc, *_FLAGS, *map(str, sources), "-o", str(out)], capture_output=True,
                                  text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"compiling the kernel failed: {exc}") from exc
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f"compiling the kernel failed: {msg[0] if msg else proc.returncode}")
        os.replace(out, lib)  # atomic: a concurrent builder's identical file is simply replaced
    return lib


def _load() -> object:
    lib = ctypes.CDLL(str(_build()))
    if lib.prunekit_abi_version() != _ABI:
        raise RuntimeError("stale kernel library in the cache")
    fn = lib.prunekit_spmm_t
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_int]
    fn.restype = None
    fn._lib = lib  # keep the library alive with the function
    rows = lib.prunekit_rows_t
    rows.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int]
    rows.restype = None
    fn._rows = rows
    nm = lib.prunekit_nm_t
    nm.argtypes = [i64, i64, i64, i64, ctypes.c_int, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, ctypes.c_int]
    nm.restype = None
    fn._nm = nm
    # Row-major entry points (csrc/layout.c): same arguments, X (B x in) and Y (B x out) row-major.
    for name, like in (("spmm", fn), ("rows", rows), ("nm", nm)):
        rm = getattr(lib, f"prunekit_{name}_rm")
        rm.argtypes, rm.restype = like.argtypes, ctypes.c_int
        setattr(fn, f"_{name}_rm", rm)
    return fn


def _self_test(fn: object) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g) * (torch.rand(37, 29, generator=g) > 0.7)
    w[3] = 0
    b = torch.randn(37, generator=g)
    for batch in (1, 5, 64, 75):
        x = torch.randn(batch, 29, generator=g)
        y = _call(fn, *_csr32(w), b, x.t().contiguous(), 2).t()
        ref = (x.double() @ w.double().t() + b.double()).float()
        if not torch.allclose(y, ref, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"self-test failed at batch {batch}")
        for r in (1, 4, 12, 36):
            y = _call_rows(fn._rows, *row_blocks(w[:36], r), r, b[:36], x.t().contiguous(), 2).t()
            if not torch.allclose(y, ref[:, :36], rtol=1e-5, atol=1e-5):
                raise RuntimeError(f"row-block self-test failed at batch {batch}, {r} rows per block")
        wnm = w[:, :28] * _nm_mask(w[:, :28], 2, 4)
        y = _call_nm(fn._nm, *nm_pack(wnm, 2, 4), 2, 4, b, x[:, :28].t().contiguous(), 2).t()
        if not torch.allclose(y, (x[:, :28].double() @ wnm.double().t() + b.double()).float(), rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"N:M self-test failed at batch {batch}")


def _csr32(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = w.to_sparse_csr()
    # values() is a view into the sparse tensor: cloned, so the arrays can be traced (torch.compile/export).
    return (m.crow_indices().to(torch.int32).contiguous(), m.col_indices().to(torch.int32).contiguous(),
            m.values().clone())


def row_blocks(w: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` (out x in) as row blocks of ``rows`` consecutive output rows sharing one column list.

    Returns ``(gptr, col, values)``: block ``g`` keeps the columns ``col[gptr[g]:gptr[g+1]]`` where
    any of its rows is nonzero, and ``values`` is ``(len(col), rows)``: the block's column of
    ``rows`` weights for each kept column (zeros included where only some rows are nonzero).
    ``rows`` must divide ``out``.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
        >>> gptr, col, val = row_blocks(w, 2)
        >>> gptr.tolist(), col.tolist(), val.tolist()
        ([0, 2], [0, 2], [[1.0, 3.0], [2.0, 0.0]])
    """
    out_f, in_f = w.shape
    if rows < 1 or out_f % rows:
        raise ValueError(f"row_blocks: rows={rows} must be a positive divisor of the {out_f} output rows")
    grouped = w.detach().reshape(out_f // rows, rows, in_f).transpose(1, 2)  # (G, in, rows)
    alive = (grouped != 0).any(dim=2)
    counts = alive.sum(dim=1)
    gptr = torch.zeros(out_f // rows + 1, dtype=torch.int32)
    gptr[1:] = counts.cumsum(0).to(torch.int32)
    col = torch.nonzero(alive)[:, 1].to(torch.int32).contiguous()
    return gptr, col, grouped[alive].to(torch.float32).contiguous()


def _call_rows(fn, gptr, col, values, rows, bias, xt, nthreads) -> torch.Tensor:
    groups = gptr.numel() - 1
    n_in, batch = xt.shape
    yt = torch.empty(groups * rows, batch, dtype=torch.float32, device="cpu")
    if groups == 0 or batch == 0:
        return yt
    threads = nthreads if values.numel() * batch >= PARALLEL_MIN_WORK else 1
    fn(groups, rows, n_in, batch, gptr.data_ptr(), col.data_ptr(), values.data_ptr(), xt.data_ptr(),
       xt.stride(0) if n_in else batch, 0 if bias is None else bias.data_ptr(), yt.data_ptr(), batch, threads)
    return yt


def rows_linear_unchecked(gptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int,
                          bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` as :func:`row_blocks`, without argument checks (for
    :class:`~prunekit.runtime.SparseLinear`, which checked dtypes, devices and availability)."""
    if not batch_major(x):
        x, groups = _row_major(x), gptr.numel() - 1
        y, threads = _rm_out(x, groups * rows, values.numel())
        if y.numel():
            _rm_check(_state[2]._rows_rm(groups, rows, x.shape[1], x.shape[0], gptr.data_ptr(), col.data_ptr(),
                                         values.data_ptr(), x.data_ptr(), x.stride(0), _ptr(bias), y.data_ptr(),
                                         y.stride(0), threads))
        return y
    xt = x.t()
    if xt.stride(1) != 1 and xt.shape[1] > 1 or xt.shape[1] == 1 and xt.stride(0) != 1:
        xt = xt.contiguous()
    return _call_rows(_state[2]._rows, gptr, col, values, rows, bias, xt, torch.get_num_threads()).t()


def spmm_rows(gptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int, bias: torch.Tensor | None,
              x: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` given as row blocks (:func:`row_blocks`); ``x`` is ``(B, in)`` float32.

    Each loaded activation serves ``rows`` output rows, which is what makes ``(r, c)`` block
    sparsity with ``r > 1`` faster than unstructured sparsity at the same density. Results are
    identical for every thread count. Raises ``RuntimeError`` if the kernel is not available.

    Example:
        >>> w = torch.randn(8, 6) * (torch.rand(8, 1) > 0.5)
        >>> y = spmm_rows(*row_blocks(w, 4), 4, None, torch.randn(3, 6))  # doctest: +SKIP
    """
    ok, why, fn = _get()
    if not ok:
        raise RuntimeError(f"prunekit kernel unavailable: {why}")
    if values.dim() != 2 or values.shape[1] != rows or values.shape[0] != col.numel():
        raise ValueError(f"spmm_rows: values must have shape ({col.numel()}, {rows}), got {tuple(values.shape)}")
    for name, t, dt in (("gptr", gptr, torch.int32), ("col", col, torch.int32), ("values", values, torch.float32),
                        ("x", x, torch.float32)) + ((("bias", bias, torch.float32),) if bias is not None else ()):
        if t.dtype != dt or t.device.type != "cpu" or (name != "x" and not t.is_contiguous()):
            raise TypeError(f"spmm_rows: {name} must be a contiguous {dt} CPU tensor, got {t.dtype} on {t.device}")
    if x.dim() != 2:
        raise ValueError(f"spmm_rows: x must be 2-D, got shape {tuple(x.shape)}")
    if bias is not None and bias.numel() != (gptr.numel() - 1) * rows:
        raise ValueError("spmm_rows: bias must have one value per output row")
    xt = x.t().contiguous()
    return _call_rows(fn._rows, gptr, col, values, rows, bias, xt, num_threads or torch.get_num_threads()).t()


def _nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest |w| of every ``m`` consecutive inputs (for the self-test)."""
    groups = w.abs().reshape(w.shape[0], -1, m)
    idx = groups.topk(n, dim=2).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(w.shape)


def nm_pack(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (out x in) with at most ``n`` nonzeros in every ``m`` consecutive inputs, packed for the N:M kernel.

    Returns ``(offsets, values)``, both ``(out, in // m * n)``: for every group
    of ``m`` inputs its ``n`` entries in column order, with their offsets
    (uint8) inside the group; a group with fewer than ``n`` nonzeros is padded
    with zeros at unused offsets. ``n`` must be a power of two dividing 16,
    ``m`` at most 256, and ``m`` must divide ``in``.

    Raises:
        ValueError: the pattern or the sizes do not allow it (the message says which).

    Example:
        >>> off, val = nm_pack(torch.tensor([[0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 0.0, 0.0]]), 2, 4)
        >>> off.tolist(), val.tolist()
        ([[1, 3, 0, 1]], [[5.0, 7.0, 1.0, 0.0]])
    """
    out_f, in_f = w.shape
    if n < 1 or n > 16 or 16 % n or not 1 <= n < m <= 256 or in_f % m:
        raise ValueError(f"nm_pack: {n}:{m} needs n a power of two dividing 16, n < m <= 256 and m dividing "
                         f"in_features={in_f}")
    groups = w.detach().reshape(out_f, in_f // m, m)
    nonzero = groups != 0
    if nonzero.numel() and int(nonzero.sum(dim=2).max()) > n:
        raise ValueError(f"nm_pack: some group of {m} inputs has more than {n} nonzeros")
    # Stable sort puts nonzeros first in column order, then the unused offsets (padding, value 0).
    order = torch.sort((~nonzero).to(torch.uint8), dim=2, stable=True).indices[..., :n]
    order = order.sort(dim=2).values  # column order within the group: the CSR summation order
    values = torch.gather(groups, 2, order).to(torch.float32)
    return order.to(torch.uint8).reshape(out_f, -1).contiguous(), values.reshape(out_f, -1).contiguous()


def _call_nm(fn, offsets, values, n, m, bias, xt, nthreads) -> torch.Tensor:
    out_f, per_row = values.shape
    n_in, batch = xt.shape
    yt = torch.empty(out_f, batch, dtype=torch.float32, device="cpu")
    if out_f == 0 or batch == 0:
        return yt
    threads = nthreads if values.numel() * batch >= PARALLEL_MIN_WORK else 1
    fn(out_f, n_in, batch, per_row, n.bit_length() - 1, m, offsets.data_ptr(), values.data_ptr(), xt.data_ptr(),
       xt.stride(0) if n_in else batch, 0 if bias is None else bias.data_ptr(), yt.data_ptr(), batch, BATCH_CHUNK,
       threads)
    return yt


def nm_linear_unchecked(offsets: torch.Tensor, values: torch.Tensor, n: int, m: int, bias: torch.Tensor | None,
                        x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` as :func:`nm_pack`, without argument checks (for
    :class:`~prunekit.runtime.SparseLinear`, which checked dtypes, devices and availability)."""
    if not batch_major(x):
        x = _row_major(x)
        y, threads = _rm_out(x, values.shape[0], values.numel())
        if y.numel():
            _rm_check(_state[2]._nm_rm(values.shape[0], x.shape[1], x.shape[0], values.shape[1], n.bit_length() - 1,
                                       m, offsets.data_ptr(), values.data_ptr(), x.data_ptr(), x.stride(0),
                                       _ptr(bias), y.data_ptr(), y.stride(0), BATCH_CHUNK, threads))
        return y
    xt = x.t()
    if xt.stride(1) != 1 and xt.shape[1] > 1 or xt.shape[1] == 1 and xt.stride(0) != 1:
        xt = xt.contiguous()
    return _call_nm(_state[2]._nm, offsets, values, n, m, bias, xt, torch.get_num_threads()).t()


def spmm_nm(offsets: torch.Tensor, values: torch.Tensor, n: int, m: int, bias: torch.Tensor | None,
            x: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for an N:M weight packed by :func:`nm_pack`; ``x`` is ``(B, in)`` float32.

    Every row has the same number of entries and each costs 5 bytes (value and
    a 1-byte offset) instead of CSR's 8. Results are identical for every thread
    count. Raises ``RuntimeError`` if the kernel is not available.

    Example:
        >>> w = torch.tensor([[0.0, 5.0, 0.0, 7.0]])
        >>> spmm_nm(*nm_pack(w, 2, 4), 2, 4, None, torch.ones(1, 4))  # doctest: +SKIP
        tensor([[12.]])
    """
    ok, why, fn = _get()
    if not ok:
        raise RuntimeError(f"prunekit kernel unavailable: {why}")
    for name, t, dt in (("offsets", offsets, torch.uint8), ("values", values, torch.float32), ("x", x, torch.float32)
                        ) + ((("bias", bias, torch.float32),) if bias is not None else ()):
        if t.dtype != dt or t.device.type != "cpu" or (name != "x" and not t.is_contiguous()):
            raise TypeError(f"spmm_nm: {name} must be a contiguous {dt} CPU tensor, got {t.dtype} on {t.device}")
    if x.dim() != 2 or values.dim() != 2 or offsets.shape != values.shape:
        raise ValueError("spmm_nm: x must be 2-D and offsets/values of one (out, in // m * n) shape")
    if n < 1 or n > 16 or 16 % n or not n < m <= 256 or x.shape[1] % m or values.shape[1] != x.shape[1] // m * n:
        raise ValueError(f"spmm_nm: {n}:{m} does not fit values {tuple(values.shape)} and inputs {tuple(x.shape)}")
    if bias is not None and bias.numel() != values.shape[0]:
        raise ValueError("spmm_nm: bias must have one value per output row")
    xt = x.t().contiguous()
    return _call_nm(fn._nm, offsets, values, n, m, bias, xt, num_threads or torch.get_num_threads()).t()


def _get() -> tuple[bool, str, object]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                if os.environ.get("PRUNEKIT_KERNEL", "1") == "0":
                    _state = (False, "disabled by PRUNEKIT_KERNEL=0", None)
                else:
                    try:
                        fn = _load()
                        _self_test(fn)
                        fn._lib.prunekit_simd.restype = ctypes.c_char_p
                        simd = fn._lib.prunekit_simd().decode()
                        _state = (True, f"{simd} kernel built with {_compiler()} ({' '.join(_FLAGS[:2])})", fn)
                    except Exception as exc:  # any failure means: not available, with the reason
                        _state = (False, f"{type(exc).__name__}: {str(exc)[:200]}", None)
    return _state


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (every ``csrc/*.c`` compiled together), or ``None`` where it is not available.

    Other runtime modules bind their own functions from it with ``ctypes``.

    Example:
        >>> lib = library()  # doctest: +SKIP
    """
    ok, _, fn = _get()
    return fn._lib if ok else None


def available() -> tuple[bool, str]:
    """``(True, how it was built)`` if the kernel is usable here, else ``(False, why not)``.

    The first call compiles (or loads from the cache) and self-tests the kernel; the result is cached.
    """
    ok, why, _ = _get()
    return ok, why


def _call(fn, crow, col, values, bias, xt, nthreads) -> torch.Tensor:
    m = crow.numel() - 1
    n_in, batch = xt.shape
    yt = torch.empty(m, batch, dtype=torch.float32, device="cpu")
    if m == 0 or batch == 0:
        return yt
    nnz = col.numel()
    threads = nthreads if nnz * batch >= PARALLEL_MIN_WORK else 1
    tile = _tile(batch)
    fn(m, n_in, batch, crow.data_ptr(), col.data_ptr(), values.data_ptr(), xt.data_ptr(),
       xt.stride(0) if n_in else batch, 0 if bias is None else bias.data_ptr(), yt.data_ptr(), batch, tile,
       BATCH_CHUNK, threads)
    return yt


def spmm_t(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
           xt: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """``W @ xt + bias[:, None]`` as a new contiguous ``(out, B)`` float32 tensor.

    ``W`` is CSR (``crow`` int32 of length ``out + 1``, ``col`` int32, ``values``
    float32, all contiguous CPU tensors); ``xt`` is ``(in, B)`` float32 on the CPU
    (copied to a unit column stride if needed). ``num_threads`` defaults to
    ``torch.get_num_threads()``; results are identical for every thread count.
    Raises ``RuntimeError`` if the kernel is not available.
    """
    ok, why, fn = _get()
    if not ok:
        raise RuntimeError(f"prunekit kernel unavailable: {why}")
    for name, t, dt in (("crow", crow, torch.int32), ("col", col, torch.int32), ("values", values, torch.float32),
                        ("xt", xt, torch.float32)) + ((("bias", bias, torch.float32),) if bias is not None else ()):
        if t.dtype != dt or t.device.type != "cpu":
            raise TypeError(f"spmm_t: {name} must be a {dt} CPU tensor, got {t.dtype} on {t.device}")
    if xt.dim() != 2:
        raise ValueError(f"spmm_t: xt must be 2-D, got shape {tuple(xt.shape)}")
    if not (crow.is_contiguous() and col.is_contiguous() and values.is_contiguous()):
        raise ValueError("spmm_t: crow, col and values must be contiguous")
    if bias is not None and (not bias.is_contiguous() or bias.numel() != crow.numel() - 1):
        raise ValueError("spmm_t: bias must be contiguous with one value per output row")
    if xt.shape[1] > 1 and xt.stride(1) != 1 or xt.shape[1] == 1 and xt.shape[0] > 1 and xt.stride(0) < 1:
        xt = xt.contiguous()
    return _call(fn, crow, col, values, bias, xt, num_threads or torch.get_num_threads())


def linear_unchecked(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                     x: torch.Tensor) -> torch.Tensor:
    """:func:`spmm` without argument checks, for :class:`~prunekit.runtime.SparseLinear` (which checked
    dtypes, devices and availability); ``x`` is ``(B, in)`` float32."""
    if not batch_major(x):
        x = _row_major(x)
        y, threads = _rm_out(x, crow.numel() - 1, col.numel())
        if y.numel():
            _rm_check(_state[2]._spmm_rm(y.shape[1], x.shape[1], x.shape[0], crow.data_ptr(), col.data_ptr(),
                                         values.data_ptr(), x.data_ptr(), x.stride(0), _ptr(bias), y.data_ptr(),
                                         y.stride(0), _tile(x.shape[0]), BATCH_CHUNK, threads))
        return y
    xt = x.t()
    if xt.stride(1) != 1 and xt.shape[1] > 1:
        xt = xt.contiguous()
    return _call(_state[2], crow, col, values, bias, xt, torch.get_num_threads()).t()


def batch_major(x: torch.Tensor) -> bool:
    """Whether the kernels read ``x`` (B, in) as ``X^T`` as it lies: batch 1, or a transposed view (a kernel's output).

    Such inputs give the kernels' own layout back (a ``(B, out)`` view of a contiguous ``Y^T``), so a chain
    of sparse layers never transposes. Any other input is taken row-major (``csrc/layout.c``: blocks
    transposed in cache) and gives a contiguous ``(B, out)`` result, which is what the rest of a model (layer
    norms, attention, residual adds) runs fastest on. Both layouts hold the same bits.

    Example:
        >>> x = torch.randn(4, 3)
        >>> batch_major(x), batch_major(x.t().contiguous().t()), batch_major(x[:1])
        (False, True, True)
    """
    return x.shape[0] <= 1 or x.stride(0) == 1 and x.shape[1] > 1


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _rm_out(x: torch.Tensor, out: int, nnz: int) -> tuple[torch.Tensor, int]:
    """The row-major result (B, out) and the threads for a product with ``nnz`` kept weights."""
    y = torch.empty(x.shape[0], out, dtype=torch.float32)
    return y, torch.get_num_threads() if nnz * x.shape[0] >= PARALLEL_MIN_WORK else 1


def _rm_check(status: int) -> None:
    if status:
        raise MemoryError("prunekit kernel: could not allocate the scratch blocks of a row-major product")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _tile(batch: int) -> int:
    return max(16, TILE_BYTES // (4 * min(batch, 32))) if TILE_BYTES > 0 else 0


def spmm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
         x: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``(B, in)``; returns a ``(B, out)`` view of the kernel's ``Y^T``."""
    return spmm_t(crow, col, values, bias, x.t(), num_threads).t()
