"""``obd-vs-magnitude``: does Optimal Brain Damage's saliency beat magnitude? LeNet-300-100 on MNIST-5k.

For each seed: train a dense LeNet-300-100 on the 4,000 training digits, then

1. **one-shot, no retraining**: score the trained weights once with every
   criterion (magnitude, random, OBD with the Gauss-Newton, empirical-Fisher
   and Hutchinson diagonals, first-order Taylor), prune to 30-95% with
   layer-wise and with global ranking, and measure test loss and accuracy;
2. **with retraining**: OBD's own procedure (:func:`prunekit.iterative_prune`):
   score, prune to the next level, retrain a few epochs with the masks frozen,
   re-score, ... through the same levels;
3. **diagnostics** on the trained model: each estimator's error against the
   exact Hessian diagonal on a sample of weights (:func:`prunekit.methods.hessian.exact_diagonal_entries`;
   the full exact diagonal of 266,610 parameters is out of reach), and how well
   each score ranks the actual loss increase of deleting single weights.

Writes ``table.md``, ``results.json`` and ``plot.png`` into the output directory.
"""

from __future__ import annotations

import copy
import itertools
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..._io import atomic_open
from ..._progress import progress_bar
from ..._repro import seeded
from ...core.criteria import Criterion, Magnitude, Precomputed, Random, ScoreContext
from ...core.pruner import Pruner
from ...core.scope import resolve_scope
from ...methods import hessian
from ...methods.iterative import iterative_prune
from ...methods.obd import OBD, Taylor
from ...training.data import load_mnist5k
from ...training.loop import epoch_seed, evaluate, train
from ..models import LeNet300100
from . import check_run_args, write_run_files

__all__ = ["Config", "FULL", "QUICK", "CRITERIA", "run"]

NAME = "obd-vs-magnitude"
LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
RANKINGS = ("layerwise", "global")


@dataclass(frozen=True)
class Config:
    """Sizes and hyper-parameters of one variant of the experiment.

    Attributes:
        train_samples: training digits used (``None``: all 4,000).
        test_samples: test digits used (``None``: all 1,000).
        epochs: dense training epochs (Adam).
        retrain_epochs: retraining epochs after each pruning step.
        batch_size: samples per optimizer step.
        lr: Adam learning rate (dense training and retraining).
        saliency_samples: training digits the data-driven criteria see (one batch).
        probes: Hutchinson probes per estimate.
        probe_sweep: probe counts of the Hutchinson error diagnostic.
        sampled_weights: weights per layer in the diagnostics.
        diagnostic_samples: training digits of the estimator-error diagnostic.
        seeds: seeds run by default.
    """

    train_samples: int | None
    test_samples: int | None
    epochs: int
    retrain_epochs: int
    batch_size: int
    lr: float
    saliency_samples: int
    probes: int
    probe_sweep: tuple[int, ...]
    sampled_weights: int
    diagnostic_samples: int
    seeds: int


# Dense LeNet-300-100 reaches ~94-95% test accuracy on 4,000 digits after 20 epochs (train loss ~0.003).
FULL = Config(None, None, epochs=20, retrain_epochs=2, batch_size=64, lr=1e-3, saliency_samples=1000,
              probes=200, probe_sweep=(10, 100, 1000), sampled_weights=64, diagnostic_samples=250, seeds=3)
# Every stage runs on a few hundred digits in seconds (for tests); the numbers mean little.
QUICK = Config(500, 200, epochs=3, retrain_epochs=1, batch_size=32, lr=1e-3, saliency_samples=200,
               probes=8, probe_sweep=(4, 32), sampled_weights=6, diagnostic_samples=100, seeds=2)

# criterion name -> (label for tables, rankings run with retraining)
CRITERIA: dict[str, tuple[str, tuple[str, ...]]] = {
    "magnitude": ("magnitude |w|", ("layerwise", "global")),
    "random": ("random", ("layerwise",)),
    "obd-gauss-newton": ("OBD, Gauss-Newton diag.", ("global",)),
    "obd-fisher": ("OBD, empirical Fisher diag.", ("global",)),
    "obd-hutchinson": ("OBD, Hutchinson diag.", ("global",)),
    "taylor": ("Taylor |w·g|", ("global",)),
}
_LOSS = nn.functional.cross_entropy


@dataclass
class _Data:
    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def saliency_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # The training split is shuffled and class-balanced, so a prefix is a fair sample.
        return [(self.X[:n], self.y[:n])]


def _load(config: Config) -> _Data:
    X, y = load_mnist5k("train")
    X_test, y_test = load_mnist5k("test")
    n, m = config.train_samples or len(X), config.test_samples or len(X_test)
    return _Data(X[:n], y[:n], X_test[:m], y_test[:m])




# -- criteria ---------------------------------------------------------------------------------


def make_criterion(name: str, batches: list, config: Config, seed: int) -> Criterion:
    """A fresh criterion called ``name`` (a key of :data:`CRITERIA`); data criteria see ``batches``."""
    if name == "magnitude":
        return Magnitude()
    if name == "random":
        return Random(seed)
    if name == "taylor":
        return Taylor(batches, _LOSS)
    estimator = name.removeprefix("obd-")
    return OBD(batches, _LOSS, estimator=estimator, probes=config.probes, seed=seed)


def _oneshot_criterion(criterion: Criterion, model: nn.Module) -> Criterion:
    """Data criteria scored once on the trained model, so every sparsity level uses the same saliencies."""
    if isinstance(criterion, (OBD, Taylor)):
        return Precomputed(criterion.bind(model).saliency())
    return criterion


# -- one seed ---------------------------------------------------------------------------------


def _train_dense(data: _Data, config: Config, seed: int) -> nn.Module:
    model = LeNet300100()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    train(model, data.X, data.y, epochs=config.epochs, batch_size=config.batch_size, optimizer=optimizer,
          seed=seed, progress=False)
    return model


def _evaluate(model: nn.Module, data: _Data) -> dict[str, float]:
    return evaluate(model, data.X_test, data.y_test)


def _oneshot(trained: nn.Module, data: _Data, config: Config, seed: int,
             timing: dict[str, float]) -> tuple[list[dict[str, Any]], dict[str, Criterion]]:
    """Prune copies of the trained model at every level with every criterion and ranking (no retraining)."""
    batches = data.saliency_batches(config.saliency_samples)
    rows, scored = [], {}
    for name in CRITERIA:
        start = time.perf_counter()
        scored[name] = _oneshot_criterion(make_criterion(name, batches, config, seed), trained)
        timing[name] = time.perf_counter() - start
        for ranking, level in itertools.product(RANKINGS, LEVELS):
            model = copy.deepcopy(trained)
            Pruner(model, level, criterion=scored[name], ranking=ranking).remove()
            rows.append({"phase": "oneshot", "criterion": name, "ranking": ranking, "sparsity": level,
                         **_evaluate(model, data)})
    return rows, scored


def _retrain_fn(data: _Data, config: Config, seed: int) -> Callable[[nn.Module, Pruner | None], None]:
    rounds = itertools.count(1)

    def train_fn(model: nn.Module, pruner: Pruner | None) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        if pruner is not None:
            pruner.attach(optimizer)  # keeps pruned weights at zero through Adam's updates
        train(model, data.X, data.y, epochs=config.retrain_epochs, batch_size=config.batch_size,
              optimizer=optimizer, seed=epoch_seed(seed, 1000 + next(rounds)), progress=False)

    return train_fn


def _retrained(trained: nn.Module, data: _Data, config: Config, seed: int) -> list[dict[str, Any]]:
    """OBD's procedure for each criterion: prune to the next level, retrain, re-score, repeat."""
    batches = data.saliency_batches(config.saliency_samples)
    rows = []
    for name, (_, rankings) in CRITERIA.items():
        for ranking in rankings:
            def callback(model: nn.Module, pruner: Pruner, index: int, phase: str) -> dict[str, float]:
                return _evaluate(model, data)

            records = iterative_prune(copy.deepcopy(trained), criterion=make_criterion(name, batches, config, seed),
                                      train_fn=_retrain_fn(data, config, seed), sparsities=list(LEVELS),
                                      ranking=ranking, train_first=False, callback=callback)
            for rec in records:
                for phase, key in (("iterative_pruned", "pruned"), ("retrained", "retrained")):
                    rows.append({"phase": phase, "criterion": name, "ranking": ranking,
                                 "sparsity": rec["target_sparsity"], **rec[key]})
    return rows


# -- diagnostics ------------------------------------------------------------------------------


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties (``nan`` if either side is constant)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _picked(values: dict[str, torch.Tensor], entries: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([values[n].reshape(-1)[idx].double().cpu() for n, idx in entries.items()]).numpy()


def _estimator_errors(model: nn.Module, batches: list, params: dict, entries: dict, exact: np.ndarray,
                      config: Config, seed: int) -> dict[str, dict[str, float]]:
    """Relative L2 error and rank correlation of each diagonal estimator against the exact entries."""
    runs: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
        "gauss-newton": lambda: hessian.gauss_newton_diagonal(model, batches, _LOSS, params),
        "fisher": lambda: hessian.empirical_fisher_diagonal(model, batches, _LOSS, params),
    }
    for probes in config.probe_sweep:
        runs[f"hutchinson-{probes}"] = (lambda p=probes: hessian.hutchinson_diagonal(
            model, batches, _LOSS, params, probes=p, seed=seed))
    out = {}
    for name, estimate in runs.items():
        start = time.perf_counter()
        values = _picked(estimate(), entries)
        out[name] = {"rel_error": float(np.linalg.norm(values - exact) / max(np.linalg.norm(exact), 1e-300)),
                     "spearman": _spearman(values, exact), "seconds": time.perf_counter() - start}
    return out


@torch.no_grad()
def _deletion_effects(model: nn.Module, batches: list, entries: dict[str, torch.Tensor]) -> np.ndarray:
    """Actual increase of the (float64) loss on ``batches`` when each sampled weight alone is set to zero."""
    model64 = copy.deepcopy(model).double()
    x, y = batches[0][0].double(), batches[0][1]
    params = dict(model64.named_parameters())
    base = float(_LOSS(model64(x), y))
    deltas = []
    for name, idx in entries.items():
        flat = params[name].data.view(-1)
        for i in idx.tolist():
            old = float(flat[i])
            flat[i] = 0.0
            deltas.append(float(_LOSS(model64(x), y)) - base)
            flat[i] = old
    return np.array(deltas)


def _diagnostics(trained: nn.Module, data: _Data, config: Config, seed: int,
                 scored: dict[str, Criterion]) -> dict[str, Any]:
    """Estimator errors against exact entries, and how well scores rank single-weight deletions."""
    targets = resolve_scope(trained).targets
    params = {t.name: t.param for t in targets}
    gen = torch.Generator().manual_seed(seed)
    entries = {n: torch.randperm(p.numel(), generator=gen)[:config.sampled_weights] for n, p in params.items()}
    # The estimators' error is a property of the estimator, not of the batch: a smaller batch
    # makes the 1,000-probe Hutchinson run affordable.
    small = data.saliency_batches(config.diagnostic_samples)
    exact_values = hessian.exact_diagonal_entries(trained, small, _LOSS, entries, params)
    exact = torch.cat([exact_values[n] for n in entries]).numpy()
    errors = _estimator_errors(trained, small, params, entries, exact, config, seed)
    batches = data.saliency_batches(config.saliency_samples)
    deltas = _deletion_effects(trained, batches, entries)
    fidelity = {}
    for name, crit in scored.items():
        scores = {t.name: crit.score(t.param.detach(), ScoreContext(t.name, t.module, 0)) for t in targets}
        fidelity[name] = _spearman(_picked(scores, entries), deltas)
    # OBD's quadratic model with the gradient term it assumes away (h: Gauss-Newton = exact for ReLU nets).
    h = hessian.gauss_newton_diagonal(trained, batches, _LOSS, params)
    g = hessian.mean_gradient(trained, batches, _LOSS, params)
    quadratic = {n: -g[n] * p.detach().double() + 0.5 * h[n] * p.detach().double() ** 2 for n, p in params.items()}
    fidelity["quadratic"] = _spearman(_picked(quadratic, entries), deltas)
    return {"estimator_error": errors, "deletion_spearman": fidelity,
            "deletions_lowering_loss": float((deltas < 0).mean()), "sampled_weights": int(len(deltas))}


# -- one seed, aggregation ----------------------------------------------------------------------


def _run_seed(data: _Data, config: Config, seed: int, bar: tqdm) -> dict[str, Any]:
    with seeded(seed):
        bar.set_postfix_str(f"seed {seed}: dense training")
        trained = _train_dense(data, config, seed)
        dense = _evaluate(trained, data)
        bar.update(1)
        bar.set_postfix_str(f"seed {seed}: one-shot")
        timing: dict[str, float] = {}
        rows, scored = _oneshot(trained, data, config, seed, timing)
        bar.update(1)
        bar.set_postfix_str(f"seed {seed}: retraining")
        rows += _retrained(trained, data, config, seed)
        bar.update(1)
        bar.set_postfix_str(f"seed {seed}: diagnostics")
        diagnostics = _diagnostics(trained, data, config, seed, scored)
        bar.update(1)
    return {"seed": seed, "dense": dense, "rows": rows, "saliency_seconds": timing, "diagnostics": diagnostics}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if not math.isnan(v)]
    mean = statistics.fmean(finite) if finite else float("nan")
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": mean, "std": std, "values": list(values)}


def _aggregate_rows(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in per_seed:
        for row in run["rows"]:
            groups.setdefault((row["phase"], row["criterion"], row["ranking"], row["sparsity"]), []).append(row)
    out = []
    for (phase, criterion, ranking, sparsity), rows in groups.items():
        out.append({"phase": phase, "criterion": criterion, "ranking": ranking, "sparsity": sparsity,
                    "loss": _stats([r["loss"] for r in rows]), "accuracy": _stats([r["accuracy"] for r in rows])})
    return out


def _aggregate_diagnostics(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    diags = [run["diagnostics"] for run in per_seed]
    errors = {name: {key: _stats([d["estimator_error"][name][key] for d in diags])
                     for key in ("rel_error", "spearman", "seconds")}
              for name in diags[0]["estimator_error"]}
    fidelity = {name: _stats([d["deletion_spearman"][name] for d in diags]) for name in diags[0]["deletion_spearman"]}
    return {"estimator_error": errors, "deletion_spearman": fidelity,
            "deletions_lowering_loss": _stats([d["deletions_lowering_loss"] for d in diags]),
            "sampled_weights": diags[0]["sampled_weights"]}


def _results(per_seed: list[dict[str, Any]], config: Config, quick: bool, data: str, seconds: float) -> dict[str, Any]:
    return {
        "experiment": NAME, "quick": quick, "seeds": [run["seed"] for run in per_seed],
        "config": asdict(config), "levels": list(LEVELS), "criteria": {k: v[0] for k, v in CRITERIA.items()},
        "model": "LeNet-300-100 (266,610 parameters)", "data": data,
        "dense": {key: _stats([run["dense"][key] for run in per_seed]) for key in ("loss", "accuracy")},
        "rows": _aggregate_rows(per_seed),
        "saliency_seconds": {name: _stats([run["saliency_seconds"][name] for run in per_seed]) for name in CRITERIA},
        "diagnostics": _aggregate_diagnostics(per_seed),
        "per_seed_diagnostics": {str(run["seed"]): run["diagnostics"] for run in per_seed},
        "exact_estimator": ("not run as a criterion: the exact diagonal of all 266,610 weights takes one "
                            "Hessian-vector product per weight; it is computed for sampled weights in the "
                            "diagnostics (where the Gauss-Newton diagonal matches it, as it must for a ReLU "
                            "network) and checked against full Hessians of tiny MLPs in the tests"),
        "seconds": seconds,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": 1},
    }


# -- table and plot -----------------------------------------------------------------------------


def _variants(results: dict[str, Any], phase: str) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for row in results["rows"]:
        if row["phase"] == phase:
            seen[(row["criterion"], row["ranking"])] = None
    return list(seen)


def _md(text: str) -> str:
    return text.replace("|", "\\|")  # a bare '|' would split a Markdown table cell


def _cell(stat: dict[str, Any], scale: float, digits: int) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _metric_table(results: dict[str, Any], phase: str, metric: str) -> list[str]:
    """Markdown rows: one per (criterion, ranking), one column per sparsity; the best mean in bold."""
    scale, digits, better = (100.0, 1, max) if metric == "accuracy" else (1.0, 3, min)
    index = {(r["criterion"], r["ranking"], r["sparsity"]): r[metric] for r in results["rows"] if r["phase"] == phase}
    variants = _variants(results, phase)
    best = {s: better(index[(c, k, s)]["mean"] for c, k in variants) for s in LEVELS}
    lines = ["| criterion | ranking | " + " | ".join(f"{s:.0%}" for s in LEVELS) + " |",
             "|---|---|" + "---:|" * len(LEVELS)]
    for c, k in variants:
        cells = []
        for s in LEVELS:
            text = _cell(index[(c, k, s)], scale, digits)
            cells.append(f"**{text}**" if index[(c, k, s)]["mean"] == best[s] else text)
        lines.append(f"| {_md(results['criteria'][c])} | {k} | " + " | ".join(cells) + " |")
    return lines


def _diagnostic_lines(results: dict[str, Any]) -> list[str]:
    diag, n = results["diagnostics"], len(results["seeds"])
    lines = ["## Diagnostics (trained dense model, before pruning)", "",
             f"### Diagonal estimators vs the exact Hessian diagonal ({diag['sampled_weights']} sampled weights "
             f"per seed, exact entries by double-backward, on the first {results['config']['diagnostic_samples']} "
             f"training digits; mean ± std over {n} seeds)", "",
             "| estimator | relative L2 error | Spearman ρ | seconds |", "|---|---:|---:|---:|"]
    for name, e in diag["estimator_error"].items():
        lines.append(f"| {name} | {_cell(e['rel_error'], 1, 3)} | {_cell(e['spearman'], 1, 3)} | "
                     f"{e['seconds']['mean']:.2f} |")
    lines += ["", "### Single-weight deletions: Spearman ρ between a score and the actual loss increase", "",
              f"Each sampled weight alone set to zero; loss in float64 on the {results['config']['saliency_samples']} "
              "digits the criteria saw.", "",
              "| score | Spearman ρ |", "|---|---:|"]
    labels = {**results["criteria"], "quadratic": "diagnostic: −g·w + ½·h·w² (OBD plus the gradient term)"}
    for name, stat in diag["deletion_spearman"].items():
        lines.append(f"| {_md(labels[name])} | {_cell(stat, 1, 3)} |")
    lowered = diag["deletions_lowering_loss"]["mean"]
    verdict = ("the trained network is not at a minimum, which OBD assumes when it drops the gradient term"
               if lowered > 0.05 else "consistent with a minimum, as OBD assumes")
    lines += ["", f"{lowered:.0%} of the single-weight deletions *lowered* that loss: {verdict}.", ""]
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report of :func:`run`'s results."""
    cfg, dense = results["config"], results["dense"]
    seeds = ", ".join(map(str, results["seeds"]))
    head = [f"# OBD vs magnitude: {results['model']}, {results['data']}", "",
            f"Seeds {seeds}; every cell is mean ± std over seeds. Dense model: test accuracy "
            f"{_cell(dense['accuracy'], 100, 1)} %, test loss {_cell(dense['loss'], 1, 3)}. "
            f"Data-driven criteria see the first {cfg['saliency_samples']} training digits; Hutchinson uses "
            f"{cfg['probes']} Rademacher probes. Exact OBD: {results['exact_estimator']}. "
            f"Retraining: {cfg['retrain_epochs']} epoch{'s' if cfg['retrain_epochs'] != 1 else ''} of Adam "
            f"(lr {cfg['lr']}) after each pruning step. "
            f"Wall time {results['seconds']:.0f} s{' (--quick)' if results['quick'] else ''}.", ""]
    sections = [("oneshot", "One-shot pruning, no retraining",
                 "The trained model is scored once and pruned to each sparsity; no weight is updated."),
                ("retrained", "Iterative pruning with retraining",
                 "OBD's procedure: prune to 30%, retrain, re-score, prune to 50%, ...; a column is the state "
                 "after pruning to that sparsity and retraining.")]
    body = []
    for phase, title, note in sections:
        for metric, unit in (("accuracy", "test accuracy (%)"), ("loss", "test loss (cross-entropy)")):
            body += [f"## {title}: {unit}", "", note, "", *_metric_table(results, phase, metric), ""]
    seconds = ", ".join(f"{results['criteria'][k]} {v['mean']:.2f} s" for k, v in results["saliency_seconds"].items())
    body += [f"Time to score the trained model once: {seconds}.", ""]
    return "\n".join(head + body + _diagnostic_lines(results))


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    for col, (phase, title) in enumerate((("oneshot", "one-shot, no retraining"), ("retrained", "with retraining"))):
        for row, metric in enumerate(("accuracy", "loss")):
            ax = axes[row][col]
            for c, k in _variants(results, phase):
                stats = {r["sparsity"]: r[metric] for r in results["rows"]
                         if (r["phase"], r["criterion"], r["ranking"]) == (phase, c, k)}
                # One colour per criterion, one line style per ranking: the same in every panel.
                ax.errorbar([100 * s for s in LEVELS], [stats[s]["mean"] for s in LEVELS],
                            yerr=[stats[s]["std"] for s in LEVELS], marker="o", capsize=3,
                            color=f"C{list(CRITERIA).index(c)}", label=f"{results['criteria'][c]} ({k})",
                            linestyle="-" if k == "global" else "--")
            ax.set_title(f"test {metric}, {title}")
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['model']}, seeds {results['seeds']}")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# -- entry point --------------------------------------------------------------------------------




def run(out: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
        progress: bool | None = None) -> dict[str, Any]:
    """Run the experiment and write ``table.md``, ``results.json`` and ``plot.png`` into ``out``.

    Args:
        out: output directory (created if missing).
        quick: the small :data:`QUICK` variant (seconds; for tests).
        seeds: seeds to run (default: 0..2, or 0..1 with ``quick``).
        progress: a tqdm bar over the stages (``None``: only on a terminal).

    Returns:
        The dict written to ``results.json``: ``rows`` (one per phase, criterion,
        ranking and sparsity, with ``loss``/``accuracy`` as ``{mean, std, values}``),
        ``dense``, ``diagnostics``, ``saliency_seconds``, ``config``, ``seeds``, ``seconds``.

    Example:
        >>> results = run("runs/obd-vs-magnitude", quick=True)  # doctest: +SKIP
        >>> sorted({r["phase"] for r in results["rows"]})  # doctest: +SKIP
        ['iterative_pruned', 'oneshot', 'retrained']
    """
    config, seeds, out = check_run_args(NAME, out, quick, seeds, QUICK, FULL)
    started = time.perf_counter()
    data = _load(config)
    with progress_bar(progress, total=4 * len(seeds), desc=NAME, unit="stage") as bar:
        per_seed = [_run_seed(data, config, seed, bar) for seed in seeds]
    described = f"MNIST-5k: {len(data.X):,} train / {len(data.X_test):,} test digits"
    results = _results(per_seed, config, quick, described, time.perf_counter() - started)
    table = format_table(results)
    write_run_files(out, results, table, _plot)
    print(table)
    return results
