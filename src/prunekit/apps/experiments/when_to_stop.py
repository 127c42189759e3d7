"""``when-to-stop``: how far each per-layer allocation prunes before the metric leaves its tolerance.

Two models, each with a tolerance against its dense self:

* **LeNet-5 on MNIST-5k** (one dense model per seed, Adam): test accuracy within
  0.5 pt of dense. One-shot magnitude pruning searched by
  :func:`prunekit.prune_to_budget` (bisection on the overall sparsity) with the
  allocations uniform, ERK, LAMP and equal-loss (read off a
  :func:`prunekit.sensitivity` table of the same model); and gradual pruning
  (uniform, polynomial schedule, fine-tuning between updates) stopped by
  :class:`prunekit.StopWhen` at the first mask update outside the tolerance.
* **all-MiniLM-L6-v2** (1 seed): mean cosine between pruned and dense sentence
  embeddings of held-out sentences within 1% (relative) of dense; Wanda one-shot
  (:func:`prunekit.methods.oneshot.prune_oneshot`) over the encoder blocks with the
  allocations uniform, OWL and ERK. Loader and sentences come from
  :mod:`prunekit.apps.experiments.oneshot_minilm`; skipped (and said so) without
  transformers or the model package.
* **SmolLM2-135M** (the decoder LM of ``oneshot-llm``, 1 seed): perplexity on
  *King Lear* within 1% and within 10% (relative) of dense; Wanda over every Linear
  of the decoder blocks with the allocations uniform, OWL and ERK, calibrated on
  *Hamlet* and *Macbeth*. Wanda here scores ``|W_ij|·‖X_j‖₂`` with the input norms
  of the **dense** model, captured once (one pass over the calibration windows) and
  reused by every trial and by OWL: this is exactly ``prune_oneshot(...,
  blocks=False)``'s Wanda, not the block-sequential one (which re-calibrates each
  block on its pruned predecessors and costs a pass per trial: 150-270 s each on one
  thread). ``--quick`` runs the same path on a random-init tiny Llama.

The search evaluates on the data it reports (the LeNet test split, the MiniLM
evaluation sentences): a budget is a property of that set. Writes ``table.md``
(sparsity per allocation, gain over uniform), ``results.json`` and ``plot.png``
(sensitivity curves; accuracy vs sparsity along the gradual run, stop marked;
the one-shot trials; the LM's perplexity trials).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._io import atomic_open
from ..._progress import progress_bar
from ..._repro import seeded
from ...core.pruner import Pruner
from ...core.schedules import PolynomialDecay
from ...core.scope import resolve_scope
from ...methods.allocation import Allocation, _input_norms
from ...methods.budget import StopWhen, prune_to_budget
from ...methods.oneshot.layers import Layer
from ...methods.oneshot.solvers import Target, wanda_prune
from ...methods.sensitivity import sensitivity
from ...training.data import load_mnist5k
from ...training.loop import epoch_seed, evaluate, train
from ..models import LeNet5
from . import check_run_args, write_run_files

__all__ = ["FULL", "QUICK", "Config", "LMConfig", "LeNetConfig", "MiniLMConfig", "WandaFromDense", "run"]

NAME = "when-to-stop"
LENET_RULES = ("uniform", "erk", "lamp", "equal-loss")
MINILM_RULES = ("uniform", "owl", "erk")
MINILM_BLOCKS = "encoder.layer"  # the six BERT blocks: every Linear of them, nothing outside
LM_RULES = ("uniform", "owl", "erk")
LM_BLOCKS = "model.layers"  # the decoder blocks: attention q/k/v/o and MLP gate/up/down; embeddings, tied head dense


@dataclass(frozen=True)
class LeNetConfig:
    """LeNet-5 part.

    Attributes:
        train_samples / test_samples: digits used (``None``: all 4,000 / 1,000).
        epochs: dense training epochs (Adam, ``lr``, ``batch_size``).
        grid: sparsities of the sensitivity table (equal-loss reads it; the plot shows it).
        tol / hi: bisection width and highest sparsity tried by ``prune_to_budget``.
        gradual_epochs: fine-tuning epochs of the gradual run (the schedule ends at 3/4 of them).
        frequency: optimizer steps between mask updates of the gradual run.
        final_sparsity: where the gradual schedule would end without a stop.
        gradual_lr: Adam learning rate of the gradual run's fine-tuning. At the training's rate a fresh
            Adam moved the converged model too far: in a run with ``lr`` it fell 0.9 pt by step 15, at 11%
            sparsity, where one-shot pruning of the same model to 39% cost under 0.5 pt.
    """

    train_samples: int | None
    test_samples: int | None
    epochs: int
    grid: tuple[float, ...]
    tol: float
    hi: float
    gradual_epochs: int
    frequency: int
    final_sparsity: float
    lr: float = 1e-3
    batch_size: int = 64
    gradual_lr: float = 1e-4


@dataclass(frozen=True)
class MiniLMConfig:
    """MiniLM part: ``calibration`` sentences (Wanda and OWL), ``evaluation`` sentences (the metric), bisection."""

    calibration: int
    evaluation: int
    tol: float
    hi: float


@dataclass(frozen=True)
class LMConfig:
    """Decoder-LM part.

    Attributes:
        model: ``"smollm2"`` or ``"tiny-llama"`` (random init, for tests), as in ``oneshot-llm``.
        calibration / evaluation: ``(windows, tokens)`` of Shakespeare text (disjoint plays).
        tol / hi: bisection width and highest sparsity tried.
        drops: relative perplexity tolerances, each searched by every rule (the issue's 1%, and a looser one).
    """

    model: str
    calibration: tuple[int, int]
    evaluation: tuple[int, int]
    tol: float
    hi: float
    drops: tuple[float, ...] = (0.01, 0.10)


@dataclass(frozen=True)
class Config:
    """One variant: the parts, the tolerances, the default number of seeds (LeNet-5; MiniLM and the LM run the first)."""

    lenet: LeNetConfig
    minilm: MiniLMConfig | None
    seeds: int
    accuracy_drop: float = 0.005  # absolute: 0.5 pt of test accuracy
    cosine_drop: float = 0.01  # relative to the dense value (1.0)
    lm: LMConfig | None = None


# LeNet-5 on 4,000 digits, 20 epochs (after 8 it is ~2 pt short of what fine-tuning later reaches). Gradual: a
# mask update every 10 steps (~2.6 pt at first), fine-tuned at a tenth of the training rate.
# MiniLM sized for a shared 2-core machine (each trial is a Wanda pass over the calibration sentences plus the
# embedding of the evaluation ones).
FULL = Config(LeNetConfig(None, None, epochs=20, grid=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99), tol=0.005,
                          hi=0.99, gradual_epochs=8, frequency=10, final_sparsity=0.98),
              MiniLMConfig(calibration=16, evaluation=64, tol=0.02, hi=0.9), seeds=3,
              # SmolLM2: oneshot-llm's text sizes; a trial is a Wanda pass from the captured norms and a
              # perplexity (about 20 s on one thread), 8 evaluations a search, 6 searches
              lm=LMConfig("smollm2", calibration=(32, 128), evaluation=(8, 256), tol=0.02, hi=0.6))
# Seconds, for tests: tiny sizes, wide bisection; the numbers mean little.
QUICK = Config(LeNetConfig(600, 200, epochs=2, grid=(0.5, 0.95), tol=0.1, hi=0.95, gradual_epochs=2, frequency=4,
                           final_sparsity=0.95, lr=3e-3, batch_size=32, gradual_lr=1e-3),
               MiniLMConfig(calibration=1, evaluation=4, tol=0.2, hi=0.15), seeds=1,
               lm=LMConfig("tiny-llama", calibration=(4, 32), evaluation=(2, 32), tol=0.2, hi=0.6,
                           drops=(0.0005, 0.01)))


# -- LeNet-5 ----------------------------------------------------------------------------------------


@dataclass
class _Digits:
    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def accuracy(self, model: nn.Module) -> float:
        """Test accuracy (the metric every search and the gradual stop evaluate)."""
        return evaluate(model, self.X_test, self.y_test)["accuracy"]


def _digits(cfg: LeNetConfig) -> _Digits:
    X, y = load_mnist5k("train")
    X_test, y_test = load_mnist5k("test")
    n, m = cfg.train_samples or len(X), cfg.test_samples or len(X_test)
    return _Digits(X[:n], y[:n], X_test[:m], y_test[:m])


def _budget(model: nn.Module, evaluate_fn: Callable[[nn.Module], float], rule: str, options: dict[str, Any] | None,
            *, tol: float, hi: float, **kwargs: Any) -> dict[str, Any]:
    """``prune_to_budget`` on a copy of ``model``; the result as plain values (trials as ``[sparsity, metric, ok]``)."""
    r = prune_to_budget(copy.deepcopy(model), evaluate_fn, rule=rule, rule_options=options, tol=tol, hi=hi,
                        progress=False, **kwargs)
    return {"sparsity": r.sparsity, "metric": r.metric, "drop": r.drop, "evaluations": r.evaluations,
            "seconds": r.seconds, "trials": [[t.sparsity, t.metric, t.ok] for t in r.trials]}


def _gradual(model: nn.Module, data: _Digits, cfg: LeNetConfig, seed: int, max_drop: float) -> dict[str, Any]:
    """Uniform gradual magnitude pruning of a copy, fine-tuned, stopped by StopWhen; its checks and outcome."""
    net = copy.deepcopy(model)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.gradual_lr)
    steps = cfg.gradual_epochs * math.ceil(len(data.X) / cfg.batch_size)
    end = max(cfg.frequency, (3 * steps // 4) // cfg.frequency * cfg.frequency)
    schedule = PolynomialDecay(0.0, cfg.final_sparsity, begin_step=0, end_step=end, frequency=cfg.frequency)
    stop = StopWhen(data.accuracy, max_drop)
    pruner = Pruner(net, schedule, optimizer=optimizer, hooks=[stop])
    started = time.perf_counter()
    train(net, data.X, data.y, epochs=cfg.gradual_epochs, batch_size=cfg.batch_size, optimizer=optimizer,
          seed=epoch_seed(seed, 1), progress=False)
    sparsity = pruner.report().sparsity
    pruner.remove()
    return {"stopped": stop.stopped, "stop_step": stop.step, "sparsity": sparsity, "baseline": stop.baseline,
            "final_metric": data.accuracy(net), "steps": steps, "schedule_end": end, "updates": len(stop.history),
            "evaluations": stop.evaluations, "seconds": time.perf_counter() - started,
            "checks": [[c.step, c.sparsity, c.metric, c.ok] for c in stop.history]}


def _lenet_seed(data: _Digits, cfg: LeNetConfig, seed: int, max_drop: float, bar: Any) -> dict[str, Any]:
    """One seed: dense training, the sensitivity table, one search per allocation, the gradual run."""
    with seeded(seed):
        model = LeNet5()
        train(model, data.X, data.y, epochs=cfg.epochs, batch_size=cfg.batch_size,
              optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr), seed=seed, progress=False)
        bar.update(1)
        table = sensitivity(model, data.accuracy, sparsities=cfg.grid, progress=False)
        oneshot = {}
        for rule in LENET_RULES:
            bar.set_postfix_str(f"LeNet-5 seed {seed}: {rule}")
            table_rule = rule == "equal-loss"  # it reads sparsities off the table: no higher than its grid
            oneshot[rule] = _budget(model, data.accuracy, rule, {"table": table} if table_rule else None,
                                    tol=cfg.tol, hi=min(cfg.hi, max(cfg.grid)) if table_rule else cfg.hi,
                                    max_drop=max_drop)
            bar.update(1)
        bar.set_postfix_str(f"LeNet-5 seed {seed}: gradual")
        gradual = _gradual(model, data, cfg, seed, max_drop)
        bar.update(1)
    return {"seed": seed, "dense": table.dense, "oneshot": oneshot, "gradual": gradual,
            "sensitivity": {"curves": {k: [list(p) for p in v] for k, v in table.curves.items()},
                            "sizes": dict(table.sizes), "seconds": table.seconds}}


# -- MiniLM -----------------------------------------------------------------------------------------


def _minilm(cfg: MiniLMConfig, max_drop: float, seed: int, bar: Any) -> dict[str, Any]:
    """uniform / OWL / ERK Wanda searches on MiniLM, or ``{"skipped": why}`` without transformers or the model."""
    from ...methods.oneshot import prune_oneshot
    from . import oneshot_minilm as mini

    try:
        model, tokenizer = mini.load_minilm(progress=False)
    except ImportError as exc:
        bar.update(len(MINILM_RULES))
        return {"skipped": str(exc)}
    evaluation = mini.sentence_split("evaluation")[:cfg.evaluation]
    chosen = random.Random(seed).sample(mini.sentence_split("calibration"), cfg.calibration)
    calibration = [dict(tokenizer(s, truncation=True, max_length=mini.MAX_LENGTH, return_tensors="pt"))
                   for s in chosen]
    dense = mini.embed(model, tokenizer, evaluation)

    def cosine(m: nn.Module) -> float:
        return float((mini.embed(m, tokenizer, evaluation) * dense).sum(1).mean())

    def wanda(m: nn.Module, allocation: Any) -> None:
        prune_oneshot(m, calibration, method="wanda", sparsity=allocation, progress=False)

    out: dict[str, Any] = {"dense": cosine(model), "seed": seed, "rules": {}}
    with seeded(seed):
        for rule in MINILM_RULES:
            bar.set_postfix_str(f"MiniLM: {rule}")
            options = {"calibration": calibration} if rule == "owl" else None
            out["rules"][rule] = _budget(model, cosine, rule, options, tol=cfg.tol, hi=cfg.hi, max_drop=max_drop,
                                         relative=True, method=wanda, layers=[MINILM_BLOCKS])
            bar.update(1)
    return out


# -- decoder LM -------------------------------------------------------------------------------------


class WandaFromDense:
    """Wanda from one capture of the dense model's inputs: ``method(model, allocation)`` for ``prune_to_budget``.

    The input norms ``‖X_j‖₂`` of every Linear in scope are measured once, on the
    dense model, over ``calibration``; each call scores the model's (dense)
    weights ``|W_ij|·‖X_j‖₂`` and prunes each output row to the layer's allocated
    sparsity (:func:`~prunekit.methods.oneshot.solvers.wanda_prune`), the same
    masks as ``prune_oneshot(model, calibration, method="wanda", blocks=False)``
    but without a calibration pass per call. :attr:`norms` also feeds OWL.

    Example:
        >>> from prunekit import allocate
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> wanda = WandaFromDense(net, [torch.randn(16, 8)])
        >>> wanda(net, allocate(net, 0.5))
        >>> float((net[0].weight == 0).float().mean())
        0.5
    """

    def __init__(self, model: nn.Module, calibration: Any, layers: Sequence[str] | None = None) -> None:
        self.layers = layers
        targets = resolve_scope(model, layers).targets
        started = time.perf_counter()
        self.norms = _input_norms(model, targets, calibration, False)
        self.seconds = time.perf_counter() - started

    @torch.no_grad()
    def __call__(self, model: nn.Module, allocation: Allocation) -> None:
        for target in resolve_scope(model, self.layers).targets:
            layer = Layer.of(target.module_name, target.module)
            gram = torch.diag(self.norms[target.name].square())  # Wanda reads only the diagonal
            new, keep = wanda_prune(layer.matrix(), gram, Target.parse(allocation.by_name()[target.name]))
            layer.write(new.masked_fill(~keep, 0))


def _lm(cfg: LMConfig, seed: int, bar: Any) -> dict[str, Any]:
    """uniform / OWL / ERK Wanda searches on the decoder LM at each tolerance, or ``{"skipped": why}``."""
    from .. import llm
    from .oneshot_llm import _load

    try:
        model, tokenizer, name = _load(cfg, seed, False)
        split = llm.shakespeare_tokens(tokenizer, calibration=cfg.calibration, evaluation=cfg.evaluation, seed=seed)
    except ImportError as exc:
        bar.update(len(LM_RULES) * len(cfg.drops))
        return {"skipped": str(exc)}

    def ppl(m: nn.Module) -> float:
        return llm.perplexity(m, split.evaluation, progress=False)

    wanda = WandaFromDense(model, split.calibration_inputs(), [LM_BLOCKS])
    out: dict[str, Any] = {"model": name, "seed": seed, "dense": ppl(model), "capture_seconds": wanda.seconds,
                           "plays": {"calibration": [llm.play_title(p) for p in split.calibration_plays],
                                     "evaluation": llm.play_title(split.evaluation_play)},
                           "tolerances": {}}
    for drop in cfg.drops:
        searches = out["tolerances"][f"{drop:g}"] = {}
        for rule in LM_RULES:
            bar.set_postfix_str(f"LM {drop:.1%}: {rule}")
            options = {"calibration": wanda.norms} if rule == "owl" else None
            searches[rule] = _budget(model, ppl, rule, options, tol=cfg.tol, hi=cfg.hi, max_drop=drop, relative=True,
                                     higher_is_better=False, method=wanda, layers=[LM_BLOCKS])
            bar.update(1)
    return out


# -- results ----------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per allocation: sparsity reached (mean ± std over seeds) and its gain over uniform (per seed, then mean)."""
    out: dict[str, Any] = {}
    uniform = [run["oneshot"]["uniform"]["sparsity"] for run in per_seed]
    for rule in LENET_RULES:
        reached = [run["oneshot"][rule]["sparsity"] for run in per_seed]
        out[f"one-shot {rule}"] = {"sparsity": _stats(reached),
                                   "gain": _stats([a - u for a, u in zip(reached, uniform)]),
                                   "metric": _stats([run["oneshot"][rule]["metric"] for run in per_seed])}
    gradual = [run["gradual"]["sparsity"] for run in per_seed]
    out["gradual uniform (StopWhen)"] = {"sparsity": _stats(gradual),
                                         "gain": _stats([a - u for a, u in zip(gradual, uniform)]),
                                         "metric": _stats([run["gradual"]["final_metric"] for run in per_seed])}
    return out


def _results(config: Config, quick: bool, seeds: list[int], lenet: list[dict[str, Any]], minilm: dict[str, Any],
             lm: dict[str, Any], described: str, seconds: float) -> dict[str, Any]:
    return {"experiment": NAME, "quick": quick, "seeds": seeds, "config": asdict(config),
            "lenet": {"data": described, "metric": "test accuracy", "max_drop": config.accuracy_drop,
                      "relative": False, "rules": list(LENET_RULES), "dense": _stats([r["dense"] for r in lenet]),
                      "summary": _summary(lenet), "per_seed": lenet},
            "minilm": {"metric": "mean cosine vs dense embeddings", "max_drop": config.cosine_drop, "relative": True,
                       "method": "wanda", "rules": list(MINILM_RULES), **minilm},
            "lm": {"metric": "perplexity", "relative": True, "higher_is_better": False,
                   "method": "wanda from the dense model's input norms (one capture)", "rules": list(LM_RULES),
                   "max_drops": list(config.lm.drops) if config.lm else [], **lm},
            "seconds": seconds, "load_average": list(os.getloadavg()),
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads()}}


# -- table and plot ---------------------------------------------------------------------------------


def _pt(stat: dict[str, Any]) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report of :func:`run`'s results."""
    le, mi = results["lenet"], results["minilm"]
    lines = ["# When to stop: the sparsity each allocation reaches within tolerance of dense", "",
             f"## LeNet-5, {le['data']}: test accuracy within {100 * le['max_drop']:.1f} pt of dense", "",
             (f"Seeds {', '.join(map(str, results['seeds']))}; mean ± std over seeds (percent). Dense accuracy "
             f"{_pt(le['dense'])} %. One-shot: magnitude, bisection to {results['config']['lenet']['tol']:g}. "
             f"Gradual: uniform polynomial schedule with fine-tuning (Adam, lr {results['config']['lenet']['gradual_lr']:g}) "
             "between updates, stopped at the first update "
             "outside the tolerance (the sparsity held after it); its accuracy is after the rest of the fine-tuning."),
             "", "| allocation | sparsity reached (%) | gain over one-shot uniform (pt) | accuracy (%) |",
             "|---|---:|---:|---:|"]
    for name, row in le["summary"].items():
        lines.append(f"| {name} | {_pt(row['sparsity'])} | {100 * row['gain']['mean']:+.1f} ± "
                     f"{100 * row['gain']['std']:.1f} | {_pt(row['metric'])} |")
    lines += ["", f"## all-MiniLM-L6-v2: mean cosine vs dense within {100 * mi['max_drop']:.0f}% (relative)", ""]
    if "skipped" in mi:
        lines.append(f"Skipped: {mi['skipped']}")
    else:
        cfg = results["config"]["minilm"]
        lines += [(f"Wanda one-shot over the encoder blocks, {cfg['calibration']} calibration sentences, "
                  f"{cfg['evaluation']} evaluation sentences, seed {mi['seed']}, bisection to {cfg['tol']:g}."), "",
                  "| allocation | sparsity reached (%) | gain over uniform (pt) | cosine |", "|---|---:|---:|---:|"]
        base = mi["rules"]["uniform"]["sparsity"]
        for rule, r in mi["rules"].items():
            lines.append(f"| {rule} | {100 * r['sparsity']:.1f} | {100 * (r['sparsity'] - base):+.1f} | "
                         f"{r['metric']:.4f} |")
    lines += _lm_table(results)
    load = ", ".join(f"{v:.1f}" for v in results["load_average"])
    lines += ["", (f"Wall time {results['seconds']:.0f} s{' (--quick)' if results['quick'] else ''}; load average "
              f"at the end {load} (a shared machine)."), ""]
    return "\n".join(lines)


def _lm_table(results: dict[str, Any]) -> list[str]:
    lm = results["lm"]
    lines = ["", "## Decoder LM: perplexity within a relative tolerance of dense", ""]
    if "skipped" in lm:
        return lines + [f"Skipped: {lm['skipped']}"]
    cfg = results["config"]["lm"]
    lines += [(f"{lm['model']}, seed {lm['seed']}: Wanda over every Linear of the decoder blocks, scored with the "
               f"dense model's input norms over {cfg['calibration'][0]}×{cfg['calibration'][1]} tokens of "
               f"{' and '.join(lm['plays']['calibration'])} (captured once in {lm['capture_seconds']:.0f} s, reused "
               f"by every trial and by OWL); perplexity over {cfg['evaluation'][0]}×{cfg['evaluation'][1]} tokens of "
               f"{lm['plays']['evaluation']}, dense {lm['dense']:.2f}; bisection to {cfg['tol']:g} up to "
               f"{cfg['hi']:g}. One seed: each search is about 8 perplexity evaluations of the whole model."), "",
              "| tolerance | allocation | sparsity reached (%) | gain over uniform (pt) | perplexity | search s |",
              "|---|---|---:|---:|---:|---:|"]
    for drop, searches in lm["tolerances"].items():
        base = searches["uniform"]["sparsity"]
        for rule, r in searches.items():
            lines.append(f"| +{100 * float(drop):g}% | {rule} | {100 * r['sparsity']:.1f} | "
                         f"{100 * (r['sparsity'] - base):+.1f} | {r['metric']:.2f} | {r['seconds']:.0f} |")
    return lines


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    first = results["lenet"]["per_seed"][0]
    for name, points in first["sensitivity"]["curves"].items():
        axes[0].plot([100 * s for s, _ in points], [100 * m for _, m in points], marker="o", label=name)
    axes[0].axhline(100 * (first["dense"] - results["lenet"]["max_drop"]), color="grey", ls=":", label="tolerance")
    axes[0].set(title=f"LeNet-5 sensitivity (seed {first['seed']}): one layer pruned alone",
                xlabel="layer sparsity (%)", ylabel="test accuracy (%)")
    _plot_gradual(axes[1], results)
    _plot_trials(axes[2], results)
    _plot_lm(axes[3], results)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _plot_gradual(ax: Any, results: dict[str, Any]) -> None:
    for i, run in enumerate(results["lenet"]["per_seed"]):
        g = run["gradual"]
        ax.plot([100 * c[1] for c in g["checks"]], [100 * c[2] for c in g["checks"]], marker=".", color=f"C{i}",
                label=f"seed {run['seed']}")
        if g["stopped"]:
            bad = g["checks"][-1]
            ax.plot(100 * bad[1], 100 * bad[2], "x", color=f"C{i}", ms=10)
            ax.axvline(100 * g["sparsity"], color=f"C{i}", ls="--", lw=1, label=f"stop, held at {g['sparsity']:.1%}")
        ax.axhline(100 * (g["baseline"] - results["lenet"]["max_drop"]), color=f"C{i}", ls=":", lw=1)
    ax.set(title="gradual (uniform): accuracy after each mask update; x = first outside",
           xlabel="overall sparsity (%)", ylabel="test accuracy (%)")


def _plot_trials(ax: Any, results: dict[str, Any]) -> None:
    first = results["lenet"]["per_seed"][0]
    for i, (rule, r) in enumerate(first["oneshot"].items()):
        trials = sorted(r["trials"])
        ax.plot([100 * t[0] for t in trials], [100 * t[1] for t in trials], marker="o", color=f"C{i}", label=rule)
        ax.axvline(100 * r["sparsity"], color=f"C{i}", ls="--", lw=1)
    ax.axhline(100 * (first["dense"] - results["lenet"]["max_drop"]), color="grey", ls=":", label="tolerance")
    ax.set(title=f"one-shot search trials (seed {first['seed']}); dashed: sparsity reached",
           xlabel="overall sparsity (%)", ylabel="test accuracy (%)")


def _plot_lm(ax: Any, results: dict[str, Any]) -> None:
    lm = results["lm"]
    if "skipped" in lm:
        ax.set(title=f"decoder LM skipped: {lm['skipped'][:60]}")
        return
    for i, rule in enumerate(lm["rules"]):
        trials = sorted({tuple(t[:2]) for s in lm["tolerances"].values() for t in s[rule]["trials"]})
        ax.plot([100 * t[0] for t in trials], [t[1] for t in trials], marker="o", color=f"C{i}", label=rule)
    for j, drop in enumerate(lm["tolerances"]):
        ax.axhline(lm["dense"] * (1 + float(drop)), color="grey", ls=":" if j else "--", lw=1,
                   label=f"dense +{100 * float(drop):g}%")
    ax.set_yscale("log")
    ax.set(title=f"{lm['model'][:40]}: search trials (Wanda)", xlabel="overall sparsity (%)",
           ylabel="perplexity (log)")


# -- entry point ------------------------------------------------------------------------------------


def run(out: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
        progress: bool | None = None) -> dict[str, Any]:
    """Run the experiment and write ``table.md``, ``results.json`` and ``plot.png`` into ``out``.

    Args:
        out: output directory (created if missing).
        quick: the tiny :data:`QUICK` variant (seconds; for tests).
        seeds: LeNet-5 seeds (default 0..2; 0 with ``quick``); MiniLM and the decoder LM run the first.
        progress: a bar over the stages (``None``: only on a terminal).

    Returns:
        The dict written to ``results.json``: ``lenet`` (``summary`` per allocation, ``per_seed`` with the
        searches, the gradual run's checks and the sensitivity curves), ``minilm`` (``rules``), ``lm``
        (``tolerances``: ``{max_drop: {rule: search}}``), ``seconds``.

    Example:
        >>> results = run("runs/when-to-stop", quick=True)  # doctest: +SKIP
        >>> sorted(results["lenet"]["summary"])[0]  # doctest: +SKIP
        'gradual uniform (StopWhen)'
    """
    config, seeds, out = check_run_args(NAME, out, quick, seeds, QUICK, FULL)
    started = time.perf_counter()
    data = _digits(config.lenet)
    stages = len(seeds) * (len(LENET_RULES) + 2) + (len(MINILM_RULES) if config.minilm else 0) + \
        (len(LM_RULES) * len(config.lm.drops) if config.lm else 0)
    with progress_bar(progress, total=stages, desc=NAME, unit="stage") as bar:
        lenet = [_lenet_seed(data, config.lenet, seed, config.accuracy_drop, bar) for seed in seeds]
        minilm = {"skipped": "not in this variant"} if config.minilm is None else \
            _minilm(config.minilm, config.cosine_drop, seeds[0], bar)
        lm = {"skipped": "not in this variant"} if config.lm is None else _lm(config.lm, seeds[0], bar)
    described = f"MNIST-5k: {len(data.X):,} train / {len(data.X_test):,} test digits"
    results = _results(config, quick, seeds, lenet, minilm, lm, described, time.perf_counter() - started)
    table = format_table(results)
    write_run_files(out, results, table, _plot)
    print(table)
    return results
