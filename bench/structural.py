"""Structural pruning: measured CPU speedup against MAC reduction, for a ResNet-18-style CNN.

A CIFAR-style ResNet-18 (4 stages of 2 basic blocks, residual additions with
1x1 downsample shortcuts, 32x32 inputs) at 3/8 width (24-48-96-192
channels), random weights and BatchNorm statistics, is pruned one-shot with
:func:`prunekit.methods.structural.prune_channels` (L2 importance) removing 25%, 50%
and 75% of the units of every coupled group, with ``round_to`` 1, 8 and
16. MACs are counted by :func:`prunekit.methods.structural.count_macs`
(convolutions and the linear head). A forward runs in eval mode under
``torch.inference_mode`` with one intra-op thread, at batch 1 and batch 32.
Wall-clock speedup is the median, over repetitions, of ``t_dense / t_pruned``
where each pruned forward is timed right after a dense one (interleaved, so
load from other processes cancels); ``efficiency = speedup / MAC reduction``.
Each comparison is made twice: on the models as they are (NCHW), and as
one would deploy them, with every BatchNorm folded into its convolution
(``torch.fx.experimental.optimization.fuse``) and ``channels_last`` memory
format, applied to dense and pruned models alike. BatchNorm, ReLU and
additions cost time linear in the width while convolutions shrink
quadratically, and per-op overhead does not shrink at all, so efficiency falls
as more is removed and at batch 1.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from prunekit._io import atomic_write_json
from prunekit.methods.structural import count_macs, count_params, prune_channels

SEED = 0
WIDTH = 24
FRACTIONS = (0.25, 0.5, 0.75)
ROUND_TO = (1, 8, 16)
BATCHES = (1, 32)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual addition (1x1 conv-BN shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs with stage widths ``width * (1, 2, 4, 8)``."""

    def __init__(self, width: int = WIDTH, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _model() -> nn.Module:
    torch.manual_seed(SEED)
    model = ResNet18(WIDTH)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.0)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _timings(dense: nn.Module, models: dict[str, nn.Module], x: torch.Tensor, reps: int,
             inner: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per forward, and the median of paired speedups ``t_dense / t_model``.

    Every repetition times each model right after a fresh timing of ``dense``,
    so each speedup compares two runs a few milliseconds apart: load from other
    processes, which drifts over seconds, cancels in the ratio.
    """
    def clock(model: nn.Module) -> float:
        start = time.perf_counter()
        for _ in range(inner):
            model(x)
        return (time.perf_counter() - start) / inner

    samples: dict[str, list[float]] = {name: [] for name in ("dense", *models)}
    ratios: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in (dense, *models.values()):  # warm-up: oneDNN primitive creation, caches
            for _ in range(2):
                model(x)
        for _ in range(reps):
            for name, model in models.items():
                base, mine = clock(dense), clock(model)
                samples["dense"].append(base)
                samples[name].append(mine)
                ratios[name].append(base / mine)
    median = statistics.median
    return {n: median(v) for n, v in samples.items()}, {n: median(v) for n, v in ratios.items()}


MODES = ("as pruned", "BN folded, channels_last")


def _variants(example: torch.Tensor) -> tuple[dict[str, nn.Module], list[dict]]:
    dense = _model()
    models, rows = {"dense": dense}, []
    for round_to in ROUND_TO:
        for fraction in FRACTIONS:
            pruned, report = prune_channels(copy.deepcopy(dense), example, fraction, round_to=round_to)
            name = f"{fraction:.0%} removed, round_to={round_to}"
            models[name] = pruned.eval()
            rows.append({"name": name, "fraction": fraction, "round_to": round_to,
                         "params": count_params(pruned), "macs_per_image": report.macs_after,
                         "mac_reduction": report.mac_reduction})
    return models, rows


def _check_output_shapes(models: dict[str, nn.Module], x: torch.Tensor) -> None:
    # The pruned models must still run and keep the output shape; their values differ (channels removed).
    with torch.inference_mode():
        shapes = {tuple(m(x).shape) for m in models.values()}
    if len(shapes) != 1:
        raise RuntimeError(f"pruned models disagree on the output shape: {shapes}")


def run(out: Path, quick: bool) -> str:
    """Measure, write ``out/structural.json`` atomically and return a Markdown section.

    Timings use one intra-op thread: on a shared 2-core machine, two threads
    make the same model's time swing by 2x between repetitions.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, quick)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, quick: bool) -> str:
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
    models, rows = _variants(example)
    _check_output_shapes(models, example)
    dense_macs = count_macs(models["dense"], example)
    result = {"model": f"ResNet-18 (CIFAR layout, width {WIDTH})", "input": [3, 32, 32], "threads":
              torch.get_num_threads(), "dense_params": count_params(models["dense"]), "dense_macs_per_image":
              dense_macs, "quick": quick, "variants": rows, "timings": {}}
    folded = {name: fuse(copy.deepcopy(m)).to(memory_format=torch.channels_last) for name, m in models.items()}
    for batch in BATCHES:
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        reps, inner = (3, 1) if quick else ((20, 5) if batch == 1 else (20, 1))
        entry = result["timings"][str(batch)] = {"reps": reps, "calls_per_rep": inner}
        for mode, pool in zip(MODES, (models, folded)):
            pruned = {name: m for name, m in pool.items() if name != "dense"}
            batch_x = x.to(memory_format=torch.channels_last) if pool is folded else x
            seconds, speedups = _timings(pool["dense"], pruned, batch_x, reps, inner)
            entry[mode] = {"median_seconds": seconds, "median_paired_speedup": speedups}
            for row in rows:
                row.setdefault(mode, {})[f"speedup_b{batch}"] = speedups[row["name"]]
                row[mode][f"efficiency_b{batch}"] = speedups[row["name"]] / row["mac_reduction"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "structural.json", result)
    return _markdown(result)


def _markdown(result: dict) -> str:
    seconds = {b: {mode: result["timings"][b][mode]["median_seconds"]["dense"] for mode in MODES} for b in ("1", "32")}
    lines = [
        "## Structural pruning: speedup vs MAC reduction",
        "",
        f"{result['model']}, {result['dense_params']:,} parameters, {result['dense_macs_per_image'] / 1e6:.1f} M "
        f"MACs per 32x32 image; dense forward {seconds['1'][MODES[0]] * 1e3:.2f} ms at batch 1, "
        f"{seconds['32'][MODES[0]] * 1e3:.1f} ms at batch 32 ({seconds['32'][MODES[1]] * 1e3:.1f} ms "
        f"with BN folded, channels_last); {result['threads']} thread(s), eval, inference_mode; speedup = median over "
        f"repetitions of t_dense / t_pruned timed back to back"
        f"{', QUICK run' if result['quick'] else ''}. Efficiency = speedup / MAC reduction.",
        "",
        "| channels removed | round_to | params | MAC reduction | models | speedup b=1 | efficiency b=1 "
        "| speedup b=32 | efficiency b=32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["variants"]:
        for mode in MODES:
            m = r[mode]
            lines.append(f"| {r['fraction']:.0%} | {r['round_to']} | {r['params']:,} | {r['mac_reduction']:.2f}x "
                         f"| {mode} | {m['speedup_b1']:.2f}x | {m['efficiency_b1']:.2f} | {m['speedup_b32']:.2f}x "
                         f"| {m['efficiency_b32']:.2f} |")
    return "\n".join(lines)
