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
against the oracle. Layers that are never called as modules (e.g.
``MultiheadAttention.out_proj``, whose weight is read directly) stay dense.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._progress import progress_bar
from .._validate import check_int, check_real
from .layers import LayerPlan, layer_plan, runtime_layers, static_reason, weight_matrix
from .modules import FORMATS, _quiet
from .report import AccelerationReport, LayerChoice
from .selection import build_candidates, fastest, first_input, relative_error, time_candidates

__all__ = ["accelerate"]


def accelerate(
    model: nn.Module,
    example_input: Any,
    *,
    formats: Iterable[str] = FORMATS,
    min_sparsity: float = 0.5,
    repeats: int = 30,
    rtol: float = 1e-5,
    inplace: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, AccelerationReport]:
    """Replace pruned ``nn.Linear`` / ``nn.Conv2d`` (and subclasses) and transformers ``Conv1D`` layers by the
    fastest execution measured on this machine.

    Candidates per layer: the dense layer itself, torch CSR/BSR and prunekit's
    own kernels (:data:`prunekit.runtime.modules.FORMATS`); convolutions run as
    im2col + sparse product (:class:`~prunekit.runtime.conv.SparseConv2d`) and
    are replaced only where that is faster than the dense convolution.

    The model should be a plain model whose pruned weights are exact zeros
    (:func:`prunekit.strip`). The result is for inference only: run it under
    ``torch.inference_mode()`` or ``torch.no_grad()``.

    Args:
        model: the model (left unchanged unless ``inplace``).
        example_input: a tensor (``model(x)``), a tuple/list (``model(*args)``)
            or a mapping (``model(**kwargs)``) of the shape you will run; each
            layer is timed on the input it receives from it.
        formats: candidate formats, a subset of :data:`prunekit.runtime.modules.FORMATS`
            (``"dense"``, ``"csr"``, ``"bsr"``, ``"prunekit"`` — the own kernel, used where it builds —
            ``"prunekit-rows"`` and ``"prunekit-nm"``, its row-block and N:M kernels). ``"bsr"`` is
            tried only for weights whose zeros form square blocks, ``"prunekit-rows"`` only where blocks
            of consecutive output rows share their zeros (``Blocks((r, c))`` pruning with ``r > 1``),
            ``"prunekit-nm"`` only for N:M patterns along the inputs (``NM(n, m)`` pruning).
        min_sparsity: layers with a smaller fraction of zero weights stay dense, untimed.
        repeats: timed calls per candidate (interleaved; the median counts).
        rtol: largest allowed ``max|y - y_dense| / max|y_dense|``, per layer and end to end.
        inplace: modify ``model`` itself instead of a deep copy.
        progress: show a progress bar (it appears only if timing takes over 2 s).

    Returns:
        ``(accelerated_model, report)``; the model is in eval mode, the
        :class:`~prunekit.runtime.AccelerationReport` lists per layer the
        sparsity, chosen format and the timings of every candidate.

    Raises:
        TypeError / ValueError: a bad argument (the message names it).
        RuntimeError: the accelerated model's output differs from the dense
            model's by more than ``rtol`` (with ``inplace=True`` the original
            layers are put back first).

    Example:
        >>> model, report = accelerate(prunekit.strip(model), torch.randn(64, 768))  # doctest: +SKIP
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
    rtol = check_real("accelerate", "rtol", rtol)
    if rtol <= 0:
        raise ValueError(f"accelerate: rtol must be > 0, got {rtol}")
    for name, flag in (("inplace", inplace), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"accelerate: {name} must be a bool, got {type(flag).__name__}")

    work = model if inplace else copy.deepcopy(model)
    work.eval()
    linears = runtime_layers(work)
    inputs = _capture_inputs(work, linears, call)
    oracle = inputs.pop(None)

    layers, todo = _plan(linears, inputs, formats, min_sparsity)
    chosen, unavailable = _choose(todo, formats, rtol, repeats, progress)
    model_notes: list[str] = []
    if unavailable:
        model_notes.append(f"sparse format(s) {sorted(unavailable)} failed on this platform for some layers; "
                           "those layers fall back to the remaining formats (see per-layer notes)")

    originals = _swap(work, chosen)
    if id(work) in chosen:
        work = chosen[id(work)]
    try:
        with torch.inference_mode(), _quiet():
            err = _max_error(call(work), oracle)
    except Exception:
        _restore(originals)
        raise
    if not err <= rtol:
        _restore(originals)
        raise RuntimeError(f"accelerate: accelerated model differs from the dense model by relative error "
                           f"{err:.3e} > rtol={rtol:g}; no layers were replaced")
    report = AccelerationReport(layers, err, repeats, torch.get_num_threads(), model_notes)
    return work, report


def _plan(layers: list[tuple[str, nn.Module]], inputs: dict[Any, Any], formats: tuple[str, ...],
          min_sparsity: float) -> tuple[list[LayerChoice], list[tuple[LayerChoice, nn.Module, torch.Tensor, LayerPlan]]]:
    """One :class:`LayerChoice` per layer, and the layers worth timing (with their captured input and plan)."""
    choices, todo = [], []
    for name, lin in layers:
        weight = weight_matrix(lin)
        sparsity = float((weight == 0).sum()) / weight.numel() if weight.numel() else 0.0
        x = inputs.get(id(lin))
        layer = LayerChoice(name, weight.shape[1], weight.shape[0],
                            None if x is None else tuple(x.shape), sparsity, "dense", kind=type(lin).__name__)
        choices.append(layer)
        unsupported = static_reason(lin)
        if unsupported is not None:
            layer.notes.append(f"dense only: {unsupported}")
        elif x is None:
            layer.notes.append("not called as a module by example_input")
        elif sparsity < min_sparsity:
            layer.notes.append(f"sparsity below min_sparsity={min_sparsity:g}")
        elif not weight.is_floating_point() or weight.device.type != "cpu":
            layer.notes.append(f"{weight.dtype} on {weight.device.type}: dense only")
        elif formats == ("dense",):
            layer.notes.append("only 'dense' requested")
        else:
            plan, why = layer_plan(lin, x)
            if plan is None:
                layer.notes.append(f"dense only: {why}")
            else:
                if plan.pre_pad is not None:
                    layer.notes.append(f"forward pads first: reproduced with pre_pad={plan.pre_pad!r}")
                todo.append((layer, lin, x, plan))
    return choices, todo


def _choose(todo: list[tuple[LayerChoice, nn.Module, torch.Tensor, LayerPlan]], formats: tuple[str, ...], rtol: float,
            repeats: int, progress: bool) -> tuple[dict[int, nn.Module], set[str]]:
    """Time the candidates of every layer in ``todo``; ``({id(layer): fastest module}, failed formats)``."""
    chosen: dict[int, nn.Module] = {}
    unavailable: set[str] = set()
    with progress_bar(progress and bool(todo), todo, desc="accelerate", unit="layer", delay=2.0, leave=False) as bar:
        for layer, lin, x, plan in bar:
            cands, notes = build_candidates(lin, formats, x, rtol, plan)
            layer.notes += [f"{fmt}: {why}" for fmt, why in notes.items()]
            unavailable |= {fmt for fmt, why in notes.items() if why.startswith("unavailable")}
            if len(cands) > 1:
                layer.timings_ms = time_candidates(cands, x, repeats)
                best = fastest(layer.timings_ms)
            elif cands:
                best = next(iter(cands))
            else:
                best = "dense"
                layer.notes.append("no requested format available: kept dense")
            layer.format = best
            if best != "dense":
                module = cands[best]
                layer.blocksize = getattr(module, "blocksize", None)
                pattern = getattr(module, "pattern", None)
                layer.pattern = None if pattern is None else f"{pattern[0]}:{pattern[1]}"
                chosen[id(lin)] = module
    return chosen, unavailable


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
