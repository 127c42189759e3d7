"""The stages of a recipe run. Each reads the previous stages' files and writes its own, atomically.

============== ================================================ ==========================================
stage          does                                             writes (in the run directory)
============== ================================================ ==========================================
dense-train    build the model (seeded), train it densely        ``dense.safetensors`` (weights + RNG state)
prune-train    fine-tune under a Pruner (checkpointed), strip    ``pruned.safetensors``
export         the prunekit file, its int8 variant, ONNX,         ``model.pkt``, ``model_int8.pkt``, ``model.onnx``,
               phone-runtime files (ExecuTorch, LiteRT)          ``model[_int8].pte``, ``model[_int8].tflite``
evaluate       test metrics of dense, pruned and exported models ``results.json``
               (phone files: in their own runtime)
============== ================================================ ==========================================

A stage's return value is its result; :mod:`prunekit.apps.recipe.run` stores it
in ``stages/<stage>.json`` once the stage's files are written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..._io import atomic_write_bytes, atomic_write_json
from ..._repro import seeded
from ...core.pruner import Pruner, strip
from ...core.report import sparsity_report
from ...formats import dumps, export_onnx, loads
from ...training.checkpoint import state_tensors
from ...training.loop import epoch_seed, evaluate
from .build import Data, build_model, build_optimizer, build_pruner_kwargs
from .config import Recipe
from .loop import Phase, run_phase
from .stopping import StoppingPruner, build_stop, stop_report

__all__ = ["Context", "STAGES", "dense_train", "prune_train", "export", "evaluate_stage", "load_final_model"]

_DENSE_PHASE, _PRUNE_PHASE = 0, 1  # phase seeds as in prunekit.apps.demo: epoch_seed(seed, phase)


@dataclass
class Context:
    """What every stage sees."""

    recipe: Recipe
    run_dir: Path
    data: Data
    progress: bool

    def path(self, name: str) -> Path:
        """A file of the run directory."""
        return self.run_dir / name


def _save_model(path: Path, model: nn.Module, *, rng: bool = False) -> None:
    tensors = dict(model.state_dict())
    if rng:
        tensors["rng/torch"] = torch.get_rng_state()
    atomic_write_bytes(path, st_save(state_tensors(tensors)))


def _load_model(recipe: Recipe, path: Path, *, rng: bool = False) -> nn.Module:
    tensors = st_load(path.read_bytes())
    state = tensors.pop("rng/torch", None)
    if rng and state is not None:
        torch.set_rng_state(state)
    model = build_model(recipe.model)
    model.load_state_dict(tensors)
    return model


def load_final_model(recipe: Recipe, run_dir: Path) -> nn.Module:
    """The stripped, pruned model of a finished prune-train stage, rebuilt via the recipe's factory.

    Raises:
        FileNotFoundError: the run has not finished its prune-train stage.

    Example:
        >>> model = load_final_model(recipe, Path("runs/demo-0b6fb08f2af9"))  # doctest: +SKIP
    """
    path = run_dir / "pruned.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: run 'prunekit prune --recipe ...' first")
    return _load_model(recipe, path).eval()


def dense_train(ctx: Context) -> dict[str, Any]:
    """Build the model from the factory under the recipe's seed and train it densely."""
    r, d = ctx.recipe, ctx.data
    model = build_model(r.model)
    out: dict[str, Any] = {"epochs": r.training.dense_epochs, "epoch_losses": []}
    if r.training.dense_epochs:
        phase = Phase(r.training.dense_epochs, r.data.batch_size, epoch_seed(r.training.seed, _DENSE_PHASE),
                      ctx.path("checkpoints/dense.safetensors"), r.training.checkpoint_every, "dense")
        out.update(run_phase(model, build_optimizer(model, r.training), d.X_train, d.y_train, phase,
                             progress=ctx.progress))
    _save_model(ctx.path("dense.safetensors"), model, rng=True)
    return {**out, **evaluate(model, d.X_test, d.y_test), "sparsity": sparsity_report(model).sparsity}


def prune_train(ctx: Context) -> dict[str, Any]:
    """Fine-tune the dense model under a Pruner (checkpointed and resumable), then strip it.

    With ``stop_when`` a :class:`prunekit.StopWhen` hook holds the sparsity at the last good mask update;
    its state travels in the checkpoints, and the result gets ``"stop_when"`` (see :func:`stop_report`).
    """
    r, d = ctx.recipe, ctx.data
    model = _load_model(r, ctx.path("dense.safetensors"), rng=True)
    optimizer = build_optimizer(model, r.training)
    phase = Phase(r.training.epochs, r.data.batch_size, epoch_seed(r.training.seed, _PRUNE_PHASE),
                  ctx.path("checkpoints/prune.safetensors"), r.training.checkpoint_every, "prune+finetune")
    stop = None if r.stop_when is None else build_stop(r.stop_when, d)
    # a fresh phase: the hook sees the first update (and measures the dense baseline just before it);
    # a resumed one: the hook comes back with its saved search, attached after the Pruner's state is loaded
    hooks = [stop] if stop is not None and not phase.checkpoint.exists() else []
    pruner = Pruner(model, r.schedule, optimizer=optimizer, hooks=hooks, **build_pruner_kwargs(r, d))
    saved = pruner if stop is None else StoppingPruner(pruner, stop)
    out = run_phase(model, optimizer, d.X_train, d.y_train, phase, pruner=saved, progress=ctx.progress)
    report = pruner.report()
    strip(model)
    _save_model(ctx.path("pruned.safetensors"), model)
    out = {**out, "sparsity": report.sparsity, "layers": report.to_dict(), "pruner_steps": pruner.current_step}
    if stop is not None:
        out["stop_when"] = stop_report(stop, r.stop_when, report.sparsity)
    return out


def export(ctx: Context) -> dict[str, Any]:
    """Write the artifacts the recipe's ``export`` section asks for; each prunekit file is reloaded and checked."""
    r, d = ctx.recipe, ctx.data
    model = load_final_model(r, ctx.run_dir)
    out: dict[str, Any] = {}
    for enabled, name, quantize in ((r.export.prunekit, "model.pkt", None),
                                    (r.export.int8, "model_int8.pkt", "int8")):
        if enabled:
            data = dumps(model, quantize=quantize)
            loads(data)  # decodes and verifies every tensor before anything is written
            atomic_write_bytes(ctx.path(name), data)
            out[name] = {"bytes": len(data)}
    if r.export.onnx:
        exported = export_onnx(model, d.X_test[:8], ctx.path("model.onnx"))
        out["model.onnx"] = {"bytes": exported.bytes, "max_rel_error": exported.max_rel_error}
    for target in r.export.mobile:
        out[target.file_name] = _export_mobile(model, d, target.format, ctx.path(target.file_name))
    return out


def _export_mobile(model: nn.Module, data: Data, to: str, path: Path) -> dict[str, Any]:
    """One phone-runtime file through the ``prunekit export`` code path; its sizes and parity figures."""
    from .mobile_file import calibration_samples, export_mobile_file

    exported = export_mobile_file(model, data, to, path)
    return {"path": path.name, "runtime": exported.runtime, "quantize": exported.quantized,
            "bytes": exported.bytes, "gzip_bytes": exported.gzip_bytes, "max_rel_error": exported.max_rel_error,
            "fp32_rel_error": exported.fp32_rel_error, "calibration_samples": calibration_samples(data, to)}


def evaluate_stage(ctx: Context) -> dict[str, Any]:
    """Test metrics of the pruned model and of each exported prunekit file; writes ``results.json``."""
    r, d = ctx.recipe, ctx.data
    model = load_final_model(r, ctx.run_dir)
    results: dict[str, Any] = {"recipe": r.to_dict(), "run": ctx.run_dir.name,
                               "train_samples": len(d.X_train), "test_samples": len(d.X_test),
                               "pruned": evaluate(model, d.X_test, d.y_test),
                               "sparsity": sparsity_report(model).sparsity}
    marker = ctx.path("stages/prune-train.json")
    if r.stop_when is not None and marker.is_file():
        results["stop_when"] = json.loads(marker.read_text()).get("stop_when")
    for name in ("model.pkt", "model_int8.pkt"):
        if ctx.path(name).is_file():
            reloaded = build_model(r.model)
            reloaded.load_state_dict(loads(ctx.path(name).read_bytes()))
            results[name] = {"bytes": ctx.path(name).stat().st_size, **evaluate(reloaded, d.X_test, d.y_test)}
    for target in r.export.mobile:  # measured in the file's own runtime, one test sample per call
        if ctx.path(target.file_name).is_file():
            from ...formats.mobile import evaluate_mobile, mobile_file_info

            info = mobile_file_info(ctx.path(target.file_name))
            results[target.file_name] = {"runtime": info["runtime"], "bytes": info["bytes"],
                                         "gzip_bytes": info["gzip_bytes"],
                                         **evaluate_mobile(ctx.path(target.file_name), d.X_test, d.y_test)}
    atomic_write_json(ctx.path("results.json"), results)
    return {k: v for k, v in results.items() if k != "recipe"}


STAGES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "dense-train": dense_train,
    "prune-train": prune_train,
    "export": export,
    "evaluate": evaluate_stage,
}


def run_stage(name: str, ctx: Context) -> dict[str, Any]:
    """Run one stage deterministically (seeded, one thread); adds ``seconds`` to its result.

    Example:
        >>> run_stage("evaluate", Context(recipe, run_dir, data, progress=False))["pruned"]  # doctest: +SKIP
    """
    started = time.perf_counter()
    with seeded(ctx.recipe.training.seed):
        result = STAGES[name](ctx)
    return {**result, "seconds": round(time.perf_counter() - started, 3)}
