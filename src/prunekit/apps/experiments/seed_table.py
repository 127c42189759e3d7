"""``seed-table``: accuracy, file size and latency of pruned models across model families.

Families: LeNet-300-100 (MLP), LeNet-5 (CNN) and :class:`~prunekit.apps.models.RowLSTM`
(an LSTM reading an image one pixel row per time step), all on MNIST-5k (4,000
train / 1,000 test digits), plus all-MiniLM-L6-v2 sentence embeddings pruned one-shot.

For each seed, each small model is trained dense once (Adam). Every target
sparsity then fine-tunes its own copy of that dense model while a
:class:`~prunekit.Pruner` raises the sparsity gradually from 0 to the target
(:class:`~prunekit.PolynomialDecay`, power 3, Zhu & Gupta 2017) over the first
part of the fine-tuning steps; the remaining steps train at the target. Ranking
is global magnitude over every weight tensor (biases are never pruned). The 0%
row gets the same fine-tuning without pruning, so every row has the same
training budget. Each stripped model is then measured:

* test accuracy, and the sparsity of its pruned weight tensors;
* the bytes :func:`prunekit.formats.save` writes, lossless and with
  ``quantize="int8"`` (:func:`prunekit.formats.quantize_int8`), and the test
  accuracy of the int8 file loaded back;
* latency (first seed only; one thread): median milliseconds per forward pass
  at batch 1 and a small batch, dense-with-zeros vs
  :func:`prunekit.runtime.accelerate`, which times sparse kernels against
  dense per layer and keeps the faster. The runtime does not cover the LSTM,
  so its rows report the dense latency alone.

MiniLM: one-shot Wanda pruning of the encoder's linear layers on calibration
sentences (:mod:`prunekit.methods.oneshot`), quality = mean cosine similarity between
the dense and the pruned model's sentence embeddings; one deterministic run.
Where one-shot pruning or ``transformers`` is not installed, the row says so.

Writes ``table.md``, ``results.json``, ``plot.png`` (sparsity against quality,
one panel per family) and ``schedule.png`` (the pruning schedules) into the
output directory.
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..._io import atomic_open
from ..._progress import progress_bar
from ..._repro import seeded
from ...core.pruner import Pruner, strip
from ...core.schedules import PolynomialDecay
from ...core.scope import resolve_scope
from ...formats import load, save
from ...runtime import accelerate
from ...training.data import load_mnist5k
from ...training.loop import epoch_seed, evaluate, train
from ..models import LeNet5, LeNet300100, RowLSTM
from . import check_run_args, write_run_files

__all__ = ["Config", "Family", "FAMILIES", "FULL", "QUICK", "NOT_AVAILABLE", "format_table", "make_schedule",
           "latency_cell", "measured_sparsity", "median_ms", "run", "write_outputs"]

NAME = "seed-table"
NOT_AVAILABLE = "one-shot pruning not available"
NOT_COVERED = "the runtime does not cover nn.LSTM (prunekit.runtime has no sparse recurrent module)"


@dataclass(frozen=True)
class Config:
    """Sizes and hyper-parameters of one variant of the experiment.

    Attributes:
        train_samples: training digits used (``None``: all 4,000).
        test_samples: test digits used (``None``: all 1,000).
        epochs: dense training epochs (Adam).
        finetune_epochs: fine-tuning epochs per target sparsity (pruning happens during them).
        ramp_fraction: share of the fine-tuning steps over which sparsity rises to the target.
        updates: mask updates during the ramp.
        batch_size: samples per optimizer step.
        sparsities: target sparsities of the small models.
        seeds: seeds run by default.
        latency_batches: batch sizes timed (first seed only).
        latency_repeats: timed forward passes per model and batch size (median reported).
        minilm_sparsities: target sparsities of the one-shot MiniLM row.
        calibration_sentences: calibration sentences for one-shot pruning.
        evaluation_sentences: sentences whose embeddings are compared (``None``: the whole split).
        corpus_sentences: corpus sentences searched by the top-10 neighbour queries.
        minilm_artifacts: also measure MiniLM's file sizes and latency.
    """

    train_samples: int | None
    test_samples: int | None
    epochs: int
    finetune_epochs: int
    ramp_fraction: float
    updates: int
    batch_size: int
    sparsities: tuple[float, ...]
    seeds: int
    latency_batches: tuple[int, ...]
    latency_repeats: int
    minilm_sparsities: tuple[float, ...]
    calibration_sentences: int
    evaluation_sentences: int | None
    corpus_sentences: int
    minilm_artifacts: bool


SPARSITIES = (0.0, 0.5, 0.75, 0.8, 0.875, 0.9, 0.95)
FULL = Config(None, None, epochs=20, finetune_epochs=10, ramp_fraction=0.6, updates=12, batch_size=64,
              sparsities=SPARSITIES, seeds=3, latency_batches=(1, 32), latency_repeats=200,
              minilm_sparsities=SPARSITIES, calibration_sentences=128, evaluation_sentences=None,
              corpus_sentences=300, minilm_artifacts=True)
# Seconds, for tests: the numbers mean little.
QUICK = Config(600, 300, epochs=2, finetune_epochs=2, ramp_fraction=0.6, updates=4, batch_size=64,
               sparsities=(0.0, 0.5, 0.9), seeds=1, latency_batches=(1,), latency_repeats=10,
               minilm_sparsities=(0.0, 0.5), calibration_sentences=8, evaluation_sentences=24,
               corpus_sentences=48, minilm_artifacts=False)


@dataclass(frozen=True)
class Family:
    """One small model of the table.

    Attributes:
        label: name in the table.
        build: a fresh, randomly initialized model (under the caller's seed).
        lr: Adam learning rate (dense training and fine-tuning).
        accelerated: whether :func:`prunekit.runtime.accelerate` covers the model
            (if not, only the dense latency is measured).
    """

    label: str
    build: Callable[[], nn.Module]
    lr: float
    accelerated: bool


FAMILIES: dict[str, Family] = {
    "mlp": Family("LeNet-300-100 (MLP)", LeNet300100, 1e-3, True),
    "cnn": Family("LeNet-5 (CNN)", LeNet5, 1e-3, True),
    "lstm": Family("RowLSTM (LSTM, 28 rows × 28 pixels)", RowLSTM, 2e-3, False),
}


@dataclass
class _Data:
    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def _load(config: Config) -> _Data:
    X, y = load_mnist5k("train")
    X_test, y_test = load_mnist5k("test")
    n, m = config.train_samples or len(X), config.test_samples or len(X_test)
    return _Data(X[:n], y[:n], X_test[:m], y_test[:m])


def make_schedule(config: Config, train_samples: int, sparsity: float) -> tuple[PolynomialDecay, int]:
    """The fine-tuning schedule to ``sparsity`` and the number of fine-tuning steps.

    The ramp ends at the last mask update, a multiple of the update frequency
    (so the target is reached exactly) near ``ramp_fraction`` of the steps.

    Example:
        >>> schedule, steps = make_schedule(FULL, 4000, 0.9)
        >>> steps, schedule.end_step, schedule.frequency, schedule.sparsity(schedule.end_step)
        (630, 372, 31, 0.9)
    """
    steps = config.finetune_epochs * math.ceil(train_samples / config.batch_size)
    frequency = max(1, round(config.ramp_fraction * steps) // config.updates)
    end = min(frequency * config.updates, steps - 1)
    end -= end % frequency
    return PolynomialDecay(0.0, sparsity, begin_step=0, end_step=end, power=3.0, frequency=frequency), steps


# -- one small model ----------------------------------------------------------------------------


def _train_dense(family: Family, data: _Data, config: Config, seed: int) -> nn.Module:
    model = family.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=family.lr)
    train(model, data.X, data.y, epochs=config.epochs, batch_size=config.batch_size, optimizer=optimizer,
          seed=seed, progress=False)
    return model


def _finetune(dense: nn.Module, family: Family, data: _Data, config: Config, seed: int, sparsity: float) -> nn.Module:
    """A copy of ``dense`` fine-tuned while pruned gradually to ``sparsity``, stripped."""
    model = copy.deepcopy(dense)
    optimizer = torch.optim.Adam(model.parameters(), lr=family.lr)
    if sparsity > 0:
        schedule, _ = make_schedule(config, len(data.X), sparsity)
        Pruner(model, schedule, ranking="global", optimizer=optimizer)
    train(model, data.X, data.y, epochs=config.finetune_epochs, batch_size=config.batch_size, optimizer=optimizer,
          seed=epoch_seed(seed, 1000 + round(sparsity * 1000)), progress=False)
    return strip(model)


def measured_sparsity(model: nn.Module) -> float:
    """Zeros among the weights that the default pruning scope covers (biases and norms excluded).

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight[0].zero_()
        >>> measured_sparsity(layer)
        0.5
    """
    weights = [t.param.detach() for t in resolve_scope(model).targets]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _sizes(model: nn.Module, family: Family, data: _Data) -> dict[str, float]:
    """Bytes written by ``save`` (lossless and int8), and the accuracy of the int8 file loaded back."""
    with tempfile.TemporaryDirectory(prefix="prunekit-seed-table-") as tmp:
        lossless = save(model, Path(tmp) / "model.pkt")
        int8 = save(model, Path(tmp) / "model.int8.pkt", quantize="int8")
        restored = family.build()
        load(Path(tmp) / "model.int8.pkt", restored)
    accuracy = evaluate(restored, data.X_test, data.y_test)["accuracy"]
    return {"bytes": lossless, "int8_bytes": int8, "int8_accuracy": accuracy}


def median_ms(models: dict[str, nn.Module], call: Callable[[nn.Module], Any], repeats: int) -> dict[str, float]:
    """Median milliseconds of ``call(model)`` for each model, calls interleaved so drift hits all alike.

    Example:
        >>> net = nn.Linear(8, 8)
        >>> sorted(median_ms({"a": net, "b": net}, lambda m: m(torch.randn(1, 8)), repeats=5))
        ['a', 'b']
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):  # warm-up: allocator, lazy kernel choices
                call(model)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                call(model)
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def latency_cell(model: nn.Module, example: Any, repeats: int, *, covered: bool = True,
                 rtol: float = 1e-5) -> dict[str, Any]:
    """Median ms of ``model`` on ``example`` (a tensor or a mapping of keyword arguments), dense vs accelerated.

    Returns ``{"dense_ms", "accelerated_ms", "formats", "note"}``; ``accelerated_ms`` and
    ``formats`` are ``None`` when the runtime does not cover the model (``covered=False``)
    or :func:`prunekit.runtime.accelerate` refused its own result (``note`` says why).

    Example:
        >>> cell = latency_cell(nn.Linear(8, 8), torch.randn(1, 8), repeats=5)
        >>> sorted(cell)
        ['accelerated_ms', 'dense_ms', 'formats', 'note']
    """
    model.eval()
    call = (lambda m: m(**example)) if isinstance(example, dict) else (lambda m: m(example))
    note = None if covered else NOT_COVERED
    if covered:
        try:
            fast, report = accelerate(model, example, rtol=rtol, progress=False)
            ms = median_ms({"dense": model, "accelerated": fast}, call, repeats)
            return {"dense_ms": ms["dense"], "accelerated_ms": ms["accelerated"], "formats": report.choices,
                    "note": None}
        except RuntimeError as exc:  # the runtime refused its own result: report the dense latency only
            note = str(exc)
    return {"dense_ms": median_ms({"dense": model}, call, repeats)["dense"], "accelerated_ms": None,
            "formats": None, "note": note}


def _latency(model: nn.Module, family: Family, data: _Data, config: Config) -> dict[str, Any]:
    return {str(batch): latency_cell(model, data.X_test[:batch], config.latency_repeats, covered=family.accelerated)
            for batch in config.latency_batches}


def _run_family(family: Family, data: _Data, config: Config, seed: int, timed: bool) -> dict[str, Any]:
    dense = _train_dense(family, data, config, seed)
    rows = []
    for sparsity in config.sparsities:
        model = _finetune(dense, family, data, config, seed, sparsity)
        row = {"sparsity": sparsity, "accuracy": evaluate(model, data.X_test, data.y_test)["accuracy"],
               "measured_sparsity": measured_sparsity(model), **_sizes(model, family, data)}
        if timed:
            row["latency"] = _latency(model, family, data, config)
        rows.append(row)
    return {"dense_accuracy": evaluate(dense, data.X_test, data.y_test)["accuracy"], "rows": rows,
            "parameters": sum(p.numel() for p in dense.parameters()),
            "pruned_parameters": sum(t.param.numel() for t in resolve_scope(dense).targets)}


# -- MiniLM, one-shot ----------------------------------------------------------------------------


def _oneshot_api() -> tuple[dict[str, Callable[..., Any]] | None, str | None]:
    """The one-shot pruning functions, or ``None`` and why they cannot be used."""
    try:
        import transformers  # noqa: F401  (the model needs it; fail early with a clear reason)

        from ...methods.oneshot import prune_oneshot
        from .oneshot_minilm import LAYERS, MAX_LENGTH, embed, fidelity, load_minilm, sentence_split
    except ImportError as exc:
        return None, f"{NOT_AVAILABLE} ({exc})"
    return {"prune": prune_oneshot, "embed": embed, "fidelity": fidelity, "load": load_minilm,
            "split": sentence_split, "layers": LAYERS, "max_length": MAX_LENGTH}, None


def _encoder_linears(model: nn.Module) -> list[torch.Tensor]:
    root = getattr(model, "encoder", model)
    return [m.weight.detach() for m in root.modules() if isinstance(m, nn.Linear)]


@dataclass
class _MiniSetup:
    api: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    calibration: list[dict[str, torch.Tensor]]
    evaluation: list[str]
    corpus: list[str]
    dense_eval: torch.Tensor
    dense_corpus: torch.Tensor


def _mini_setup(api: dict[str, Any], config: Config) -> _MiniSetup:
    model, tokenizer = api["load"](progress=False)  # the experiment's own bar reports progress
    model.eval()
    chosen = api["split"]("calibration")[:config.calibration_sentences]
    # One sentence per sample: no padding, so no padded positions enter the layer statistics.
    calibration = [dict(tokenizer(text, truncation=True, max_length=api["max_length"], return_tensors="pt"))
                   for text in chosen]
    evaluation = api["split"]("evaluation")[:config.evaluation_sentences]
    corpus = api["split"]("corpus")[:config.corpus_sentences]
    return _MiniSetup(api, model, tokenizer, calibration, evaluation, corpus,
                      api["embed"](model, tokenizer, evaluation), api["embed"](model, tokenizer, corpus))


def _minilm_row(setup: _MiniSetup, sparsity: float, config: Config) -> dict[str, Any]:
    api, start = setup.api, time.perf_counter()
    pruned = copy.deepcopy(setup.model)
    if sparsity > 0:
        api["prune"](pruned, setup.calibration, method="wanda", sparsity=sparsity, layers=api["layers"],
                     progress=False)
    fid = api["fidelity"](setup.dense_eval, api["embed"](pruned, setup.tokenizer, setup.evaluation),
                          setup.dense_corpus, api["embed"](pruned, setup.tokenizer, setup.corpus))
    weights = _encoder_linears(pruned)
    row = {"sparsity": sparsity, "cosine": float(fid["cosine"]), "top10": float(fid["top10"]),
           "measured_sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)}
    if config.minilm_artifacts:
        with tempfile.TemporaryDirectory(prefix="prunekit-seed-table-") as tmp:
            row["bytes"] = save(pruned, Path(tmp) / "minilm.pkt")
            row["int8_bytes"] = save(pruned, Path(tmp) / "minilm.int8.pkt", quantize="int8")
        row["latency"] = _minilm_latency(pruned, setup, config)
    row["seconds"] = time.perf_counter() - start
    return row


def _minilm_latency(model: nn.Module, setup: _MiniSetup, config: Config) -> dict[str, Any]:
    out = {}
    for batch in config.latency_batches:
        inputs = dict(setup.tokenizer(setup.evaluation[:batch], padding=True, truncation=True, return_tensors="pt"))
        # Six blocks of float32 kernels that sum in another order drift ~1e-5 apart from the dense outputs.
        out[str(batch)] = latency_cell(model, inputs, max(10, config.latency_repeats // 10), rtol=1e-4)
    return out


def _run_minilm(config: Config, bar: tqdm) -> dict[str, Any]:
    api, reason = _oneshot_api()
    if api is None:
        bar.update(len(config.minilm_sparsities))
        return {"available": False, "note": reason, "rows": []}
    with seeded(0):
        setup = _mini_setup(api, config)
        rows = []
        for sparsity in config.minilm_sparsities:
            bar.set_postfix_str(f"MiniLM one-shot {sparsity:.1%}")
            rows.append(_minilm_row(setup, sparsity, config))
            bar.update(1)
    return {"available": True, "note": None, "method": "wanda", "layers": api["layers"],
            "calibration_sentences": len(setup.calibration), "evaluation_sentences": len(setup.evaluation),
            "corpus_sentences": len(setup.corpus), "parameters": sum(p.numel() for p in setup.model.parameters()),
            "rows": rows}


# -- aggregation -----------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def _aggregate_family(key: str, runs: list[dict[str, Any]], config: Config) -> dict[str, Any]:
    family = FAMILIES[key]
    rows = []
    for i, sparsity in enumerate(config.sparsities):
        cells = [run["rows"][i] for run in runs]
        row = {"sparsity": sparsity, **{k: _stats([c[k] for c in cells]) for k in
                                         ("accuracy", "measured_sparsity", "bytes", "int8_bytes", "int8_accuracy")}}
        row["latency"] = cells[0]["latency"]  # measured on the first seed only
        rows.append(row)
    return {"label": family.label, "lr": family.lr, "accelerated": family.accelerated,
            "parameters": runs[0]["parameters"], "pruned_parameters": runs[0]["pruned_parameters"],
            "dense_accuracy": _stats([run["dense_accuracy"] for run in runs]), "rows": rows}


def _schedule_info(config: Config, train_samples: int) -> dict[str, Any]:
    schedule, steps = make_schedule(config, train_samples, max(config.sparsities))
    return {"kind": "PolynomialDecay", "initial_sparsity": 0.0, "power": schedule.power,
            "begin_step": schedule.begin_step, "end_step": schedule.end_step, "frequency": schedule.frequency,
            "finetune_steps": steps, "ranking": "global magnitude",
            "curves": {str(s): [make_schedule(config, train_samples, s)[0].sparsity(t) if s > 0 else 0.0
                                for t in range(steps + 1)] for s in config.sparsities}}


# -- table and plots ---------------------------------------------------------------------------------


def _kb(value: float) -> str:
    return f"{value / 1000:,.1f}"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _quality_lines(results: dict[str, Any]) -> list[str]:
    n = len(results["seeds"])
    lines = [f"| model | sparsity | measured | test accuracy (%), {n} seed{'s' if n > 1 else ''} | int8 accuracy (%) "
             "| file (kB) | int8 file (kB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for fam in _families(results):
        for row in fam["rows"]:
            acc, q = row["accuracy"], row["int8_accuracy"]
            lines.append(f"| {fam['label']} | {row['sparsity']:.1%} | {row['measured_sparsity']['mean']:.1%} | "
                         f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f} | "
                         f"{100 * q['mean']:.1f} ± {100 * q['std']:.1f} | "
                         f"{_kb(row['bytes']['mean'])} | {_kb(row['int8_bytes']['mean'])} |")
    mini = results["minilm"]
    if not mini["available"]:
        lines.append(f"| MiniLM-L6 (one-shot) | — | — | {NOT_AVAILABLE} | — | — | — |")
    for row in mini["rows"]:
        lines.append(f"| MiniLM-L6 (one-shot Wanda) | {row['sparsity']:.1%} | {row['measured_sparsity']:.1%} | "
                     f"cosine {row['cosine']:.4f} (top-10 {row['top10']:.2f}) | — | "
                     f"{_kb(row['bytes']) if 'bytes' in row else '—'} | "
                     f"{_kb(row['int8_bytes']) if 'int8_bytes' in row else '—'} |")
    return lines


def _accelerated_cell(cell: dict[str, Any]) -> str:
    if cell["accelerated_ms"] is None:
        return "not covered¹" if cell["note"] == NOT_COVERED else "refused²"
    formats = list(cell["formats"].values())
    sparse = sum(f != "dense" for f in formats)
    return f"{_ms(cell['accelerated_ms'])} ({sparse}/{len(formats)} sparse)"


def _latency_rows(label: str, rows: list[dict[str, Any]], batches: list[str]) -> list[str]:
    lines = []
    for row in rows:
        lat = row.get("latency")
        if not lat:
            continue
        cells = []
        for b in batches:
            cells += [_ms(lat[b]["dense_ms"]), _accelerated_cell(lat[b])]
        lines.append(f"| {label} | {row['sparsity']:.1%} | " + " | ".join(cells) + " |")
    return lines


def _latency_lines(results: dict[str, Any]) -> list[str]:
    batches = [str(b) for b in results["config"]["latency_batches"]]
    head = "| model | sparsity | " + " | ".join(f"batch {b}: dense | batch {b}: accelerated" for b in batches) + " |"
    lines = [head, "|---|---:|" + "---:|" * (2 * len(batches))]
    for fam in _families(results):
        lines += _latency_rows(fam["label"], fam["rows"], batches)
    lines += _latency_rows("MiniLM-L6 (one-shot Wanda)", results["minilm"]["rows"], batches)
    return lines


def _refused_note(results: dict[str, Any]) -> str:
    rows = [row for fam in results["families"].values() for row in fam["rows"]] + results["minilm"]["rows"]
    cells = [cell for row in rows for cell in (row.get("latency") or {}).values()]
    if not any(c["accelerated_ms"] is None and c["note"] != NOT_COVERED for c in cells):
        return ""
    return ("² accelerate refused its result (output further from the dense model's than its rtol; the reason is "
            "in results.json): the dense latency is reported. ")


def _families(results: dict[str, Any]) -> list[dict[str, Any]]:
    # results.json stores keys sorted: put the families back in table order.
    fams = results["families"]
    return [fams[k] for k in FAMILIES if k in fams] + [v for k, v in fams.items() if k not in FAMILIES]


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report of :func:`run`'s results (ready to paste under a "Results" heading)."""
    cfg, sched = results["config"], results["schedule"]
    seeds = ", ".join(map(str, results["seeds"]))
    dense = "; ".join(f"{f['label']} {100 * f['dense_accuracy']['mean']:.1f} %" for f in _families(results))
    mini = results["minilm"]
    head = [
        f"### Pruning across model families ({results['data']})", "",
        f"Seeds {seeds}; accuracy is mean ± std over seeds, file sizes are means. Each small model is trained dense "
        f"for {cfg['epochs']} epochs (Adam), then every row fine-tunes a copy for {cfg['finetune_epochs']} epochs "
        f"({sched['finetune_steps']} steps) while the sparsity rises from 0 to the target (PolynomialDecay, power 3, "
        f"masks updated every {sched['frequency']} steps up to step {sched['end_step']}; global magnitude ranking over "
        f"all weight tensors, biases kept). The 0% row is fine-tuned the same way without pruning. Dense models before "
        f"fine-tuning: {dense}. \"measured\" is the zero fraction of the stripped model's prunable weights; files are "
        "the bytes `prunekit.save` writes (lossless, and `quantize=\"int8\"`); int8 accuracy is that file loaded back.",
        "",
        *_quality_lines(results), "",
    ]
    if mini["available"]:
        head += [f"MiniLM-L6: all-MiniLM-L6-v2 pruned one-shot with Wanda on {mini['calibration_sentences']} "
                 f"calibration sentences, one deterministic run; quality is the mean cosine similarity between dense "
                 f"and pruned sentence embeddings of {mini['evaluation_sentences']} evaluation sentences (top-10: "
                 "overlap of nearest-neighbour lists); \"measured\" covers the encoder's linear layers.", ""]
    else:
        head += [f"MiniLM-L6: {mini['note']}.", ""]
    head += [f"#### Latency (ms per forward pass, median of {cfg['latency_repeats']} interleaved calls, seed "
             f"{results['seeds'][0]}, one thread; dense-with-zeros vs `prunekit.runtime.accelerate`)", "",
             *_latency_lines(results), "",
             "(k/n sparse): of the n layers accelerate considered, k ran faster with a sparse kernel than dense "
             "on this machine and were swapped in.", "",
             f"¹ {NOT_COVERED}: the dense latency is reported. " + _refused_note(results)
             + "Latencies are from one shared machine and drift between runs; "
             "compare within a row.", "",
             f"Wall time {results['seconds']:.0f} s{' (--quick)' if results['quick'] else ''}; reproduce with "
             f"`prunekit experiment {NAME}{' --quick' if results['quick'] else ''} --out runs/{NAME}`.", ""]
    return "\n".join(head)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fams = _families(results)
    fig, axes = plt.subplots(1, len(fams) + 1, figsize=(4.2 * (len(fams) + 1), 4))
    for ax, fam in zip(axes, fams):
        xs = [100 * r["sparsity"] for r in fam["rows"]]
        for key, style, label in (("accuracy", "-o", "fp32"), ("int8_accuracy", "--s", "int8 file")):
            means, stds = ([100 * r[key][m] for r in fam["rows"]] for m in ("mean", "std"))
            ax.errorbar(xs, means, yerr=stds, fmt=style, capsize=3, label=label)
        ax.set_title(fam["label"], fontsize=9)
        ax.set_ylabel("test accuracy (%)")
    mini, ax = results["minilm"], axes[-1]
    if mini["available"]:
        ax.plot([100 * r["sparsity"] for r in mini["rows"]], [r["cosine"] for r in mini["rows"]], "-o")
    else:
        ax.text(0.5, 0.5, NOT_AVAILABLE, ha="center", va="center", transform=ax.transAxes)
    ax.set_title("MiniLM-L6, one-shot Wanda", fontsize=9)
    ax.set_ylabel("mean cosine to dense embeddings")
    for ax in axes:
        ax.set_xlabel("target sparsity (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{NAME}: seeds {results['seeds']}")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _plot_schedule(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    sched = results["schedule"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for target, curve in sched["curves"].items():
        # Masks change only at update steps: draw the sparsity actually in force.
        held = [curve[t - t % sched["frequency"]] if t <= sched["end_step"] else curve[-1] for t in range(len(curve))]
        ax.step(range(len(held)), [100 * v for v in held], where="post", label=f"target {float(target):.1%}")
    ax.axvline(sched["end_step"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("fine-tuning step (after dense training)")
    ax.set_ylabel("sparsity in force (%)")
    ax.set_title(f"PolynomialDecay from 0, power 3, update every {sched['frequency']} steps", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


# -- entry point ---------------------------------------------------------------------------------------




def _run_small(data: _Data, config: Config, seeds: list[int], bar: tqdm) -> dict[str, Any]:
    per_family: dict[str, list[dict[str, Any]]] = {key: [] for key in FAMILIES}
    for seed in seeds:
        for key, family in FAMILIES.items():
            bar.set_postfix_str(f"seed {seed}: {key}")
            with seeded(seed):
                per_family[key].append(_run_family(family, data, config, seed, timed=seed == seeds[0]))
            bar.update(1)
    return {key: _aggregate_family(key, runs, config) for key, runs in per_family.items()}


def run(out: str | Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
        progress: bool | None = None) -> dict[str, Any]:
    """Run the experiment and write ``table.md``, ``results.json``, ``plot.png`` and ``schedule.png`` into ``out``.

    Args:
        out: output directory (created if missing).
        quick: the small :data:`QUICK` variant (seconds; for tests).
        seeds: seeds of the small models (default: 0..2, or 0 with ``quick``).
        progress: a tqdm bar over the stages (``None``: only on a terminal).

    Returns:
        The dict written to ``results.json``: ``families`` (per family ``rows``, one per
        sparsity, with ``accuracy``, ``measured_sparsity``, ``bytes``, ``int8_bytes``,
        ``int8_accuracy`` as ``{mean, std, values}`` and ``latency`` of the first seed),
        ``minilm`` (``available``, ``note``, ``rows``), ``schedule``, ``config``, ``seeds``, ``seconds``.

    Example:
        >>> results = run("runs/seed-table", quick=True)  # doctest: +SKIP
        >>> [r["sparsity"] for r in results["families"]["mlp"]["rows"]]  # doctest: +SKIP
        [0.0, 0.5, 0.9]
    """
    config, seeds, out = check_run_args(NAME, out, quick, seeds, QUICK, FULL)
    started = time.perf_counter()
    data = _load(config)
    total = len(seeds) * len(FAMILIES) + len(config.minilm_sparsities)
    with progress_bar(progress, total=total, desc=NAME, unit="stage") as bar:
        families = _run_small(data, config, seeds, bar)
        minilm = _run_minilm(config, bar)
    results = {
        "experiment": NAME, "quick": quick, "seeds": seeds, "config": asdict(config),
        "sparsities": list(config.sparsities),
        "data": f"MNIST-5k: {len(data.X):,} train / {len(data.X_test):,} test digits",
        "schedule": _schedule_info(config, len(data.X)), "families": families, "minilm": minilm,
        "seconds": time.perf_counter() - started,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": 1},
    }
    print(write_outputs(results, out))
    return results


def write_outputs(results: dict[str, Any], out: str | Path) -> str:
    """Write ``results.json``, ``table.md``, ``plot.png`` and ``schedule.png`` (atomically); return the table.

    Every file is a function of ``results``, so a table can be re-rendered from a saved ``results.json``.

    Example:
        >>> import json
        >>> table = write_outputs(json.loads(Path("runs/seed-table/results.json").read_text()),
        ...                       "runs/seed-table")  # doctest: +SKIP
    """
    out = Path(out)
    table = format_table(results)
    write_run_files(out, results, table, _plot)
    _plot_schedule(results, out / "schedule.png")
    return table
