"""Pick the fastest execution format per layer by timing it on the layer's real input.

Candidates are ``nn.Linear`` itself ("dense"), :class:`SparseLinear` in CSR,
in BSR when the weight's zeros come in square blocks (MKL's BSR supports
square blocks only), "prunekit" (prunekit's own float32 kernel) when
:func:`prunekit.runtime.kernels.available` says it built here, and
"prunekit-rows" (its row-block kernel) when consecutive output rows also share
their zeros (:func:`row_blocksize`), and "prunekit-nm" (its N:M kernel) for N:M
patterns along the inputs (:func:`nm_pattern`). Each candidate
is first checked against the dense layer on the captured input; one that errors or disagrees is dropped with a note.
With ``accelerate(..., quantize="int8")``, :func:`build_int8_candidates` adds
:class:`~prunekit.runtime.int8.Int8Linear` candidates ("int8-dense", "int8-csr", and
"int8-nm" / "int8-rows" where :func:`int8_formats` finds the pattern), each checked
against the fp32 layer within the int8 tolerance; convolutions get none.
Timing interleaves the candidates (one call each per round, in rotating order)
and takes the median per candidate, so drifting machine load hits all alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from . import kernels
from .layers import LayerPlan, build_sparse, layer_plan, weight_matrix
from .modules import SparseLinear, _quiet

__all__ = ["blocky_blocksize", "row_blocksize", "nm_pattern", "build_candidates", "build_int8_candidates", "int8_formats",
           "plain_linear", "relative_error", "time_candidates"]

# Square BSR block edges tried, largest first.
BLOCK_EDGES = (16, 8, 4, 2)
# A blocksize qualifies when at least this fraction of the values BSR stores are true nonzeros.
MIN_BLOCK_FILL = 0.8
WARMUP = 2
# Rows per block tried for "prunekit-rows", largest first.
ROW_BLOCKS = (16, 8, 4, 2)
# Group sizes m tried for "prunekit-nm".
NM_GROUPS = (4, 8, 16, 32)


def blocky_blocksize(weight: torch.Tensor) -> int | None:
    """The largest square block edge whose all-zero blocks hold (nearly) all the zeros, or ``None``.

    A blocksize ``b`` qualifies when both dimensions are multiples of ``b`` and
    the nonzero ``b x b`` blocks are at least ``MIN_BLOCK_FILL`` full.
    """
    nonzero = weight.detach() != 0
    nnz = int(nonzero.sum())
    rows, cols = weight.shape
    if nnz == 0:
        return None
    for b in BLOCK_EDGES:
        if rows % b or cols % b:
            continue
        blocks = int(nonzero.reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1).sum())
        if nnz >= MIN_BLOCK_FILL * blocks * b * b:
            return b
    return None


def row_blocksize(weight: torch.Tensor) -> int | None:
    """The largest ``r`` in ``ROW_BLOCKS`` such that blocks of ``r`` consecutive output rows (nearly) share
    their zeros, or ``None``.

    ``r`` qualifies when it divides the number of rows and the row blocks' kept
    columns are at least ``MIN_BLOCK_FILL`` full (so storing ``r`` values per kept
    column wastes little).

    Example:
        >>> w = torch.zeros(8, 6)
        >>> w[4:8, 1] = 1.0
        >>> row_blocksize(w), row_blocksize(torch.eye(4))
        (4, None)
    """
    nonzero = weight.detach() != 0
    nnz = int(nonzero.sum())
    rows, cols = weight.shape
    if nnz == 0:
        return None
    for r in ROW_BLOCKS:
        if rows % r:
            continue
        kept = int(nonzero.reshape(rows // r, r, cols).any(dim=1).sum())
        if nnz >= MIN_BLOCK_FILL * kept * r:
            return r
    return None


def nm_pattern(weight: torch.Tensor) -> tuple[int, int] | None:
    """The sparsest ``(n, m)`` with at most ``n`` nonzeros in every ``m`` consecutive inputs, or ``None``.

    Tries ``m`` in ``NM_GROUPS`` and ``n`` the smallest power of two holding the
    fullest group; a pattern qualifies when ``n < m`` and the kept entries are at
    least ``MIN_BLOCK_FILL`` nonzero (padding wastes little). Ties go to the smaller ``m``.

    Example:
        >>> w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 4.0, 0.0, 0.0]])
        >>> nm_pattern(w), nm_pattern(torch.ones(2, 8))
        ((2, 4), None)
    """
    nonzero = weight.detach() != 0
    rows, cols = weight.shape
    nnz = int(nonzero.sum())
    best: tuple[int, int] | None = None
    for m in NM_GROUPS:
        if cols % m or nnz == 0:
            continue
        fullest = int(nonzero.reshape(rows, cols // m, m).sum(dim=2).max())
        n = 1 << max(fullest - 1, 0).bit_length()
        if n < m and n <= 16 and nnz >= MIN_BLOCK_FILL * rows * (cols // m) * n:
            if best is None or n / m < best[0] / best[1]:
                best = (n, m)
    return best


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|`` (absolute when ``ref`` is all zeros); inf on a shape mismatch."""
    if out.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    diff = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def build_candidates(linear: nn.Module, formats: tuple[str, ...], x: torch.Tensor, rtol: float,
                     plan: LayerPlan | None = None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Candidate modules by format name, and notes on formats that were dropped.

    ``linear`` is an ``nn.Linear`` or transformers ``Conv1D`` (candidates are
    :class:`SparseLinear`) or an ``nn.Conv2d`` (candidates are
    :class:`~prunekit.runtime.conv.SparseConv2d`, whose weight is seen as
    ``(out_channels, in_channels*kh*kw)``), subclasses included; ``plan`` says how
    its forward is reproduced (found by :func:`~prunekit.runtime.layers.layer_plan`
    when ``None``; a layer that cannot be reproduced has only ``"dense"``). ``"bsr"`` is a
    candidate only when :func:`blocky_blocksize` finds blocks. Each sparse
    candidate must reproduce ``linear(x)`` within ``rtol``.
    """
    cands: dict[str, nn.Module] = {}
    notes: dict[str, str] = {}
    if plan is None:
        plan, why = layer_plan(linear, x)
        if plan is None:
            notes.update({fmt: f"skipped: {why}" for fmt in formats if fmt != "dense"})
            return ({"dense": linear} if "dense" in formats else {}), notes
    weight = weight_matrix(linear)
    with torch.inference_mode():
        ref = linear(x)
    for fmt in formats:
        if fmt == "dense":
            cands[fmt] = linear
            continue
        blocksize = None
        if fmt == "bsr":
            blocksize = blocky_blocksize(weight)
            if blocksize is None:
                notes[fmt] = "zeros not blocky"
                continue
        if fmt == "prunekit-rows":
            blocksize = row_blocksize(weight)
            if blocksize is None:
                notes[fmt] = "rows do not share their zeros"
                continue
        pattern = None
        if fmt == "prunekit-nm":
            pattern = nm_pattern(weight)
            if pattern is None:
                notes[fmt] = "no N:M pattern along the inputs"
                continue
        if fmt.startswith("prunekit"):
            ok, why = kernels.available()
            if not ok:
                notes[fmt] = f"skipped: kernel not available ({why})"
                continue
            if linear.weight.dtype != torch.float32 or x.dtype != torch.float32:
                notes[fmt] = f"skipped: kernel is float32 only (weight {linear.weight.dtype}, input {x.dtype})"
                continue
        try:
            module = build_sparse(linear, plan, fmt, blocksize, pattern)
            with torch.inference_mode(), _quiet():
                err = relative_error(module(x), ref)
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            notes[fmt] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        if not err <= rtol:
            notes[fmt] = f"rejected: relative error {err:.2e} > {rtol:.0e}"
            continue
        cands[fmt] = module
    return cands, notes


def time_candidates(cands: dict[str, nn.Module], x: torch.Tensor, repeats: int,
                    clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, float]:
    """Median milliseconds per call of each candidate on ``x`` (interleaved, after warm-up)."""
    names = list(cands)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode(), _quiet():
        for _ in range(WARMUP):
            for n in names:
                cands[n](x)
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                module = cands[n]
                t0 = clock()
                module(x)
                samples[n].append((clock() - t0) / 1e6)
    return {n: statistics.median(v) for n, v in samples.items()}


def fastest(timings: dict[str, float]) -> str:
    """The format with the smallest median (ties go to the earlier one, dense first)."""
    return min(timings, key=lambda n: timings[n])


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input tensor of an ``nn.Linear`` call (positional or ``input=``)."""
    return args[0] if args else kwargs.get("input")


def plain_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what a linear-like layer computes (``module`` itself if it is exactly one).

    Transformers ``Conv1D`` and linear subclasses whose forward reproduces ``nn.Linear`` get a plain
    ``nn.Linear`` with the ``(out, in)`` weight, so the int8 modules are built from one kind of layer.

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> plain_linear(lin) is lin
        True
    """
    if type(module) is nn.Linear:
        return module
    weight, bias = weight_matrix(module), getattr(module, "bias", None)
    lin = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                             dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin.eval()


def int8_formats(weight: torch.Tensor, sparse: bool = True) -> dict[str, tuple[int | None, tuple[int, int] | None]]:
    """The int8 candidates that fit ``weight``'s zeros: ``{name: (blocksize, pattern)}``.

    Dense int8 always; unless ``sparse=False``, int8 CSR, int8 N:M where :func:`nm_pattern` finds one and
    int8 row blocks where :func:`row_blocksize` does.

    Example:
        >>> w = torch.zeros(8, 8)
        >>> w[:, ::4] = 1.0
        >>> sorted(int8_formats(w))
        ['int8-csr', 'int8-dense', 'int8-nm', 'int8-rows']
    """
    found: dict[str, tuple[int | None, tuple[int, int] | None]] = {"int8-dense": (None, None)}
    if not sparse:
        return found
    found["int8-csr"] = (None, None)
    pattern = nm_pattern(weight)
    if pattern is not None:
        found["int8-nm"] = (None, pattern)
    rows = row_blocksize(weight)
    if rows is not None:
        found["int8-rows"] = (rows, None)
    return found


def _int8_module() -> tuple[Any, str | None]:
    """``(prunekit.runtime.int8, None)``, or ``(None, why int8 cannot run here)``."""
    try:
        from . import int8
    except ImportError as exc:
        return None, f"prunekit.runtime.int8 does not import ({type(exc).__name__}: {exc})"
    return int8, None


def _int8_candidate(int8: Any, lin: nn.Linear, fmt: str, blocksize: int | None, pattern: tuple[int, int] | None,
                    act_scale: float | None, granularity: str, x: torch.Tensor, ref: torch.Tensor
                    ) -> tuple[nn.Module | None, float, str]:
    """``(module, its relative error on x, "")`` or ``(None, nan, why it could not be built or run)``."""
    if act_scale is not None:
        mode: dict[str, Any] = {"activations": "static", "act_scale": act_scale}
    else:  # fbgemm's dense int8 quantizes activations per tensor only
        mode = {"activations": "dynamic", "granularity": "tensor" if fmt == "dense" else granularity}
    try:
        module = int8.Int8Linear.from_linear(lin, fmt, blocksize=blocksize, pattern=pattern, **mode)
        with torch.inference_mode(), _quiet():
            return module, relative_error(module(x), ref), ""
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        return None, float("nan"), f"unavailable: {type(exc).__name__}: {first}"


def build_int8_candidates(linear: nn.Module, x: torch.Tensor, int8_rtol: float, *, plan: LayerPlan | None = None,
                          act_scale: float | None = None, granularity: str = "token", sparse: bool = True
                          ) -> tuple[dict[str, nn.Module], dict[str, str], dict[str, float]]:
    """Int8 candidate modules by name, notes on dropped ones, and each built candidate's relative error.

    Each candidate is an :class:`~prunekit.runtime.int8.Int8Linear` (weights per output channel;
    activations static with ``act_scale``, else dynamic with ``granularity``, per tensor for dense int8,
    which is fbgemm's) in a format of
    :func:`int8_formats` (``sparse=False``: dense int8 only), kept when ``max|y - y_fp32| / max|y_fp32| <= int8_rtol`` on ``x``.
    Convolutions get none (they stay fp32); an unavailable int8 runtime is a note, not an error; without
    the compiled int8 kernels (:func:`~prunekit.runtime.int8.available`) only dense int8 is tried.
    """
    kind = plan.kind if plan is not None else ("conv2d" if isinstance(linear, nn.Conv2d) else "linear")
    if kind == "conv2d":
        return {}, {"int8": "skipped: convolutions stay fp32"}, {}
    if linear.weight.dtype != torch.float32 or x.dtype != torch.float32:
        return {}, {"int8": f"skipped: int8 needs float32 (weight {linear.weight.dtype}, input {x.dtype})"}, {}
    int8, why = _int8_module()
    if int8 is None:
        return {}, {"int8": f"unavailable: {why}"}, {}
    lin = plain_linear(linear)
    with torch.inference_mode():
        ref = linear(x)
    cands: dict[str, nn.Module] = {}
    notes: dict[str, str] = {}
    errors: dict[str, float] = {}
    kernels_ok, why = int8.available()
    for name, (blocksize, pattern) in int8_formats(weight_matrix(linear), sparse).items():
        fmt = name[len("int8-"):]
        if fmt != "dense" and not kernels_ok:  # the sparse formats would run their torch reference: slow
            notes[name] = f"skipped: int8 kernels not available ({why})"
            continue
        module, err, why_not = _int8_candidate(int8, lin, fmt, blocksize, pattern, act_scale, granularity, x, ref)
        if module is None:
            notes[name] = why_not
            continue
        errors[name] = err
        if not err <= int8_rtol:
            notes[name] = f"rejected: relative error {err:.2e} > int8_rtol={int8_rtol:g}"
            continue
        cands[name] = module
    return cands, notes, errors
