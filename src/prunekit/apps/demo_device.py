"""``prunekit demo --device``: the demo CNN on the phone runtimes, dense vs structurally pruned.

1. Train the dense LeNet-5 exactly as ``prunekit demo`` does (same data, epochs, optimizer, seed).
2. Remove ``removed`` (default 50%) of every coupled channel group with :class:`prunekit.StructuredPruner`
   (L2 importance, one mask at step 0), fine-tune with the masks held, then remove the channels.
3. Export both models, fp32 and int8 (PT2E, calibrated on the first 256 training digits), to an
   ExecuTorch ``.pte`` (XNNPACK) and a LiteRT ``.tflite`` through the ``prunekit export`` code path
   (each file checked against torch in its runtime before it is written).
4. Measure in each runtime: test accuracy and loss (the file run on every test digit, batch 1),
   file size raw and gzipped, and latency at batch 1 on one thread, dense and pruned timed in turn.

Writes ``results.json``, ``results.md`` and the files into the output directory. tfmot's published
figures for its pruning + post-training quantization tutorial are printed beside ours: they are
quoted from its page, not measured here, and come from another CNN on full MNIST.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write_bytes, atomic_write_json
from .._repro import seeded
from .._validate import check_int, check_sparsity
from ..methods.structural import StructuredPruner
from ..training.loop import evaluate, train
from .demo import FULL, QUICK, DemoConfig, _check_out, _load_data, _phase_seed, _train_dense
from .models import LeNet5

__all__ = ["DeviceDemoConfig", "DEVICE_FULL", "DEVICE_QUICK", "TFMOT_PUBLISHED", "run_device_demo",
           "format_device_table"]

_STRUCTURED_PHASE = 2  # the demo's phases are 0 (dense) and 1 (fine-tune while pruning)
_SUFFIX = {"executorch": ".pte", "litert": ".tflite"}

TFMOT_PUBLISHED = {
    "source": "https://www.tensorflow.org/model_optimization/guide/pruning/pruning_with_keras",
    "recipe": "Keras CNN (Conv2D 12 filters 3x3, max-pool, Dense 10) on full MNIST; magnitude pruning 50% -> 80% "
              "sparsity (unstructured, PolynomialDecay) during 2 epochs of fine-tuning; TFLite converter with "
              "Optimize.DEFAULT (post-training quantization); sizes zipped",
    "claims": ["3x smaller TF and TFLite models from pruning",
               "10x smaller TFLite model from combining pruning and post-training quantization"],
    "note": "published by tfmot, not measured here; the zeros only shrink the zipped file, the TFLite "
            "interpreter still runs the dense-shaped layers",
}


@dataclass(frozen=True)
class DeviceDemoConfig:
    """One device-demo variant.

    Attributes:
        demo: the :class:`~prunekit.apps.demo.DemoConfig` whose data and dense training are reused.
        finetune_epochs: epochs of fine-tuning with the channel masks held.
        precisions: ``"fp32"`` and/or ``"int8"``.
        latency_reps: interleaved timing repetitions per (runtime, precision).
    """

    demo: DemoConfig
    finetune_epochs: int
    precisions: tuple[str, ...] = ("fp32", "int8")
    latency_reps: int = 15


DEVICE_FULL = DeviceDemoConfig(FULL, finetune_epochs=5)
# Seconds of training and four exports (int8 only): every stage runs, for tests.
DEVICE_QUICK = DeviceDemoConfig(QUICK, finetune_epochs=1, precisions=("int8",), latency_reps=3)


def run_device_demo(out: str | os.PathLike[str], *, seed: int = 0, removed: float = 0.5, quick: bool = False,
                    progress: bool | None = None) -> dict[str, Any]:
    """Train, structurally prune, export to ExecuTorch and LiteRT, measure in each runtime; write and print.

    Args:
        out: output directory (created if missing).
        seed: non-negative seed of initialisation and batch orders (the split is the demo's).
        removed: fraction of every channel group removed, in [0, 1).
        quick: the small :data:`DEVICE_QUICK` variant (tests).
        progress: tqdm bars while training (``None``: only on a terminal).

    Returns:
        The dict written to ``results.json``: ``torch`` (accuracies, parameter counts), ``rows`` (one per
        runtime, model and precision: file, bytes, gzip_bytes, accuracy and loss in the runtime, latency_ms,
        speedup of pruned over dense), ``tfmot`` (published figures), ``seed``, ``config``, ``seconds``.

    Raises:
        ImportError: neither ExecuTorch nor LiteRT is installed (the message gives the pip commands).
        ValueError, TypeError: an invalid argument.

    Example:
        >>> results = run_device_demo("runs/demo-device")  # doctest: +SKIP
        >>> [r["speedup"] for r in results["rows"] if r["model"] == "pruned"]  # doctest: +SKIP
    """
    from ..formats import mobile

    started = time.perf_counter()
    seed = check_int("run_device_demo", "seed", seed, minimum=0)
    removed = check_sparsity("run_device_demo", "removed", removed)
    if not isinstance(quick, bool):
        raise TypeError(f"run_device_demo: quick must be a bool, got {type(quick).__name__} {quick!r}")
    runtimes = [r for r in _SUFFIX if mobile.runtime_available(r)]
    if not runtimes:
        raise ImportError(f"run_device_demo: needs ExecuTorch or LiteRT; install with: {mobile.EXECUTORCH_INSTALL}; "
                          f"{mobile.LITERT_INSTALL}")
    out = _check_out(out)
    config = DEVICE_QUICK if quick else DEVICE_FULL
    with seeded(seed):
        data, models, reference = _train_both(config, seed, removed, progress)
    rows = [row for runtime in runtimes for precision in config.precisions
            for row in _measure(runtime, precision, models, data, out, config.latency_reps)]
    results = {"model": "LeNet5", "dataset": "mnist5k", "removed": removed, "config": asdict(config),
               "train_samples": len(data.X_train), "test_samples": len(data.X_test), "torch": reference,
               "batch": 1, "threads": 1, "load_average": list(os.getloadavg()), "rows": rows,
               "missing_runtimes": [r for r in _SUFFIX if r not in runtimes], "tfmot": TFMOT_PUBLISHED,
               "seed": seed, "quick": quick, "seconds": round(time.perf_counter() - started, 3)}
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", (format_device_table(results) + "\n").encode())
    print(format_device_table(results))
    print(f"\nwrote results.json, results.md and {len(rows)} files to {out} in {results['seconds']:.1f} s")
    return results


def _train_both(config: DeviceDemoConfig, seed: int, removed: float,
                progress: bool | None) -> tuple[Any, dict[str, nn.Module], dict[str, Any]]:
    """The demo's dense LeNet-5 and its structurally pruned copy, with their torch test metrics."""
    data = _load_data(config.demo)
    dense = LeNet5()
    dense_metrics = _train_dense(dense, data, config.demo, seed, progress)
    pruned = copy.deepcopy(dense)
    optimizer = torch.optim.Adam(pruned.parameters(), lr=config.demo.lr)
    pruner = StructuredPruner(pruned, data.X_train[:1], removed, optimizer=optimizer)
    train(pruned, data.X_train, data.y_train, epochs=config.finetune_epochs, batch_size=config.demo.batch_size,
          optimizer=optimizer, seed=_phase_seed(seed, _STRUCTURED_PHASE), progress=progress,
          desc="structured+finetune")
    pruned, _ = pruner.finalize()
    models = {"dense": dense.eval(), "pruned": pruned.eval()}
    reference = {name: {"params": sum(p.numel() for p in m.parameters()), **evaluate(m, data.X_test, data.y_test)}
                 for name, m in models.items()}
    reference["dense"]["accuracy"] = dense_metrics["accuracy"]  # the same number, as `prunekit demo` reports it
    return data, models, reference


def _measure(runtime: str, precision: str, models: dict[str, nn.Module], data: Any, out: Path,
             reps: int) -> list[dict[str, Any]]:
    """Export dense and pruned to ``runtime`` at ``precision``; size, accuracy and interleaved latency of each."""
    from ..formats.mobile import evaluate_mobile, interleaved_latency, load_mobile
    from .recipe.mobile_file import calibration_samples, export_mobile_file

    to = runtime + ("-int8" if precision == "int8" else "")
    rows, runs = [], {}
    for name, model in models.items():
        path = out / f"{name}{'_int8' if precision == 'int8' else ''}{_SUFFIX[runtime]}"
        exported = export_mobile_file(model, data, to, path)
        rows.append({"runtime": runtime, "model": name, "precision": precision, "file": path.name,
                     "params": sum(p.numel() for p in model.parameters()), "bytes": exported.bytes,
                     "gzip_bytes": exported.gzip_bytes, "max_rel_error": exported.max_rel_error,
                     "fp32_rel_error": exported.fp32_rel_error, "calibration_samples": calibration_samples(data, to),
                     **evaluate_mobile(path, data.X_test, data.y_test)})
        runs[name] = load_mobile(path, threads=1)
    times = interleaved_latency(runs, [data.X_test[:1]], reps=reps)
    for row in rows:
        mine = times[row["model"]]
        row["latency_ms"] = statistics.median(mine)
        row["latency_spread_ms"] = [min(mine), max(mine)]
        row["speedup"] = statistics.median(d / t for d, t in zip(times["dense"], mine))
    return rows


def format_device_table(results: dict[str, Any]) -> str:
    """The Markdown table of a :func:`run_device_demo` result, with tfmot's published figures below it.

    Example:
        >>> print(format_device_table(run_device_demo("runs/demo-device", quick=True)))  # doctest: +SKIP
    """
    t = results["torch"]
    lines = [f"LeNet-5 on MNIST-5k ({results['train_samples']:,} train / {results['test_samples']:,} test digits), "
             f"{results['removed']:.0%} of its channels removed (StructuredPruner), seed {results['seed']}"
             f"{', quick' if results.get('quick') else ''}; torch accuracy dense {t['dense']['accuracy']:.2%}, "
             f"pruned {t['pruned']['accuracy']:.2%}; parameters {t['dense']['params']:,} -> {t['pruned']['params']:,}",
             "", "| runtime | model | precision | file KiB | gzip KiB | accuracy in runtime | latency ms (batch 1, "
             "1 thread) | speedup vs dense |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['runtime']} | {r['model']} | {r['precision']} | {r['bytes'] / 1024:.1f} | "
                     f"{r['gzip_bytes'] / 1024:.1f} | {r['accuracy']:.2%} | {r['latency_ms']:.4f} | "
                     f"{r['speedup']:.2f}x |")
    tf = results["tfmot"]
    lines += ["", f"Load average {results['load_average'][0]:.1f} (the machine may be shared: compare latencies "
              "within a runtime and precision).",
              f"tfmot, published (not measured here; {tf['source']}): {tf['recipe']}: "
              + "; ".join(tf["claims"]) + f" ({tf['note']})."]
    if results["missing_runtimes"]:
        lines.append(f"not installed, skipped: {', '.join(results['missing_runtimes'])}")
    return "\n".join(lines)
