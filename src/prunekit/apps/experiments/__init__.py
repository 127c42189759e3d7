"""Named, reproducible experiments: each writes ``table.md``, ``results.json`` and ``plot.png``.

An experiment is a module exposing::

    run(out: Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
        progress: bool | None = None) -> dict

that writes its files into ``out`` (atomically) and returns what it wrote to
``results.json``. :data:`EXPERIMENTS` maps command-line names to such modules;
modules are imported only when an experiment runs, so registering one costs
nothing at start-up. To add an experiment, write the module and add one
:class:`Experiment` line here.
"""

from __future__ import annotations

import importlib
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

from ..._validate import check_int

__all__ = ["Experiment", "EXPERIMENTS", "aggregate_rows", "check_run_args", "check_seeds", "get_experiment",
           "level_label", "write_run_files"]


@dataclass(frozen=True)
class Experiment:
    """One registry entry.

    Attributes:
        name: the command-line name (``prunekit experiment <name>``).
        module: dotted path of the module that implements ``run``.
        help: one line for ``--help``.
        default_seeds: how many seeds (0, 1, ...) a run uses unless told otherwise.
    """

    name: str
    module: str
    help: str
    default_seeds: int = 3

    def load(self) -> ModuleType:
        """Import and return the implementing module."""
        return importlib.import_module(self.module)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment("obd-vs-magnitude", "prunekit.apps.experiments.obd_vs_magnitude",
                   "Optimal Brain Damage (Hessian estimators), Taylor, magnitude and random pruning of "
                   "LeNet-300-100 on MNIST-5k, one-shot and with retraining"),
        Experiment("lottery", "prunekit.apps.experiments.lottery",
                   "Lottery tickets (IMP with rewinding) vs random reinit, random mask and one-shot pruning, "
                   "LeNet-300-100 on MNIST-5k"),
        Experiment("seed-table", "prunekit.apps.experiments.seed_table",
                   "Accuracy, file size and latency of gradually magnitude-pruned MLP, CNN and LSTM on MNIST-5k "
                   "(mean ± std over seeds) and one-shot pruned MiniLM, 0-95% sparsity", default_seeds=3),
        Experiment("oneshot-minilm", "prunekit.apps.experiments.oneshot_minilm",
                   "One-shot magnitude, Wanda and SparseGPT pruning of all-MiniLM-L6-v2 sentence embeddings",
                   default_seeds=1),
        Experiment("efficientnet-lite0", "prunekit.apps.experiments.efficientnet",
                   "Pretrained EfficientNet-Lite0 structurally (30% channels) and unstructured (80%) pruned, saved, "
                   "reloaded and exported; top-5 on matplotlib's sample images vs dense", default_seeds=1),
        Experiment("oneshot-llm", "prunekit.apps.experiments.oneshot_llm",
                   "One-shot magnitude, Wanda and SparseGPT pruning of SmolLM2-135M (30/50/70%, 2:4, 4:8): "
                   "perplexity on Shakespeare, pruning time, peak memory", default_seeds=1),
        Experiment("recover", "prunekit.apps.experiments.recover",
                   "Sparse recovery with distillation: MiniLM-L6 gradual pruning while distilling vs one-shot "
                   "SparseGPT (50-90%), SmolLM2-135M SparseGPT 50%/2:4 then KL recovery", default_seeds=1),
        Experiment("when-to-stop", "prunekit.apps.experiments.when_to_stop",
                   "The sparsity reached within 0.5 pt (LeNet-5/MNIST-5k) / 1% relative (MiniLM-L6) / 1% and 10% "
                   "relative perplexity (SmolLM2-135M) of dense by uniform, ERK, LAMP, OWL and equal-loss "
                   "allocation, one-shot budget search and gradual StopWhen"),
    )
}


def get_experiment(name: str) -> Experiment:
    """The registry entry called ``name``.

    Raises:
        ValueError: no experiment has that name (the message lists the known ones).

    Example:
        >>> get_experiment("obd-vs-magnitude").module
        'prunekit.apps.experiments.obd_vs_magnitude'
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]


def check_seeds(name: str, seeds: Sequence[int] | None, default_count: int) -> list[int]:
    """The seeds an experiment runs: ``seeds`` checked, or ``0 .. default_count - 1``.

    Raises:
        TypeError: ``seeds`` is not a non-empty sequence of integers.
        ValueError: a seed is negative, or seeds repeat.

    Example:
        >>> check_seeds("demo", None, 3), check_seeds("demo", [4, 7], 3)
        ([0, 1, 2], [4, 7])
    """
    if seeds is None:
        return list(range(default_count))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds:
        raise TypeError(f"{name}: seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    checked = [check_int(name, "seed", s, minimum=0) for s in seeds]
    if len(set(checked)) != len(checked):
        raise ValueError(f"{name}: seeds must be distinct, got {checked}")
    return checked


def check_run_args(name: str, out: str | Path, quick: Any, seeds: Sequence[int] | None, quick_config: Any,
                   full_config: Any) -> tuple[Any, list[int], Path]:
    """The checked arguments of an experiment's ``run``: ``(config, seeds, out)``.

    ``config`` is ``quick_config`` or ``full_config`` (each with a ``seeds`` count,
    the default number of seeds); ``out`` must not be an existing file.

    Raises:
        TypeError: ``quick`` is not a bool, or ``seeds`` is malformed.
        ValueError: ``out`` is an existing file, or seeds are negative or repeated.

    Example:
        >>> from types import SimpleNamespace
        >>> check_run_args("demo", "runs/x", True, None, SimpleNamespace(seeds=1), SimpleNamespace(seeds=3))[1:]
        ([0], PosixPath('runs/x'))
    """
    if not isinstance(quick, bool):
        raise TypeError(f"{name}: quick must be a bool, got {type(quick).__name__}")
    config = quick_config if quick else full_config
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}: out must be a directory, but {str(path)!r} is an existing file")
    return config, check_seeds(name, seeds, config.seeds), path


def write_run_files(out: Path, results: dict[str, Any], table: str,
                  plot: Callable[[dict[str, Any], Path], None]) -> None:
    """Write an experiment's ``results.json`` and ``table.md`` atomically, then ``plot(results, out / "plot.png")``.

    Example:
        >>> write_run_files(Path("runs/x"), {"a": 1}, "| a |", lambda r, p: None)  # doctest: +SKIP
    """
    from ..._io import atomic_open, atomic_write_json

    atomic_write_json(out / "results.json", results)
    with atomic_open(out / "table.md", "w") as f:
        f.write(table + "\n")
    plot(results, out / "plot.png")


def aggregate_rows(per_seed: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of several seeds' runs merged by ``(method, level)``: mean, std and the values of each metric.

    ``None`` values (a metric a method does not have) are kept in ``values`` and left out of the mean.

    Example:
        >>> runs = [{"rows": [{"method": "wanda", "level": "0.5", "layers": 2, "ppl": v}]} for v in (1.0, 3.0)]
        >>> aggregate_rows(runs, ["ppl"])[0]["ppl"]["mean"]
        2.0
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run_ in per_seed:
        for row in run_["rows"]:
            groups.setdefault((row["method"], row["level"]), []).append(row)
    return [{"method": m, "level": lv, "layers": rows[0]["layers"],
             **{k: _stats([r[k] for r in rows]) for k in metrics}} for (m, lv), rows in groups.items()]


def _stats(values: list[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    mean = statistics.fmean(known) if known else None
    return {"mean": mean, "std": statistics.stdev(known) if len(known) > 1 else 0.0, "values": values}


def level_label(level: str) -> str:
    """A sparsity level for a table: ``"0.5"`` → ``"50%"``; an N:M pattern as it is.

    Example:
        >>> level_label("0.5"), level_label("2:4")
        ('50%', '2:4')
    """
    return level if ":" in level else f"{float(level):.0%}"
