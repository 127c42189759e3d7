"""File sizes of pruned models: dense fp32, gzip of fp32, prunekit, prunekit + int8, and the entropy bound.

Both models are trained densely on MNIST-5k (4,000 training digits), then
pruned by magnitude in rounds of rising sparsity (every weight tensor,
layer-wise): each round prunes the previous round's model one-shot to the next
sparsity and fine-tunes it with the masks held, so masks are nested. Sizes come from
:func:`prunekit.size_summary`; the bound is ``n·H(k/n) + k·8`` bits over the
int8 weights plus raw fp32 for biases (see :mod:`prunekit.formats.stats`).
Accuracy is measured on the 1,000 test digits for the pruned fp32 model and
for the same model read back from its int8 file. A second table shows, for the
demo CNN at 80%, what coarser grids (int6, int4 codes in the int8 container)
buy in size and cost in accuracy. Seeds are fixed: the same run gives the same numbers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import prunekit
from prunekit._io import atomic_write_json
from prunekit.apps.models import LeNet5, LeNet300100
from prunekit.formats import dumps, loads
from prunekit.training.data import load_mnist5k
from prunekit.training.loop import evaluate, train

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
GRIDS = ("int8", "int6", "int5", "int4", "int3")
SEED = 0
# (dense epochs, fine-tune epochs) per model; the CNN is the slow one on 2 cores.
FULL_EPOCHS = {"LeNet-5 (demo CNN)": (12, 3), "LeNet-300-100": (20, 3)}
QUICK_EPOCHS = {"LeNet-5 (demo CNN)": (1, 1), "LeNet-300-100": (2, 1)}
MODELS: dict[str, Callable[[], nn.Module]] = {"LeNet-5 (demo CNN)": LeNet5, "LeNet-300-100": LeNet300100}


def _data(quick: bool) -> tuple[torch.Tensor, ...]:
    X_train, y_train = load_mnist5k("train")
    X_test, y_test = load_mnist5k("test")
    if quick:
        return X_train[:512], y_train[:512], X_test[:200], y_test[:200]
    return X_train, y_train, X_test, y_test


def _fit(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, *, sparsity: float | None = None) -> nn.Module:
    """Train ``model`` (under a one-shot magnitude Pruner at ``sparsity`` if given); return it stripped."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if sparsity is not None:
        prunekit.Pruner(model, sparsity, optimizer=optimizer)
    train(model, X, y, epochs=epochs, optimizer=optimizer, seed=SEED, progress=False)
    return prunekit.strip(model)


def _accuracy_from_file(model: nn.Module, quantize: str | None, X: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` as restored from its file (what a user of the file gets)."""
    restored = copy.deepcopy(model)
    restored.load_state_dict(loads(dumps(model, quantize=quantize)))
    return evaluate(restored, X, y)["accuracy"]


def _rows_for(label: str, epochs: tuple[int, int], data: tuple[torch.Tensor, ...]) -> tuple[list[dict], dict]:
    X_train, y_train, X_test, y_test = data
    torch.manual_seed(SEED)
    dense = _fit(MODELS[label](), X_train, y_train, epochs[0])
    dense_acc = evaluate(dense, X_test, y_test)["accuracy"]
    rows, pruned_at, model = [], {}, copy.deepcopy(dense)
    for s in SPARSITIES:
        # Magnitude ranks the previous round's zeros lowest, so each mask contains the last.
        model = _fit(model, X_train, y_train, epochs[1], sparsity=s)
        pruned_at[s] = copy.deepcopy(model)
        rows.append({
            "model": label, "sparsity": s, "dense_accuracy": dense_acc,
            "accuracy_fp32": evaluate(model, X_test, y_test)["accuracy"],
            "accuracy_int8": _accuracy_from_file(model, "int8", X_test, y_test),
            **prunekit.size_summary(model, quantize="int8"),
        })
    return rows, pruned_at


def _grid_rows(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> list[dict]:
    fp32 = prunekit.size_summary(model)["fp32_bytes"]
    base = evaluate(model, X, y)["accuracy"]
    out = []
    for grid in GRIDS:
        size = len(dumps(model, quantize=grid))
        out.append({"quantize": grid, "bytes": size, "ratio_vs_fp32": fp32 / size,
                    "accuracy": _accuracy_from_file(model, grid, X, y), "accuracy_fp32": base})
    return out


def _dense_accuracies(rows: list[dict]) -> list[tuple[str, float]]:
    return list({r["model"]: r["dense_accuracy"] for r in rows}.items())


def _x(ref: float, size: float) -> str:
    return f"{size / 1024:,.1f} KiB ({ref / size:.1f}×)"


def _size_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | sparsity | acc fp32 | acc int8 (Δ pt) | dense fp32 | gzip(fp32) | prunekit | prunekit+int8 "
        "| bound (int8) | int8 file / bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref, delta = r["fp32_bytes"], 100 * (r["accuracy_int8"] - r["accuracy_fp32"])
        lines.append(
            f"| {r['model']} | {r['sparsity']:.0%} | {r['accuracy_fp32']:.2%} | {r['accuracy_int8']:.2%} ({delta:+.1f}) "
            f"| {ref / 1024:,.1f} KiB | {_x(ref, r['gzip_fp32_bytes'])} | {_x(ref, r['prunekit_bytes'])} "
            f"| **{_x(ref, r['prunekit_q_bytes'])}** | {_x(ref, r['bound_q_bytes'])} "
            f"| {r['prunekit_q_bytes'] / r['bound_q_bytes']:.2f} |")
    return lines


def _grid_table(rows: list[dict]) -> list[str]:
    lines = ["| quantize | file | × vs dense fp32 | accuracy | Δ vs pruned fp32 (pt) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['quantize']} | {r['bytes']:,} B | {r['ratio_vs_fp32']:.1f}× | {r['accuracy']:.2%} "
                     f"| {100 * (r['accuracy'] - r['accuracy_fp32']):+.1f} |")
    return lines


def run(out: Path, quick: bool) -> str:
    """Train, prune, measure; write ``out/size.json`` and return the Markdown section."""
    data = _data(quick)
    epochs = QUICK_EPOCHS if quick else FULL_EPOCHS
    rows, grids = [], []
    for label in MODELS:
        model_rows, pruned_at = _rows_for(label, epochs[label], data)
        rows += model_rows
        if label.startswith("LeNet-5"):
            grids = _grid_rows(pruned_at[0.8], data[2], data[3])
    atomic_write_json(out / "size.json", {"seed": SEED, "epochs": epochs, "test_samples": len(data[3]),
                                          "rows": rows, "demo_cnn_80_grids": grids})
    lines = [
        "## File size of pruned models (MNIST-5k; magnitude pruning in rounds, fine-tuned)",
        "",
        "Ratios are against dense fp32 (4 bytes per parameter). prunekit: lossless file; +int8: symmetric "
        "per-channel int8 weights, zeros exact. Bound: n·H(k/n) + k·8 bits per weight tensor, raw fp32 for "
        "biases (entropy-coded int8 codes can beat it; the file also pays for headers and per-channel scales). "
        f"Accuracy on {len(data[3]):,} test digits; int8 accuracy is that of the model read back from its file. "
        "Dense accuracy: " + ", ".join(f"{label} {acc:.2%}" for label, acc in _dense_accuracies(rows)) + ".",
        "",
        *_size_table(rows),
        "",
        "Demo CNN at 80%: coarser grids in the same int8 codes (entropy coding turns fewer levels into fewer bits).",
        "",
        *_grid_table(grids),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(Path("runs/bench"), quick=True))
