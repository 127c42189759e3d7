"""``accelerate``: swap pruned linear and convolution layers for the fastest measured sparse module.

Layers are ``nn.Linear`` and ``nn.Conv2d`` (subclasses included) and transformers'
``Conv1D`` (see :mod:`prunekit.runtime.layers`: a subclass with its own forward is
replaced only where that forward is reproduced exactly, otherwise it stays dense with
the reason in the report). The sparse modules keep ``weight``, ``bias``, ``dtype``,
``device`` and the layer's size attributes readable, so model code that inspects its
layers (ViT reads ``projection.weight.dtype``) runs unchanged.

Pipeline: copy the model (unless ``inplace``); run ``example_input`` once with
forward pre-hooks that capture each layer's real input (this run's
output is the dense-with-zeros oracle); for each layer at or above
``min_sparsity``, time the candidate formats on its captured input and keep
the fastest; swap the chosen modules in; check the new model's output
against the oracle. With ``quantize="int8"``, each Linear / ``Conv1D`` also
times int8 candidates (static activation scales from ``calibration``, else
dynamic), checked per layer and end to end within ``int8_rtol``; an int8 model
outside it falls back to the fastest fp32 candidates. Layers that are never called as modules (e.g.
``MultiheadAttention.out_proj``, whose weight is read directly) stay dense.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._progress import progress_bar
from .._validate import check_int, check_real
from .layers import LayerPlan, layer_plan, runtime_layers, static_reason, weight_matrix
from .modules import FORMATS, _quiet
from .report import INT8_CANDIDATES, AccelerationReport, LayerChoice
from .selection import (
    build_candidates,
    build_int8_candidates,
    fastest,
    first_input,
    relative_error,
    time_candidates,
)

__all__ = ["INT8_RTOL", "accelerate"]

# Default int8 tolerance (``max|y - y_fp32| / max|y_fp32|``), per layer and end to end. Measured with
# prunekit.runtime.int8 (weights per output channel) on all-MiniLM-L6-v2's 36 encoder Linears, 16 sequences of 128
# real tokens: per layer at most 0.056 (median 0.018 per-token, 0.024 per-tensor or static max calibration) for the
# sparse formats and 0.085 (median 0.042) for fbgemm's dense int8 (7-bit activations on CPUs without VNNI); end to
# end 0.037 with every layer int8 per-token (cosine of mean embeddings 0.9976), but 0.17 per-tensor, 0.19 fbgemm
# dense and 0.24 static. BERT-FFN-4 (768-3072, 50-95% sparse): 0.012 per layer, 0.003-0.006 end to end.
# 0.1 admits every measured layer and the per-token model, and sends the worst layers of a per-tensor or static
# MiniLM back to fp32 (see _swap_and_check).
INT8_RTOL = 0.1
QUANTIZE = ("int8",)
# Dynamic activations are quantized per token: measured more accurate than per tensor on MiniLM.
DYNAMIC_GRANULARITY = "token"
# Fractions of the int8 layers (largest int8 error first) the end-to-end check sends back to fp32, in turn.
REVERT_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)


def accelerate(
    model: nn.Module,
    example_input: Any,
    *,
    formats: Iterable[str] = FORMATS,
    min_sparsity: float = 0.5,
    repeats: int = 30,
    rtol: float = 1e-5,
    quantize: str | None = None,
    calibration: Iterable[Any] | None = None,
    int8_rtol: float = INT8_RTOL,
    inplace: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, AccelerationReport]:
    """Replace pruned ``nn.Linear`` / ``nn.Conv2d`` (and subclasses) and transformers ``Conv1D`` layers by the
    fastest execution measured on this machine.

    Candidates per layer: the dense layer itself, torch CSR/BSR and prunekit's
    own kernels (:data:`prunekit.runtime.modules.FORMATS`); convolutions run as
    im2col + sparse product (:class:`~prunekit.runtime.conv.SparseConv2d`) and
    are replaced only where that is faster than the dense convolution.

    With ``quantize="int8"`` every Linear / ``Conv1D`` layer also gets int8 candidates
    (:class:`~prunekit.runtime.int8.Int8Linear`: weights symmetric per output channel,
    zeros exact): dense int8 and int8 CSR always, int8 N:M and row blocks where the
    zeros fit (:func:`~prunekit.runtime.selection.int8_formats`); the fp32 candidates
    stay and the fastest measured wins. Each int8 candidate must reproduce the fp32
    layer within ``int8_rtol``, and the whole int8 model the fp32 model's output on
    ``example_input`` within ``int8_rtol``; if it does not, the int8 layers with the
    largest errors go back to their fastest fp32 candidate until it does (the report
    says so). Activations are quantized on the
    fly per token (dynamic) or, with ``calibration``, with static per-layer scales
    (:func:`~prunekit.runtime.int8.calibrate_scale`, ``method="max"``, from each layer's
    inputs on the calibration inputs). Convolutions stay fp32.

    The model should be a plain model whose pruned weights are exact zeros
    (:func:`prunekit.strip`). The result is for inference only: run it under
    ``torch.inference_mode()`` or ``torch.no_grad()``.

    Args:
        model: the model (left unchanged unless ``inplace``).
        example_input: a tensor (``model(x)``), a tuple/list (``model(*args)``)
            or a mapping (``model(**kwargs)``) of the shape you will run; each
            layer is timed on the input it receives from it. With int8, use real
            data without padding: every output position is compared with fp32.
        formats: fp32 candidate formats, a subset of :data:`prunekit.runtime.modules.FORMATS`
            (``"dense"``, ``"csr"``, ``"bsr"``, ``"prunekit"`` — the own kernel, used where it builds —
            ``"prunekit-rows"`` and ``"prunekit-nm"``, its row-block and N:M kernels). ``"bsr"`` is
            tried only for weights whose zeros form square blocks, ``"prunekit-rows"`` only where blocks
            of consecutive output rows share their zeros (``Blocks((r, c))`` pruning with ``r > 1``),
            ``"prunekit-nm"`` only for N:M patterns along the inputs (``NM(n, m)`` pruning).
        min_sparsity: layers with a smaller fraction of zero weights get no sparse candidate (with
            ``quantize="int8"`` they still try dense int8 against dense fp32).
        repeats: timed calls per candidate (interleaved; the median counts).
        rtol: largest allowed ``max|y - y_dense| / max|y_dense|`` of fp32 candidates, per layer and end to end.
        quantize: ``None`` (fp32 only) or ``"int8"``.
        calibration: with ``quantize="int8"``, a non-empty iterable of model inputs (each like
            ``example_input``) for static activation scales; ``None``: dynamic activations. Only the
            running maximum per layer is kept, not the inputs.
        int8_rtol: largest allowed relative error of an int8 candidate against its fp32 layer, and of the
            int8 model against the fp32 model (default :data:`INT8_RTOL`).
        inplace: modify ``model`` itself instead of a deep copy.
        progress: show a progress bar (it appears only if timing takes over 2 s).

    Returns:
        ``(accelerated_model, report)``; the model is in eval mode, the
        :class:`~prunekit.runtime.AccelerationReport` lists per layer the
        sparsity, chosen format and precision and the timings of every candidate,
        and the measured output change.

    Raises:
        TypeError / ValueError: a bad argument (the message names it).
        RuntimeError: the accelerated model's output differs from the dense
            model's by more than ``rtol`` (with ``inplace=True`` the original
            layers are put back first).

    Example:
        >>> model, report = accelerate(prunekit.strip(model), torch.randn(64, 768))  # doctest: +SKIP
        >>> model, report = accelerate(model, x, quantize="int8", calibration=[x1, x2])  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be an nn.Module, got {type(model).__name__}")
    call = _as_call(example_input)
    formats = _check_formats(formats)
    min_sparsity = check_real("accelerate", "min_sparsity", min_sparsity)
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"accelerate: min_sparsity must be in [0, 1], got {min_sparsity}")
    repeats = check_int("accelerate", "repeats", repeats, minimum=1)
    rtol, int8_rtol = _check_tol("rtol", rtol), _check_tol("int8_rtol", int8_rtol)
    quantize = _check_quantize(quantize)
    calls = _check_calibration(calibration, quantize)
    for name, flag in (("inplace", inplace), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"accelerate: {name} must be a bool, got {type(flag).__name__}")

    work = model if inplace else copy.deepcopy(model)
    work.eval()
    linears = runtime_layers(work)
    inputs = _capture_inputs(work, linears, call)
    oracle = inputs.pop(None)

    layers, todo = _plan(linears, inputs, formats, min_sparsity, quantize)
    scales, calib_refs = _calibrate(work, todo, calls) if calls else ({}, [])
    int8 = None if quantize is None else _Int8(int8_rtol, scales)
    chosen, fallback, unavailable = _choose(todo, formats, rtol, repeats, progress, int8)
    notes = _model_notes(unavailable, layers, todo, quantize)
    work, err, out = _swap_and_check(work, chosen, fallback, call, oracle, rtol, int8_rtol, notes)
    report = AccelerationReport(layers, err, repeats, torch.get_num_threads(), notes)
    if quantize is not None:
        _output_change(report, work, out, oracle, calls, calib_refs)
    return work, report


@dataclass
class _Int8:
    """What the int8 candidates of every layer need: the tolerance and the static scales by ``id(layer)``."""

    rtol: float
    scales: dict[int, float]


def _check_tol(name: str, value: Any) -> float:
    value = check_real("accelerate", name, value)
    if value <= 0:
        raise ValueError(f"accelerate: {name} must be > 0, got {value}")
    return value


def _check_quantize(quantize: Any) -> str | None:
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"accelerate: quantize must be None or 'int8', got {quantize!r}")
    return quantize


def _check_calibration(calibration: Any, quantize: str | None) -> list[Any]:
    """The calibration inputs as a list of calls (empty for ``None``)."""
    if calibration is None:
        return []
    if quantize is None:
        raise ValueError("accelerate: calibration is only used with quantize='int8'; pass quantize='int8' or drop it")
    if isinstance(calibration, (str, bytes, torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise TypeError("accelerate: calibration must be an iterable of model inputs (e.g. a list of tensors "
                        f"[x1, x2]), got {type(calibration).__name__}")
    calls = []
    for i, item in enumerate(calibration):
        try:
            calls.append(_as_call(item))
        except TypeError as exc:
            raise TypeError(f"accelerate: calibration[{i}]: {str(exc).removeprefix('accelerate: ')}") from None
    if not calls:
        raise ValueError("accelerate: calibration is empty; pass at least one model input or None for dynamic "
                         "activations")
    return calls


# An int8 layer's way back to fp32: its report row, its fastest fp32 format, that module (None: the dense layer).
_Fallback = tuple[LayerChoice, str, "nn.Module | None"]
# One layer to time: its report row, the layer, its captured input, how it is reproduced, its fp32 formats.
_Todo = tuple[LayerChoice, nn.Module, torch.Tensor, LayerPlan, tuple[str, ...]]


def _plan(layers: list[tuple[str, nn.Module]], inputs: dict[Any, Any], formats: tuple[str, ...],
          min_sparsity: float, quantize: str | None = None) -> tuple[list[LayerChoice], list[_Todo]]:
    """One :class:`LayerChoice` per layer, and the layers worth timing (with their captured input and plan)."""
    choices, todo = [], []
    for name, lin in layers:
        weight = weight_matrix(lin)
        sparsity = float((weight == 0).sum()) / weight.numel() if weight.numel() else 0.0
        x = inputs.get(id(lin))
        layer = LayerChoice(name, weight.shape[1], weight.shape[0],
                            None if x is None else tuple(x.shape), sparsity, "dense", kind=type(lin).__name__)
        choices.append(layer)
        fmts, why = _layer_formats(lin, x, sparsity, formats, min_sparsity, quantize)
        if why is not None:
            layer.notes.append(why)
        if fmts:
            plan, why = layer_plan(lin, x)
            if plan is None:
                layer.notes.append(f"dense only: {why}")
                continue
            if plan.pre_pad is not None:
                layer.notes.append(f"forward pads first: reproduced with pre_pad={plan.pre_pad!r}")
            todo.append((layer, lin, x, plan, fmts))
    return choices, todo


def _layer_formats(lin: nn.Module, x: Any, sparsity: float, formats: tuple[str, ...], min_sparsity: float,
                   quantize: str | None) -> tuple[tuple[str, ...], str | None]:
    """The fp32 formats worth trying on one layer (empty: leave it dense untimed) and a note, if any."""
    unsupported = static_reason(lin)
    weight = lin.weight
    if unsupported is not None:
        return (), f"dense only: {unsupported}"
    if x is None:
        return (), "not called as a module by example_input"
    if not weight.is_floating_point() or weight.device.type != "cpu":
        return (), f"{weight.dtype} on {weight.device.type}: dense only"
    # With int8, a layer that gets no sparse candidate still tries dense int8 against dense fp32
    # (convolutions stay fp32, so they have nothing to try).
    int8_only = quantize is not None and not isinstance(lin, nn.Conv2d)
    dense_only = tuple(f for f in formats if f == "dense") if int8_only else ()
    if sparsity < min_sparsity:
        return dense_only, f"sparsity below min_sparsity={min_sparsity:g}" + (
            ": only dense fp32 and dense int8 tried" if int8_only else "")
    if formats == ("dense",):
        return dense_only, "only 'dense' requested" + (" (and int8)" if int8_only else "")
    return formats, None


def _choose(todo: list[_Todo], formats: tuple[str, ...], rtol: float, repeats: int, progress: bool,
            int8: _Int8 | None = None) -> tuple[dict[int, nn.Module], dict[int, _Fallback], set[str]]:
    """Time the candidates of every layer in ``todo``.

    Returns ``({id(layer): fastest module}, {id(layer): its fp32 fallback} for layers whose fastest is int8,
    failed fp32 formats)``.
    """
    chosen: dict[int, nn.Module] = {}
    fallback: dict[int, _Fallback] = {}
    unavailable: set[str] = set()
    with progress_bar(progress and bool(todo), todo, desc="accelerate", unit="layer", delay=2.0, leave=False) as bar:
        for layer, lin, x, plan, fmts in bar:
            cands, notes = build_candidates(lin, fmts, x, rtol, plan)
            unavailable |= {fmt for fmt, why in notes.items() if why.startswith("unavailable")}
            fp32 = list(cands)
            if int8 is not None:
                q_cands, q_notes, layer.int8_errors = build_int8_candidates(
                    lin, x, int8.rtol, plan=plan, act_scale=int8.scales.get(id(lin)), granularity=DYNAMIC_GRANULARITY,
                    sparse=any(f != "dense" for f in fmts))
                cands |= q_cands
                notes |= q_notes
            layer.notes += [f"{fmt}: {why}" for fmt, why in notes.items()]
            best = _pick(layer, cands, x, repeats)
            if best != "dense":
                chosen[id(lin)] = cands[best]
            if best in INT8_CANDIDATES:
                fp32_best = fastest({f: layer.timings_ms[f] for f in fp32}) if fp32 else "dense"
                fallback[id(lin)] = (layer, fp32_best, None if fp32_best == "dense" else cands[fp32_best])
    return chosen, fallback, unavailable


def _pick(layer: LayerChoice, cands: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> str:
    """Time ``cands`` (if more than one), record the winner on ``layer`` and return its name."""
    if len(cands) > 1:
        layer.timings_ms = time_candidates(cands, x, repeats)
        best = fastest(layer.timings_ms)
    elif cands:
        best = next(iter(cands))
    else:
        best = "dense"
        layer.notes.append("no requested format available: kept dense")
    _set_format(layer, best, cands.get(best))
    return best


def _set_format(layer: LayerChoice, fmt: str, module: nn.Module | None) -> None:
    layer.format = fmt
    layer.precision = "int8" if fmt in INT8_CANDIDATES else "fp32"
    layer.blocksize = getattr(module, "blocksize", None) if fmt != "dense" else None
    pattern = getattr(module, "pattern", None) if fmt != "dense" else None
    layer.pattern = None if pattern is None else f"{pattern[0]}:{pattern[1]}"


def _model_notes(unavailable: set[str], layers: list[LayerChoice], todo: list[_Todo],
                 quantize: str | None) -> list[str]:
    notes: list[str] = []
    if unavailable:
        notes.append(f"sparse format(s) {sorted(unavailable)} failed on this platform for some layers; "
                     "those layers fall back to the remaining formats (see per-layer notes)")
    if quantize is None:
        return notes
    if any(plan.kind == "conv2d" for _, _, _, plan, _ in todo):
        notes.append("convolutions stay fp32 (int8 candidates are for Linear / Conv1D layers)")
    missing = sorted({n.split(": ", 1)[1] for layer in layers for n in layer.notes if n.startswith("int8: unavail")})
    if missing:
        notes.append("int8 unavailable, those layers stay fp32: " + "; ".join(missing))
    skipped = sorted({n.split(": ", 1)[1] for layer in layers for n in layer.notes
                      if n.startswith("int8-") and "int8 kernels not available" in n})
    if skipped:
        notes.append("sparse int8 not tried (only dense int8): " + "; ".join(skipped))
    return notes


def _calibrate(model: nn.Module, todo: list[_Todo], calls: list[Any]) -> tuple[dict[int, float], list[Any]]:
    """Static activation scales ``{id(layer): scale}`` from each layer's inputs on ``calls``, and the fp32 outputs.

    Each captured input is reduced at once (``calibrate_scale([x])``) and the largest scale kept: that is
    ``calibrate_scale`` over all inputs for ``method="max"`` without holding them in memory.
    """
    from .selection import _int8_module

    int8, _ = _int8_module()
    targets = [lin for _, lin, _, plan, _ in todo if plan.kind != "conv2d"]
    if int8 is None or not targets:
        with torch.inference_mode(), _quiet():
            return {}, [call(model) for call in calls]
    scales: dict[int, float] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = first_input(args, kwargs)
        if isinstance(x, torch.Tensor):
            scale = float(int8.calibrate_scale([x], method="max"))
            scales[id(module)] = max(scale, scales.get(id(module), 0.0))

    handles = [lin.register_forward_pre_hook(hook, with_kwargs=True) for lin in targets]
    try:
        with torch.inference_mode(), _quiet():
            outputs = [call(model) for call in calls]
    finally:
        for handle in handles:
            handle.remove()
    return scales, outputs


def _swap_and_check(work: nn.Module, chosen: dict[int, nn.Module], fallback: dict[int, _Fallback], call: Any,
                    oracle: Any, rtol: float, int8_rtol: float, notes: list[str]) -> tuple[nn.Module, float, Any]:
    """Swap the chosen modules in and check the model end to end; ``(model, relative error, its output)``.

    An int8 model outside ``int8_rtol`` is not an error: the int8 layers with the largest int8 errors go back
    to their fastest fp32 candidate (the worst 1/8, 1/4, 1/2, then all; at most four more forwards) until it
    passes, and a model left without int8 layers is checked against ``rtol``.
    """
    originals, model, err, out = _swap_and_run(work, chosen, call, oracle)
    order = sorted(fallback, key=lambda key: -fallback[key][0].int8_errors.get(fallback[key][0].format, 0.0))
    first_err, reverted = err, 0
    for count in sorted({math.ceil(len(order) * f) for f in REVERT_FRACTIONS}):
        if err <= int8_rtol:
            break
        _restore(originals)
        for key in order[reverted:count]:
            layer, fmt, module = fallback[key]
            layer.notes.append(f"{layer.format}: reverted to fp32 {fmt} by the end-to-end check")
            _set_format(layer, fmt, module)
            if module is None:
                chosen.pop(key, None)
            else:
                chosen[key] = module
        reverted = count
        originals, model, err, out = _swap_and_run(work, chosen, call, oracle)
    if reverted:
        notes.append(f"the int8 model differs from the fp32 model by relative error {first_err:.2e} > int8_rtol="
                     f"{int8_rtol:g} on example_input: the {reverted} of {len(order)} int8 layers with the largest "
                     "int8 errors run their fastest fp32 candidate instead")
    tol, name = (int8_rtol, "int8_rtol") if reverted < len(order) else (rtol, "rtol")
    if not err <= tol:
        _restore(originals)
        raise RuntimeError(f"accelerate: accelerated model differs from the dense model by relative error "
                           f"{err:.3e} > {name}={tol:g}; no layers were replaced")
    return model, err, out


def _swap_and_run(work: nn.Module, chosen: dict[int, nn.Module], call: Any, oracle: Any
                  ) -> tuple[list[tuple[nn.Module, str, nn.Module]], nn.Module, float, Any]:
    """Swap ``chosen`` in and run ``call`` once: ``(originals, model, relative error vs oracle, output)``."""
    originals = _swap(work, chosen)
    model = chosen.get(id(work), work)
    try:
        with torch.inference_mode(), _quiet():
            out = call(model)
        return originals, model, _max_error(out, oracle), out
    except Exception:
        _restore(originals)
        raise


def _output_change(report: AccelerationReport, model: nn.Module, out: Any, oracle: Any, calls: list[Any],
                   calib_refs: list[Any]) -> None:
    """Fill the report's int8 fields: activations, error over the calibration inputs, top-1 agreement."""
    report.quantize = "int8"
    report.activations = (f"static ({len(calls)} calibration inputs)" if calls else
                          f"dynamic per-{DYNAMIC_GRANULARITY}; dense int8 per tensor")
    pairs = [(out, oracle)]
    if calls:
        with torch.inference_mode(), _quiet():
            pairs = [(call(model), ref) for call, ref in zip(calls, calib_refs)]
        report.calibration_relative_error = max(_max_error(got, ref) for got, ref in pairs)
    logits = [(_logits(got), _logits(ref)) for got, ref in pairs]
    if logits and all(g is not None and r is not None and g.shape == r.shape for g, r in logits):
        agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in logits)
        report.top1_agreement = agree / sum(r.shape[0] for _, r in logits)


def _logits(out: Any) -> torch.Tensor | None:
    """A classifier's ``(rows, classes)`` logits: the output itself or its ``logits`` entry, if 2-D; else ``None``."""
    if isinstance(out, Mapping):
        out = out.get("logits")
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point():
        return out
    return None


def _as_call(example_input: Any) -> Any:
    if isinstance(example_input, torch.Tensor):
        return lambda m: m(example_input)
    if isinstance(example_input, (tuple, list)):
        args = tuple(example_input)
        return lambda m: m(*args)
    if isinstance(example_input, Mapping):
        kwargs = dict(example_input)
        return lambda m: m(**kwargs)
    raise TypeError("accelerate: example_input must be a tensor, a tuple/list of positional arguments or a "
                    f"mapping of keyword arguments, got {type(example_input).__name__}")


def _check_formats(formats: Any) -> tuple[str, ...]:
    if isinstance(formats, str) or not isinstance(formats, Iterable):
        raise TypeError(f"accelerate: formats must be a tuple of format names from {FORMATS}, got {formats!r}")
    out = tuple(dict.fromkeys(formats))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ValueError(f"accelerate: formats must be a non-empty subset of {FORMATS}, got {formats!r}")
    return out


def _capture_inputs(model: nn.Module, linears: list[tuple[str, nn.Module]], call: Any) -> dict[Any, Any]:
    """Run ``call(model)`` once; return ``{id(linear): its first input}`` plus ``{None: output}``."""
    captured: dict[Any, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = first_input(args, kwargs)
        if id(module) not in captured and isinstance(x, torch.Tensor):
            captured[id(module)] = x.detach().clone()

    handles = [lin.register_forward_pre_hook(hook, with_kwargs=True) for _, lin in linears]
    try:
        with torch.inference_mode():
            captured[None] = call(model)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _swap(model: nn.Module, chosen: dict[int, nn.Module]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Set each chosen replacement on every parent that holds the original; return what was there."""
    originals = []
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in chosen:
                originals.append((parent, child_name, child))
                setattr(parent, child_name, chosen[id(child)])
    return originals


def _restore(originals: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, child_name, child in originals:
        setattr(parent, child_name, child)


def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    return []


def _max_error(out: Any, ref: Any) -> float:
    got, want = _leaves(out), _leaves(ref)
    if len(got) != len(want):
        return float("inf")
    return max((relative_error(g, w) for g, w in zip(got, want) if w.is_floating_point()), default=0.0)
