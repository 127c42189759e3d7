"""Sparse inference on CPU: torch dense vs torch CSR vs ``prunekit.accelerate`` on BERT-FFN-4.

Workload (DESIGN.md §6): four blocks of Linear(768→3072)–ReLU–Linear(3072→768)–ReLU,
fp32, magnitude-pruned layer-wise (``prunekit.Pruner(model, s)`` then
``prunekit.strip``) at each sparsity, batch 1 and 64, under ``torch.inference_mode()``.

- **dense**: the stripped model as is (the oracle).
- **torch CSR**: what a user writes with plain torch: each weight as
  ``weight.to_sparse_csr()`` and ``torch.sparse.mm(W, x.T).T + b``.
- **accelerate**: ``prunekit.accelerate(model, x)`` with x of the measured batch;
  it times dense/CSR/BSR per layer and keeps the fastest.

The three run side by side in one process, interleaved (one forward of each per
round, rotating order) and the median per variant is reported; ratios are
dense time / variant time (> 1 is faster than dense). Every variant's output is
checked against dense (max relative error). Seed 0.
"""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import prunekit
from prunekit._io import atomic_write_json
from prunekit.runtime.selection import relative_error

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BATCHES = (1, 64)
SEED = 0
FULL_REPEATS, QUICK_REPEATS = 60, 5
VARIANTS = ("dense", "torch_csr", "accelerate")


def bert_ffn4() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(768, 3072), nn.ReLU(), nn.Linear(3072, 768), nn.ReLU()]
    return nn.Sequential(*layers)


class TorchCSRLinear(nn.Module):
    """The plain-torch baseline: ``torch.sparse.mm`` with a CSR weight (int64 indices)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.weight, x.t()).t() + self.bias


def torch_csr(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[TorchCSRLinear(m) if isinstance(m, nn.Linear) else m for m in model])


def _time(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            models[n](x)
            models[n](x)
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0 = time.perf_counter_ns()
                models[n](x)
                samples[n].append((time.perf_counter_ns() - t0) / 1e6)
    return {n: statistics.median(v) for n, v in samples.items()}


def _row(sparsity: float, batch: int, repeats: int) -> dict:
    torch.manual_seed(SEED)
    dense = bert_ffn4().eval()
    prunekit.Pruner(dense, sparsity)
    prunekit.strip(dense)
    x = torch.randn(batch, 768, generator=torch.Generator().manual_seed(SEED + batch))
    fast, report = prunekit.accelerate(dense, x, repeats=max(repeats // 2, 3), progress=False)
    models = {"dense": dense, "torch_csr": torch_csr(dense), "accelerate": fast}
    with torch.inference_mode():
        ref = dense(x)
        errors = {n: relative_error(m(x), ref) for n, m in models.items()}
    ms = _time(models, x, repeats)
    return {
        "sparsity": sparsity, "batch": batch, "ms": ms,
        "ratio_vs_dense": {n: ms["dense"] / ms[n] for n in VARIANTS},
        "max_relative_error": errors,
        "accelerate_choices": dict(Counter(report.choices.values())),
        "accelerate_report": report.to_dict(),
    }


def run(out: Path, quick: bool) -> str:
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    sparsities = (0.9,) if quick else SPARSITIES
    rows = []
    for batch in BATCHES:
        for s in sparsities:
            rows.append(_row(s, batch, repeats))
            r = rows[-1]
            print(f"  batch {batch:>2} sparsity {s:.0%}: " + ", ".join(
                f"{n} {r['ms'][n]:.3f} ms" for n in VARIANTS), flush=True)
    atomic_write_json(out / "runtime.json", {
        "workload": "BERT-FFN-4 (4x Linear 768-3072-768 + ReLU), fp32, layer-wise magnitude pruning",
        "seed": SEED, "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "quick": quick, "rows": rows,
    })
    lines = [
        "## runtime: sparse inference, BERT-FFN-4\n",
        f"fp32, {torch.get_num_threads()} threads, `torch.inference_mode()`, median of {repeats} interleaved "
        "forwards per variant; ratio = dense time / variant time (>1 = faster than dense). "
        "torch CSR = `torch.sparse.mm(W_csr, x.T).T + b`; accelerate = `prunekit.accelerate` (per-layer "
        "choice among dense/CSR/BSR, timed on this machine).\n",
        "| batch | sparsity | dense ms | torch CSR ms (×) | accelerate ms (×) | accelerate layers | max rel err |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        ms, x = r["ms"], r["ratio_vs_dense"]
        choice = ", ".join(f"{n} {f}" for f, n in sorted(r["accelerate_choices"].items()))
        lines.append(f"| {r['batch']} | {r['sparsity']:.0%} | {ms['dense']:.3f} | {ms['torch_csr']:.3f} "
                     f"({x['torch_csr']:.2f}×) | **{ms['accelerate']:.3f} ({x['accelerate']:.2f}×)** | {choice} "
                     f"| {max(r['max_relative_error'].values()):.1e} |")
    return "\n".join(lines)
