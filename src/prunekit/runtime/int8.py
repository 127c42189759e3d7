"""Int8 linear layers: int8 weights (dense or sparse) times int8 activations, fp32 output.

Weights are quantized symmetrically per output channel (:func:`quantize_weight`:
``scale[o] = max|w[o]| / 127``, zeros stay exactly zero, so the sparse formats
keep their structure). Activations are quantized symmetrically to int8 in
``[-127, 127]``: dynamically per call (one scale for the whole input,
``granularity="tensor"``, or one per row of ``x``, ``"token"``: ``s = max|x| / 127``,
a zero scale becoming 1) or with a static scale from :func:`calibrate_scale`
(values beyond ``127 * s`` saturate). ``q = clamp(round_half_even(x / s), -127, 127)``.

Formats (:data:`INT8_FORMATS`):

- ``"csr"``, ``"nm"``, ``"rows"``: prunekit's own kernels (``csrc/spmm_int8.c``,
  compiled into the one kernel library of :mod:`prunekit.runtime.kernels`): int8
  weights in CSR (int32 column indices; 5 bytes per kept weight), N:M (1-byte
  offsets in each group of ``m``, as :func:`~prunekit.runtime.kernels.nm_pack`;
  2 bytes) or row blocks (``blocksize`` consecutive output rows sharing one
  column list, as :func:`~prunekit.runtime.kernels.row_blocks`; ``r + 4`` bytes
  per kept column of a block). The sum ``acc = sum_k q_w * q_x`` is exact in
  int32, and ``y = acc * (w_scale[o] * x_scale[b]) + bias[o]`` is evaluated in
  fp32 with every operation rounded separately: the output equals the fp32
  evaluation of that formula bit for bit, for any thread count. On AVX2 CPUs
  the kernel pairs two kept weights of a row (or two kept columns of a row block)
  and multiplies the interleaved int16 activations with ``_mm256_madd_epi16``
  (exact, 8-bit activations; one ``vpdpwssd`` with AVX-VNNI). With AVX-512 VNNI,
  batch chunks of more than 32 columns hold the activations as ``q + 128`` in
  uint8 and multiply four kept weights at once with ``vpdpbusd`` (the offset
  ``128 * sum w`` is subtracted exactly), halving the activation bytes per kept
  weight; batch 1 uses 16-lane gathers. :func:`available` names the build
  (``avx512-vnni``, ``avx512``, ``avx2-vnni``, ``avx2``, ``generic``); elsewhere
  plain C computes the same integers. Without the
  compiled library the same result (bit for bit) comes from torch: the quantized
  product in float64, which is exact for these integers.
- ``"dense"``: torch's own dense int8 GEMM (fbgemm), not prunekit's. Dynamic
  activations run ``torch.ops.quantized.linear_dynamic`` (fbgemm quantizes the
  activations itself, asymmetric uint8 per tensor from their min and max, so only
  ``granularity="tensor"``); static ones run
  ``torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32`` with the
  given scale (activations in ``[-127 s, 127 s]``). On CPUs without VNNI fbgemm
  multiplies u8 x s8 pairs with saturating ``vpmaddubsw``, so activations use
  7 bits there (``reduce_range``: dynamic by fbgemm's own rule, static by a scale
  of ``127 s / 63`` around zero point 64, after clamping to ``+-127 s``).

Cost (2-core AMD EPYC with AVX-512 VNNI, one thread, BERT-FFN 768x3072 / 3072x768 layers, batch 64,
``csr``, lower quartile of 40-50 runs): the u8 VNNI path runs at ~90-110 GMAC/s of kept weights (0.16 ms
per layer at 90%, 0.7-0.8 ms at 50%), about twice the 512-bit ``vpdpwssd`` pairs (0.35 / 1.6 ms) and
2.3-2.8x the AVX2 path on the same CPU; the bound is the activation bytes fetched from L2 for the
scattered kept columns. Quantizing the input costs 0.01-0.05 ms and is split across threads. At batch 1
the gathers cost ~1 cycle per kept weight (0.08 ms at 90%).

Modules are for inference (no autograd) on float32 CPU inputs.
"""

from __future__ import annotations

import ctypes
import math
import threading
import warnings
from functools import lru_cache
from typing import Any, Iterable

import torch
from torch import nn

from .._validate import check_choice, check_int
from . import kernels, ops
from .layers import layer_plan, weight_matrix

__all__ = ["INT8_FORMATS", "Int8Linear", "available", "calibrate_scale", "quantize_weight"]

INT8_FORMATS = ("dense", "csr", "nm", "rows")
ACTIVATIONS = ("dynamic", "static")
GRANULARITIES = ("tensor", "token")
# |acc| <= 127 * 127 * in_features must fit int32 for the sums to be exact.
MAX_IN_FEATURES = (2**31 - 1) // (127 * 127)
# Below this many multiply-adds a call runs on one thread (thread start-up would dominate).
PARALLEL_MIN_WORK = kernels.PARALLEL_MIN_WORK
_MODES = {("dynamic", "tensor"): 0, ("dynamic", "token"): 1, ("static", "tensor"): 2}

_lock = threading.Lock()
_state: tuple[bool, str, Any] | None = None


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization of a ``(out, in)`` weight.

    ``scale[o] = max|w[o]| / 127`` (a zero row gets scale 1), ``q = clamp(round(w / scale), -127, 127)``;
    exact zeros stay exactly zero and ``|q * scale - w| <= scale / 2``.

    Returns:
        ``(q, scale)``: int8 ``(out, in)`` and float32 ``(out,)``.

    Example:
        >>> q, s = quantize_weight(torch.tensor([[0.0, 1.0, -2.0], [0.0, 0.0, 0.0]]))
        >>> q.tolist(), s.tolist()
        ([[0, 64, -127], [0, 0, 0]], [0.015748031437397003, 1.0])
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"quantize_weight: w must be a 2-D floating-point tensor, got "
                        f"{getattr(w, 'dtype', type(w).__name__)} of shape {tuple(getattr(w, 'shape', ()))}")
    w = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_weight: the weight holds NaN or inf, which int8 cannot represent")
    scale = w.abs().amax(dim=1) / 127 if w.shape[1] else torch.zeros(w.shape[0])
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def calibrate_scale(inputs: Iterable[torch.Tensor], *, method: str = "max") -> float:
    """A static activation scale (one per tensor) from calibration inputs of a layer.

    ``method="max"``: ``max|x| / 127`` over all inputs (nothing saturates on them);
    ``"percentile"``: the 99.99th percentile of ``|x|`` over 127 (clips rare outliers).
    An all-zero calibration gives 1.0.

    Example:
        >>> round(calibrate_scale([torch.tensor([0.5, -2.54]), torch.tensor([1.0])]), 6)
        0.02
    """
    check_choice("calibrate_scale", "method", method, ("max", "percentile"))
    mags = []
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"calibrate_scale: input {i} must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        x = x.detach().to(torch.float32).reshape(-1)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"calibrate_scale: input {i} holds NaN or inf")
        mags.append(x.abs().amax().reshape(1) if method == "max" else x.abs())
    if not mags:
        raise ValueError("calibrate_scale: inputs is empty; pass at least one calibration tensor")
    allm = torch.cat(mags)
    if method == "max" or allm.numel() == 0:
        amax = float(allm.max()) if allm.numel() else 0.0
    else:
        step = max(1, allm.numel() // (1 << 24))  # torch.quantile takes at most 2**24 values
        amax = float(torch.quantile(allm[::step].double(), 0.9999))
    scale = float(torch.tensor(amax, dtype=torch.float32) / 127)
    return scale if scale > 0 else 1.0


def available() -> tuple[bool, str]:
    """``(True, how the int8 kernels were built)``, or ``(False, why not)`` (the sparse formats then run
    the same computation in torch, and ``"dense"`` needs no kernel).

    Example:
        >>> ok, why = available()
        >>> isinstance(ok, bool) and isinstance(why, str)
        True
    """
    ok, why, _ = _get()
    return ok, why


class _Kernels:
    """The int8 functions bound from a loaded library (argument types set once)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self.lib = lib
        self.xq_size = self._fn("prunekit_i8_xq_size", [i64, i64], i64)
        self.quantize = self._fn("prunekit_i8_quantize", [i64, i64, ptr, i64, i64, c_int, ctypes.c_float, ptr, ptr,
                                                          c_int], c_int)
        # The last two arguments of every product: rm (1 = write Y row-major, else Y^T) and the thread count.
        self.csr = self._fn("prunekit_i8_csr", [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int, c_int],
                            None)
        self.nm = self._fn("prunekit_i8_nm", [i64, i64, i64, i64, c_int, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                              c_int, c_int], None)
        self.rows = self._fn("prunekit_i8_rows", [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int,
                                                  c_int], None)
        self.simd = self._fn("prunekit_i8_simd", [], ctypes.c_char_p)().decode()

    def _fn(self, name: str, argtypes: list, restype: Any) -> Any:
        fn = getattr(self.lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        return fn


def _bind(lib: ctypes.CDLL) -> _Kernels:
    """The int8 kernels of ``lib`` (the package's library, or one built by hand from ``spmm_int8.c``)."""
    return _Kernels(lib)


def _get() -> tuple[bool, str, _Kernels | None]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                lib = kernels.library()
                if lib is None:
                    _state = (False, f"prunekit kernel library unavailable ({kernels.available()[1]})", None)
                else:
                    try:
                        k = _bind(lib)
                        _self_test(k)
                        _state = (True, f"{k.simd} int8 kernels", k)
                    except Exception as exc:  # any failure means: not available, with the reason
                        _state = (False, f"{type(exc).__name__}: {str(exc)[:200]}", None)
    return _state


def _self_test(k: _Kernels) -> None:
    """Every format and activation mode against the torch computation of the same integers, bit for bit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=g) * (torch.rand(24, 32, generator=g) > 0.6)
    w[5] = 0
    b = torch.randn(24, generator=g)
    wnm = w * kernels._nm_mask(w, 2, 4)
    for fmt, weight, extra in (("csr", w, {}), ("nm", wnm, {"pattern": (2, 4)}), ("rows", w, {"blocksize": 4})):
        for acts, gran in _MODES:
            layer = nn.Linear(32, 24)
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(b)
            m = Int8Linear.from_linear(layer, fmt, activations=acts, granularity=gran,
                                       act_scale=0.02 if acts == "static" else None, **extra)
            for batch in (1, 5, 17, 64, 70):
                x = torch.randn(batch, 32, generator=g)
                if not (torch.equal(m._run_kernel(k, x), m._run_torch(x))
                        and torch.equal(m._run_kernel(k, x, row_major=False), m._run_torch(x))):
                    raise RuntimeError(f"self-test failed: {fmt}, {acts} {gran}, batch {batch}")


@lru_cache(maxsize=1)
def _has_vnni() -> bool:
    """Whether fbgemm can use 8-bit activations here (VNNI); without it, 7-bit (reduce_range)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(tok in flags.split() for tok in ("avx512_vnni", "avx_vnni"))


def _pack_sparse(q: torch.Tensor, fmt: str, blocksize: int | None,
                 pattern: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """The kernel's buffers for the int8 weight ``q`` (out, in) in ``fmt``."""
    if fmt == "dense":
        return {"qweight": q.contiguous()}
    if fmt == "nm":
        offsets, values = kernels.nm_pack(q.to(torch.float32), *pattern)
        return {"offsets": offsets, "values": values.to(torch.int8).contiguous()}
    if fmt == "rows":
        gptr, col, values = kernels.row_blocks(q.to(torch.float32), blocksize)
        return {"crow_indices": gptr, "col_indices": col, "values": values.to(torch.int8).contiguous()}
    alive = q != 0
    crow = torch.zeros(q.shape[0] + 1, dtype=torch.int32)
    crow[1:] = alive.sum(dim=1).cumsum(0).to(torch.int32)
    col = torch.nonzero(alive)[:, 1].to(torch.int32).contiguous()
    return {"crow_indices": crow, "col_indices": col, "values": q[alive].contiguous()}


def _quantize_torch(x2: torch.Tensor, mode: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization of the kernels, in torch: ``(q as float32 (B, in), scales (B,))``."""
    if not bool(torch.isfinite(x2).all()):
        raise ValueError("Int8Linear: the input holds NaN or inf, which int8 activations cannot represent")
    amax = x2.abs().amax(dim=1) if x2.shape[1] else x2.new_zeros(x2.shape[0])
    if mode == 0:
        s = (amax.max() / 127).expand(x2.shape[0])
    elif mode == 1:
        s = amax / 127
    else:
        s = torch.full((x2.shape[0],), scale, dtype=torch.float32)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x2 / s[:, None]).clamp_(-127, 127), s


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` int8 (per-output-channel scales) and int8 activations; inference only.

    Args:
        qweight: int8 ``(out, in)`` weight, as :func:`quantize_weight` returns.
        w_scale: float32 ``(out,)`` per-channel scales (``W ~ qweight * w_scale[:, None]``).
        bias: float32 ``(out,)`` or ``None`` (added in fp32).
        fmt: one of :data:`INT8_FORMATS` (see the module docs).
        blocksize: output rows per block, for ``fmt="rows"`` only (must divide ``out``).
        pattern: ``(n, m)`` for ``fmt="nm"`` only (at most ``n`` nonzeros in every ``m`` inputs).
        activations: ``"dynamic"`` (quantized per call) or ``"static"`` (``act_scale``).
        granularity: dynamic only: ``"tensor"`` (one scale per call) or ``"token"`` (one per row of ``x``).
        act_scale: the static activation scale (:func:`calibrate_scale`); only with ``"static"``.
        transposed: the replaced layer stored its weight ``(in, out)`` (transformers ``Conv1D``);
            only :attr:`weight` reads back in that layout.

    Example:
        >>> lin = nn.Linear(64, 32)
        >>> with torch.no_grad():
        ...     _ = lin.weight.mul_(torch.rand(32, 64) > 0.9)
        >>> q = Int8Linear.from_linear(lin, "csr")
        >>> with torch.inference_mode():
        ...     y = q(torch.randn(5, 64))
        >>> tuple(y.shape), y.dtype
        ((5, 32), torch.float32)
    """

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 fmt: str = "csr", *, blocksize: int | None = None, pattern: tuple[int, int] | None = None,
                 activations: str = "dynamic", granularity: str = "tensor", act_scale: float | None = None,
                 transposed: bool = False) -> None:
        super().__init__()
        _check_weight(qweight, w_scale, bias)
        self.out_features, self.in_features = qweight.shape
        self.fmt = check_choice("Int8Linear", "fmt", fmt, INT8_FORMATS)
        self.blocksize, self.pattern = _check_layout(fmt, qweight.shape, blocksize, pattern)
        self.activations, self.granularity, scale = _check_activations(fmt, activations, granularity, act_scale)
        self.transposed = bool(transposed)
        self.nnz = int((qweight != 0).sum())
        try:
            buffers = _pack_sparse(qweight, fmt, self.blocksize, self.pattern)
        except ValueError as exc:
            raise ValueError(f"Int8Linear: {exc}") from None
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.register_buffer("w_scale", w_scale.detach().to(torch.float32).contiguous().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous().clone())
        self.register_buffer("act_scale", None if scale is None else torch.tensor(scale, dtype=torch.float32))
        self._cache: dict[str, tuple[Any, Any]] = {}
        if fmt != "dense":
            register_ops()

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str = "csr", *, blocksize: int | None = None,
                    pattern: tuple[int, int] | None = None, activations: str = "dynamic",
                    granularity: str = "tensor", act_scale: float | None = None) -> "Int8Linear":
        """Quantize an ``nn.Linear`` (or subclass with its forward), or a transformers ``Conv1D``.

        The weight is quantized with :func:`quantize_weight` (its exact zeros stay zero); ``linear``
        is not changed. Other arguments as for the class.

        Example:
            >>> q = Int8Linear.from_linear(nn.Linear(8, 4), "dense")
            >>> q.fmt, q.in_features, q.out_features
            ('dense', 8, 4)
        """
        plan, why = layer_plan(linear)
        if plan is None or plan.kind == "conv2d":
            raise TypeError(f"Int8Linear.from_linear: {type(linear).__name__} cannot be run as an int8 linear layer: "
                            f"{why or 'convolutions are not supported'}")
        q, scale = quantize_weight(weight_matrix(linear))
        return cls(q, scale, getattr(linear, "bias", None), fmt, blocksize=blocksize, pattern=pattern,
                   activations=activations, granularity=granularity, act_scale=act_scale,
                   transposed=plan.kind == "transposed")

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``qweight * w_scale`` (float32, in the replaced layer's layout; a new tensor)."""
        w = self.int8_weight().to(torch.float32) * self.w_scale[:, None]
        return w.t().contiguous() if self.transposed else w

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight as a dense ``(out, in)`` tensor (rebuilt from the stored format)."""
        return _dense_int8(self)

    @property
    def density(self) -> float:
        """Fraction of nonzero int8 weights."""
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._check_input(x)
        if x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        elif self.fmt == "dense":
            y = self._run_dense(x2)
        elif ops.eager(x2):  # the kernel straight away; traced (compile/export) through the operators
            ok, _, k = _get()
            y = self._run_kernel(k, x2) if ok else self._run_torch(x2)
        else:
            y = self._op(x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _op(self, x2: torch.Tensor) -> torch.Tensor:
        tail = (self.w_scale, self.bias, self.act_scale, _MODES[(self.activations, self.granularity)], x2)
        if self.fmt == "csr":
            return torch.ops.prunekit.i8_csr.default(self.crow_indices, self.col_indices, self.values, *tail)
        if self.fmt == "nm":
            return torch.ops.prunekit.i8_nm.default(self.offsets, self.values, *self.pattern, *tail)
        return torch.ops.prunekit.i8_rows.default(self.crow_indices, self.col_indices, self.values, self.blocksize,
                                                  *tail)

    def _check_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Int8Linear: input must be a tensor, got {type(x).__name__}")
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"Int8Linear: input must be a float32 CPU tensor, got {x.dtype} on {x.device}; "
                            "cast it with x.float().cpu()")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: input must have shape (*, {self.in_features}), got {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("Int8Linear is inference-only: call it under torch.inference_mode() or "
                               "torch.no_grad(), or on an input that does not require grad")
        return x.reshape(-1, self.in_features)

    def _mode(self) -> tuple[int, float]:
        scale = float(self.act_scale) if self.act_scale is not None else 0.0
        return _MODES[(self.activations, self.granularity)], scale

    def _run_kernel(self, k: _Kernels, x2: torch.Tensor, row_major: bool | None = None) -> torch.Tensor:
        """``(B, out)`` from prunekit's kernels: contiguous, or a transposed view of a contiguous ``Y^T``.

        ``row_major=None`` follows :func:`~prunekit.runtime.kernels.batch_major` (a row-major input gives a
        contiguous result, a transposed one the kernels' layout); the operators pass ``True``.
        """
        (batch, n_in), mode = x2.shape, self._mode()
        xq = torch.empty(int(k.xq_size(batch, n_in)), dtype=torch.int16)
        xs = torch.empty((batch + 15) // 16 * 16, dtype=torch.float32)
        qthreads = torch.get_num_threads() if batch * n_in >= PARALLEL_MIN_WORK else 1
        if k.quantize(batch, n_in, x2.data_ptr(), x2.stride(0), x2.stride(1), mode[0], mode[1], xq.data_ptr(),
                      xs.data_ptr(), qthreads):
            raise ValueError("Int8Linear: the input holds NaN or inf, which int8 activations cannot represent")
        rm = (not kernels.batch_major(x2)) if row_major is None else row_major
        yt = torch.empty((batch, self.out_features) if rm else (self.out_features, batch), dtype=torch.float32)
        threads = torch.get_num_threads() if self.nnz * batch >= PARALLEL_MIN_WORK else 1
        tail = (xq.data_ptr(), self.w_scale.data_ptr(), xs.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(), yt.data_ptr(), int(rm), threads)
        if self.fmt == "csr":
            k.csr(self.out_features, n_in, batch, self.crow_indices.data_ptr(), self.col_indices.data_ptr(),
                  self.values.data_ptr(), *tail)
        elif self.fmt == "nm":
            n, m = self.pattern
            k.nm(self.out_features, n_in, batch, self.values.shape[1], n.bit_length() - 1, m,
                 self.offsets.data_ptr(), self.values.data_ptr(), *tail)
        else:
            k.rows(self.out_features // self.blocksize, self.blocksize, n_in, batch, self.crow_indices.data_ptr(),
                   self.col_indices.data_ptr(), self.values.data_ptr(), *tail)
        return yt if rm else yt.t()

    def _run_torch(self, x2: torch.Tensor) -> torch.Tensor:
        """The kernels' computation in torch, bit for bit (the float64 product of the integers is exact)."""
        q, xs = _quantize_torch(x2, *self._mode())
        acc = q.double() @ _dense_int8(self).double().t()
        y = acc.float() * (xs[:, None] * self.w_scale[None, :])
        return y if self.bias is None else y + self.bias

    def _run_dense(self, x2: torch.Tensor) -> torch.Tensor:
        packed = self._packed()
        if self.activations == "dynamic":
            return torch.ops.quantized.linear_dynamic(x2, packed, not _has_vnni())
        s = float(self.act_scale)
        if _has_vnni():
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, s, 128, packed)
        x2 = x2.clamp(-127 * s, 127 * s)  # 7 bits: |q - 64| <= 63 keeps vpmaddubsw from saturating
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x2, s * 127 / 63, 64, packed)

    def _packed(self) -> Any:
        """fbgemm's packed weight (built once per weight buffer; not part of the state)."""
        key = (self.qweight.data_ptr(), self.w_scale.data_ptr(), None if self.bias is None else self.bias.data_ptr())
        hit = self._cache.get("packed")
        if hit is None or hit[0] != key:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's deprecation notice for quantized tensors
                qw = torch._make_per_channel_quantized_tensor(
                    self.qweight, self.w_scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                hit = (key, torch.ops.quantized.linear_prepack(qw, self.bias))
            self._cache["packed"] = hit
        return hit[1]

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_cache"] = {}  # fbgemm's packed weight and the dense copy are rebuilt on demand
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.fmt != "dense":
            register_ops()

    def extra_repr(self) -> str:
        layout = f", blocksize={self.blocksize}" if self.blocksize is not None else ""
        layout += f", pattern={self.pattern[0]}:{self.pattern[1]}" if self.pattern is not None else ""
        acts = self.activations + (f" {self.granularity}" if self.activations == "dynamic" else
                                   f" scale={float(self.act_scale):.4g}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.fmt}{layout}, activations={acts}, density={self.density:.1%}"
                + (", transposed=True" if self.transposed else ""))


def _dense_int8(m: Int8Linear) -> torch.Tensor:
    """The int8 weight of ``m`` as dense ``(out, in)``, cached per stored buffer."""
    if m.fmt == "dense":
        return m.qweight
    key = (m.values.data_ptr(), m.values.shape)
    hit = m._cache.get("dense")
    if hit is not None and hit[0] == key:
        return hit[1]
    dense = torch.zeros(m.out_features, m.in_features, dtype=torch.int8)
    if m.fmt == "nm":
        n, mm = m.pattern
        per_row = m.values.shape[1]
        cols = (torch.arange(per_row) // n * mm).unsqueeze(0) + m.offsets.long()
        dense.scatter_(1, cols, m.values)  # padding entries are zeros at unused offsets
    else:
        r = m.blocksize if m.fmt == "rows" else 1
        counts = (m.crow_indices[1:] - m.crow_indices[:-1]).long()
        groups = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        rows = (groups[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
        cols = m.col_indices.long()[:, None].expand(-1, r).reshape(-1)
        dense[rows, cols] = m.values.reshape(-1)
    m._cache["dense"] = (key, dense)
    return dense


def _check_weight(q: Any, scale: Any, bias: Any) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2 or q.layout != torch.strided:
        raise TypeError(f"Int8Linear: qweight must be a dense 2-D int8 tensor (see quantize_weight), got "
                        f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}")
    if q.device.type != "cpu":
        raise TypeError(f"Int8Linear: runs on the CPU; qweight is on {q.device}")
    out_f, in_f = q.shape
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (out_f,) or not scale.is_floating_point():
        raise ValueError(f"Int8Linear: w_scale must be a float tensor of shape ({out_f},), got "
                         f"{tuple(getattr(scale, 'shape', ()))}")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError("Int8Linear: w_scale must be positive and finite")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_f,)):
        raise ValueError(f"Int8Linear: bias must be a tensor of shape ({out_f},), got "
                         f"{tuple(getattr(bias, 'shape', ()))}")
    if in_f > MAX_IN_FEATURES:
        raise ValueError(f"Int8Linear: in_features={in_f} > {MAX_IN_FEATURES}: the int32 sums could overflow")


def _check_layout(fmt: str, shape: torch.Size, blocksize: Any, pattern: Any) -> tuple[int | None, tuple[int, int] | None]:
    if (fmt == "rows") != (blocksize is not None):
        raise ValueError(f"Int8Linear: blocksize is required for fmt='rows' and only for it, got blocksize="
                         f"{blocksize!r} with fmt={fmt!r}")
    if (fmt == "nm") != (pattern is not None):
        raise ValueError(f"Int8Linear: pattern=(n, m) is required for fmt='nm' and only for it, got pattern="
                         f"{pattern!r} with fmt={fmt!r}")
    if blocksize is not None:
        blocksize = check_int("Int8Linear", "blocksize", blocksize, minimum=1)
        if shape[0] % blocksize:
            raise ValueError(f"Int8Linear: blocksize {blocksize} must divide out_features={shape[0]}")
    if pattern is not None:
        if (isinstance(pattern, (str, bytes)) or not isinstance(pattern, (tuple, list)) or len(pattern) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)):
            raise TypeError(f"Int8Linear: pattern must be a pair (n, m) of integers, got {pattern!r}")
        pattern = (int(pattern[0]), int(pattern[1]))
    return blocksize, pattern


def _check_activations(fmt: str, activations: Any, granularity: Any, act_scale: Any) -> tuple[str, str, float | None]:
    check_choice("Int8Linear", "activations", activations, ACTIVATIONS)
    check_choice("Int8Linear", "granularity", granularity, GRANULARITIES)
    if activations == "static":
        if granularity != "tensor":
            raise ValueError("Int8Linear: static activations have one scale per tensor; use granularity='tensor'")
        if isinstance(act_scale, bool) or not isinstance(act_scale, (int, float)) or not (
                math.isfinite(act_scale) and act_scale > 0):
            raise ValueError(f"Int8Linear: activations='static' needs a positive finite act_scale (see "
                             f"calibrate_scale), got {act_scale!r}")
        scale = float(torch.tensor(float(act_scale), dtype=torch.float32))
        if not scale > 0:
            raise ValueError(f"Int8Linear: act_scale={act_scale!r} underflows float32")
        return activations, granularity, scale
    if act_scale is not None:
        raise ValueError("Int8Linear: act_scale is only for activations='static'")
    if fmt == "dense" and granularity == "token":
        raise ValueError("Int8Linear: fmt='dense' (fbgemm) quantizes activations per tensor; use "
                         "granularity='tensor' or a sparse format")
    return activations, granularity, None


# -- the sparse int8 kernels as torch operators (torch.compile / torch.export; see prunekit.runtime.ops) -----------

_TAIL = "Tensor w_scale, Tensor? bias, Tensor? act_scale, int mode, Tensor x) -> Tensor"
_SCHEMAS = {"csr": "(Tensor crow, Tensor col, Tensor values, " + _TAIL,
            "rows": "(Tensor gptr, Tensor col, Tensor values, int rows, " + _TAIL,
            "nm": "(Tensor offsets, Tensor values, int n, int m, " + _TAIL}


def register_ops() -> None:
    """Define ``torch.ops.prunekit.i8_csr``, ``i8_rows`` and ``i8_nm`` (idempotent): ``y = x @ W.T + bias`` with
    the int8 weight's arrays as :class:`Int8Linear` stores them, ``mode`` 0/1/2 = dynamic per tensor, dynamic
    per token, static (``act_scale``, a 0-d float32 tensor); the kernel where it is available, else torch.

    Example:
        >>> register_ops()
        >>> torch.ops.prunekit.i8_csr.default.name()
        'prunekit::i8_csr'
    """
    ops.define("i8_csr", _SCHEMAS["csr"], _i8_csr, _i8_fake_csr)
    ops.define("i8_rows", _SCHEMAS["rows"], _i8_rows, _i8_fake_rows)
    ops.define("i8_nm", _SCHEMAS["nm"], _i8_nm, _i8_fake_nm)


class _Arrays:
    """An operator's arguments under the names :meth:`Int8Linear._run_kernel` / ``_run_torch`` read."""

    def __init__(self, fmt: str, w_scale: torch.Tensor, bias: torch.Tensor | None, act_scale: torch.Tensor | None,
                 mode: int, x: torch.Tensor, **arrays: Any) -> None:
        self.fmt, self.w_scale, self.bias, self.act_scale, self.mode = fmt, w_scale, bias, act_scale, mode
        self.out_features, self.in_features = w_scale.shape[0], x.shape[1]
        self.blocksize, self.pattern, self._cache = arrays.pop("blocksize", None), arrays.pop("pattern", None), {}
        self.__dict__.update(arrays)
        self.nnz = self.values.numel()

    def _mode(self) -> tuple[int, float]:
        return self.mode, float(self.act_scale) if self.act_scale is not None else 0.0

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode not in (0, 1, 2) or (self.mode == 2) != (self.act_scale is not None):
            raise ValueError(f"prunekit::i8_{self.fmt}: mode {self.mode} needs act_scale exactly when static (2)")
        if x.dtype != torch.float32 or self.values.dtype != torch.int8:
            raise ValueError(f"prunekit::i8_{self.fmt}: x must be float32 and values int8")
        ok, _, k = _get()
        if ok:
            return Int8Linear._run_kernel(self, k, x, row_major=True)
        return Int8Linear._run_torch(self, x).contiguous()  # the operators' layout (see _i8_fake)


def _i8_csr(crow, col, values, w_scale, bias, act_scale, mode, x):
    return _Arrays("csr", w_scale, bias, act_scale, mode, x, crow_indices=crow, col_indices=col, values=values).run(x)


def _i8_rows(gptr, col, values, rows, w_scale, bias, act_scale, mode, x):
    return _Arrays("rows", w_scale, bias, act_scale, mode, x, crow_indices=gptr, col_indices=col, values=values,
                   blocksize=rows).run(x)


def _i8_nm(offsets, values, n, m, w_scale, bias, act_scale, mode, x):
    return _Arrays("nm", w_scale, bias, act_scale, mode, x, offsets=offsets, values=values, pattern=(n, m)).run(x)


def _i8_fake(w_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Contiguous (B, out) whatever the strides of x (as the fp32 operators: see ops._empty_result).
    return x.new_empty((x.shape[0], w_scale.shape[0]))


def _i8_fake_csr(crow, col, values, w_scale, bias, act_scale, mode, x):
    return _i8_fake(w_scale, x)


def _i8_fake_rows(gptr, col, values, rows, w_scale, bias, act_scale, mode, x):
    return _i8_fake(w_scale, x)


def _i8_fake_nm(offsets, values, n, m, w_scale, bias, act_scale, mode, x):
    return _i8_fake(w_scale, x)
