"""Training-step time with a Pruner attached vs without, on the demo CNN and on an MLP.

Both models start from the same weights and see the same batches. Timing is
interleaved (a block of steps for one, then a block for the other, repeated)
so machine noise hits both alike, in the same process. The pruned run uses the
demo's schedule shape (PolynomialDecay 0.5 -> 0.8, an update every 100 steps
over the whole timed run), so the headline ratio is of *total* time: the mask
updates are periodic, and a median over blocks would leave them out. The
ratio of block medians is reported beside it as the cost between updates.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import prunekit
from prunekit._io import atomic_write_json
from prunekit.apps.models import LeNet5, LeNet300100

BATCH_SIZES = (64, 256)


def _make_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _time_block(step: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def measure(factory: Callable[[], nn.Module], batch: int, *, blocks: int, block_steps: int) -> dict:
    """Median step time (s) without and with a Pruner, and their ratio."""
    torch.manual_seed(0)
    dense = factory()
    pruned = copy.deepcopy(dense)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    opt_d = torch.optim.Adam(dense.parameters(), lr=1e-3)
    opt_p = torch.optim.Adam(pruned.parameters(), lr=1e-3)
    schedule = prunekit.PolynomialDecay(0.5, 0.8, begin_step=0, end_step=blocks * block_steps, frequency=100)
    prunekit.Pruner(pruned, schedule, optimizer=opt_p)
    steps = {"dense": _make_step(dense, opt_d, x, y), "pruned": _make_step(pruned, opt_p, x, y)}
    for step in steps.values():  # warm-up: allocator, thread pool, first mask update
        _time_block(step, 5)
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    for i in range(blocks):
        order = ("dense", "pruned") if i % 2 == 0 else ("pruned", "dense")
        for name in order:
            times[name].append(_time_block(steps[name], block_steps))
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"dense_ms": mean["dense"] * 1e3, "pruned_ms": mean["pruned"] * 1e3, "ratio": mean["pruned"] / mean["dense"],
            "median_ratio": med["pruned"] / med["dense"], "mask_updates": blocks * block_steps // 100 + 1}


def run(out: Path, quick: bool) -> str:
    """Run the benchmark, write ``out/train_step.json``, return a Markdown section."""
    blocks, block_steps = (4, 10) if quick else (30, 20)
    models = {"LeNet-5 (demo CNN)": LeNet5, "LeNet-300-100 (MLP)": LeNet300100}
    rows = []
    for label, factory in models.items():
        for batch in BATCH_SIZES:
            r = measure(factory, batch, blocks=blocks, block_steps=block_steps)
            rows.append({"model": label, "batch": batch, **r})
    atomic_write_json(out / "train_step.json", {"blocks": blocks, "block_steps": block_steps, "rows": rows})
    lines = [
        "## Training-step overhead of a Pruner (Adam, PolynomialDecay 0.5→0.8, update every 100 steps)",
        "",
        f"{blocks} interleaved blocks of {block_steps} steps each; ms/step and ratio = pruned / dense over the total "
        "time, mask updates included (goal ≤ 1.05); median ratio = between updates.",
        "",
        "| model | batch | dense ms/step | pruned ms/step | ratio | median ratio | mask updates |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['batch']} | {r['dense_ms']:.3f} | {r['pruned_ms']:.3f} | {r['ratio']:.3f} | "
              f"{r['median_ratio']:.3f} | {r['mask_updates']} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(run(Path("runs/bench"), quick=True), indent=2))
