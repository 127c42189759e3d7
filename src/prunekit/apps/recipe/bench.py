"""``prunekit bench RUN_DIR|--recipe R.yaml [--batch 1 64] [--out FILE]``: latency, dense vs accelerated.

The run's final model (stripped, exact zeros) is timed with dense kernels and
after :func:`prunekit.runtime.accelerate` (which swaps in sparse kernels where
they measure faster), interleaved in one process so that machine noise hits
both alike; the median of ``rounds`` rounds counts. Latencies vary from run to
run; only the side-by-side ratio is meaningful.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["bench_command", "bench_model", "format_bench"]


def bench_model(model: nn.Module, example: torch.Tensor, batches: list[int], *, rounds: int = 7,
                calls: int = 10) -> list[dict[str, Any]]:
    """Median forward latency (ms) of ``model`` dense and accelerated, for each batch size.

    ``example`` supplies samples (repeated if a batch needs more than it has).

    Example:
        >>> net = nn.Sequential(nn.Linear(32, 32))
        >>> rows = bench_model(net, torch.randn(4, 32), [2], rounds=1, calls=1)
        >>> sorted(rows[0])
        ['accelerated_ms', 'batch', 'dense_ms', 'formats', 'speedup', 'threads']
    """
    from ...runtime import accelerate

    model.eval()
    rows = []
    for batch in batches:
        reps = -(-batch // len(example))
        x = example.repeat(reps, *([1] * (example.dim() - 1)))[:batch]
        fast, report = accelerate(model, x, progress=False)
        times: dict[str, list[float]] = {"dense": [], "accelerated": []}
        with torch.inference_mode():
            model(x), fast(x)  # warm-up: first calls pay for allocation and kernel selection
            for i in range(2 * rounds):  # interleaved
                name, net = (("dense", model), ("accelerated", fast))[i % 2]
                start = time.perf_counter()
                for _ in range(calls):
                    net(x)
                times[name].append((time.perf_counter() - start) / calls * 1e3)
        dense, accel = statistics.median(times["dense"]), statistics.median(times["accelerated"])
        rows.append({"batch": batch, "threads": torch.get_num_threads(), "dense_ms": dense, "accelerated_ms": accel,
                     "speedup": dense / accel, "formats": report.choices})
    return rows


def format_bench(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`bench_model` as a text table.

    Example:
        >>> print(format_bench([{"batch": 1, "threads": 1, "dense_ms": 2.0, "accelerated_ms": 1.0, "speedup": 2.0,
        ...                      "formats": {"fc1": "csr"}}]))
        batch  threads  dense ms  accelerated ms  speedup  sparse layers
            1        1     2.000           1.000    2.00x  fc1 (csr)
    """
    lines = ["batch  threads  dense ms  accelerated ms  speedup  sparse layers"]
    for r in rows:
        sparse = ", ".join(f"{k} ({v})" for k, v in r["formats"].items() if v != "dense") or "none"
        lines.append(f"{r['batch']:>5}  {r['threads']:>7}  {r['dense_ms']:>8.3f}  {r['accelerated_ms']:>14.3f}  "
                     f"{r['speedup']:>6.2f}x  {sparse}")
    return "\n".join(lines)


def bench_command(run_dir: Path | None, recipe: Path | None, runs: Path, batches: list[int], *, rounds: int = 7,
                  out: Path | None = None) -> int:
    """Time the final model of a run (``run_dir``, or ``recipe``'s run under ``runs``), print the table; exit code.

    ``out`` also receives the rows as JSON.

    Example:
        >>> bench_command(Path("runs/demo-3f2a9c0b1d4e"), None, Path("runs"), [1, 64])  # doctest: +SKIP
        0
    """
    from ..._io import atomic_write_json
    from .build import load_data
    from .run import resolve_run
    from .stages import load_final_model

    config, run = resolve_run(run_dir, recipe, runs)
    if out is not None and out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file name")
    model = load_final_model(config, run)
    rows = bench_model(model, load_data(config.data).X_test[:64], batches, rounds=rounds)
    print(f"{run.name}: {config.model.factory}")
    print(format_bench(rows))
    if out is not None:
        atomic_write_json(out, {"run": run.name, "model": config.model.factory, "rows": rows})
        print(f"wrote {out}")
    return 0
