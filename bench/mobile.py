"""Phone runtimes: file size and latency of structurally pruned models in ExecuTorch and LiteRT.

Neither ExecuTorch's XNNPACK delegate nor LiteRT exploits zeros inside a weight tensor, so the
models here are made smaller for real: :class:`prunekit.StructuredPruner` removes 0%, 30% and 50%
of every coupled channel group (L2 importance, one mask, then ``finalize``). Two models:

* the demo CNN (LeNet-5 on MNIST-5k), trained 2 epochs (seed 0), each pruned variant fine-tuned
  1 epoch with its masks held by the pruner; accuracy on the 1,000 test digits is measured in the
  runtime itself, one digit per call;
* a MobileNet-like net (stem + 5 depthwise-separable blocks, 32-256 channels, BatchNorm, ReLU6,
  96x96 RGB input), random weights and BatchNorm statistics.

Each variant is exported fp32 and int8 (PT2E, symmetric per-channel weights, activations
calibrated on 256 digits, or 32 random images for the random-weight MobileNet) with :func:`prunekit.export_executorch` (``.pte``, XNNPACK) and
:func:`prunekit.export_litert` (``.tflite``), each file checked against torch in its runtime by
the exporter. Latency: batch 1, one thread in both runtimes, the file loaded from its bytes;
each repetition times every variant of a (model, runtime, precision) in turn (interleaved, so
load from other processes hits all alike), and the speedup is the median over repetitions of
``t_unpruned / t_pruned``. The machine is shared: the load average is written beside the times.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunekit import StructuredPruner
from prunekit._io import atomic_write_json
from prunekit.formats import mobile

SEED = 0
FRACTIONS = (0.0, 0.3, 0.5)
RUNTIMES = ("executorch", "litert")
PRECISIONS = (None, "int8")


def _dw_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


def mobilenet_like(num_classes: int = 10) -> nn.Module:
    """Stem conv (32, stride 2) and depthwise-separable blocks 64, 128/2, 128, 256/2, 256; pooled linear head."""
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
    for cin, cout, stride in ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)):
        layers.append(_dw_block(cin, cout, stride))
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _epoch(model: nn.Module, X: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    model.train()
    for i in torch.randperm(len(X)).split(64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[i]), y[i]).backward()
        opt.step()
    model.eval()


def _prune(model: nn.Module, example: torch.Tensor, fraction: float,
           finetune: Callable[[nn.Module, torch.optim.Optimizer], None] | None) -> nn.Module:
    """A copy of ``model`` with ``fraction`` of every channel group removed (fine-tuned with masks held)."""
    import copy

    model = copy.deepcopy(model)
    if fraction == 0.0:
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if finetune else None
    pruner = StructuredPruner(model, example, fraction, optimizer=opt)
    pruner.update_masks(fraction)
    if finetune:
        finetune(model, opt)
    return pruner.finalize()[0].eval()


def _lenet_variants() -> tuple[dict[float, nn.Module], dict[str, torch.Tensor]]:
    from prunekit.apps.models import LeNet5
    from prunekit.training.data import load_mnist5k

    torch.manual_seed(SEED)
    X, y = load_mnist5k("train")
    X_test, y_test = load_mnist5k("test")
    dense = LeNet5()
    opt = torch.optim.Adam(dense.parameters(), lr=2e-3)
    for _ in range(2):
        _epoch(dense, X, y, opt)
    variants = {f: _prune(dense, X[:1], f, lambda m, o: _epoch(m, X, y, o)) for f in FRACTIONS}
    return variants, {"example": X[:1], "calibration": X[:256], "X_test": X_test, "y_test": y_test}


def _mobilenet_variants() -> tuple[dict[float, nn.Module], dict[str, torch.Tensor]]:
    torch.manual_seed(SEED)
    dense = mobilenet_like()
    example = torch.rand(1, 3, 96, 96)
    variants = {f: _prune(dense, example, f, None) for f in FRACTIONS}
    return variants, {"example": example, "calibration": torch.rand(32, 3, 96, 96)}  # random weights: ranges only


def _accuracy(run: Callable, X: torch.Tensor, y: torch.Tensor) -> float:
    predicted = torch.tensor([int(torch.as_tensor(run([X[i:i + 1]])[0]).argmax()) for i in range(len(X))])
    return float((predicted == y).float().mean())


def _time(run: Callable, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run([x])
    return (time.perf_counter() - start) / calls


def _export_all(name: str, variants: dict[float, nn.Module], data: dict[str, torch.Tensor], out: Path,
                runtime: str, quantize: str | None) -> tuple[list[dict[str, Any]], dict[float, Callable]]:
    export = mobile.export_executorch if runtime == "executorch" else mobile.export_litert
    load = mobile.load_executorch if runtime == "executorch" else mobile.load_litert
    rows, runs = [], {}
    for fraction, model in variants.items():
        suffix = ".pte" if runtime == "executorch" else ".tflite"
        path = out / "mobile" / f"{name}_{int(fraction * 100)}_{quantize or 'fp32'}{suffix}"
        started = time.perf_counter()
        result = export(model, data["example"], path, quantize=quantize,
                        calibration=data["calibration"] if quantize else None)
        runs[fraction] = load(path, threads=1)
        row = {"model": name, "removed": fraction, "runtime": runtime, "precision": quantize or "fp32",
               "params": sum(p.numel() for p in model.parameters()), "bytes": result.bytes,
               "gzip_bytes": result.gzip_bytes, "rel_error": result.max_rel_error,
               "fp32_rel_error": result.fp32_rel_error, "export_s": round(time.perf_counter() - started, 1)}
        if "X_test" in data:
            row["accuracy"] = _accuracy(runs[fraction], data["X_test"], data["y_test"])
        rows.append(row)
    return rows, runs


def _latencies(rows: list[dict[str, Any]], runs: dict[float, Callable], x: torch.Tensor, reps: int) -> None:
    """Interleaved timing of every variant; ``latency_ms`` (median) and ``speedup`` (median of ratios) per row."""
    calls = max(1, int(0.05 / max(_time(runs[0.0], x, 3), 1e-6)))  # ~50 ms per timing
    samples: dict[float, list[float]] = {f: [] for f in runs}
    for _ in range(reps):
        for fraction, run in runs.items():
            samples[fraction].append(_time(run, x, calls))
    for row in rows:
        times = samples[row["removed"]]
        row["latency_ms"] = round(statistics.median(times) * 1e3, 4)
        row["latency_spread_ms"] = [round(min(times) * 1e3, 4), round(max(times) * 1e3, 4)]
        ratios = [d / t for d, t in zip(samples[0.0], times)]
        row["speedup"] = round(statistics.median(ratios), 3)


def run(out: Path, quick: bool) -> str:
    """Write ``out/mobile.json`` (and the files under ``out/mobile/``); return the Markdown section."""
    missing = [r for r in RUNTIMES if not mobile.runtime_available(r)]
    runtimes = [r for r in RUNTIMES if r not in missing]
    if not runtimes:
        return f"## mobile\n\nskipped: neither runtime installed ({mobile.EXECUTORCH_INSTALL}; {mobile.LITERT_INSTALL})\n"
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name, build in (("lenet5_mnist", _lenet_variants), ("mobilenet_like", _mobilenet_variants)):
        variants, data = build()
        for runtime in runtimes:
            for quantize in PRECISIONS:
                part, runs = _export_all(name, variants, data, out, runtime, quantize)
                _latencies(part, runs, data["example"], 5 if quick else 15)
                rows += part
                result = {"seed": SEED, "threads": 1, "batch": 1, "load_average_before": load_before,
                          "load_average_after": os.getloadavg(), "missing_runtimes": missing, "rows": rows}
                atomic_write_json(out / "mobile.json", result)  # after every part: an interrupted run keeps its rows
    return _markdown(result)


def _markdown(result: dict[str, Any]) -> str:
    lines = ["## mobile: structurally pruned models in ExecuTorch (XNNPACK) and LiteRT", "",
             f"Batch 1, 1 thread, median of interleaved repetitions; load average "
             f"{result['load_average_before'][0]:.1f} before, {result['load_average_after'][0]:.1f} after.", "",
             "| model | removed | runtime | precision | params | file KiB | gzip KiB | latency ms | speedup "
             "| accuracy | rel. error |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "–"
        lines.append(f"| {r['model']} | {r['removed']:.0%} | {r['runtime']} | {r['precision']} | {r['params']:,} | "
                     f"{r['bytes'] / 1024:.1f} | {r['gzip_bytes'] / 1024:.1f} | {r['latency_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {acc} | {r['rel_error']:.1e} |")
    if result["missing_runtimes"]:
        lines += ["", f"not installed, skipped: {', '.join(result['missing_runtimes'])}"]
    return "\n".join(lines)
