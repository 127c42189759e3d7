"""Sparse and int8 inference on CPU, BERT-FFN-4: prunekit vs the runtimes a user would pick instead.

Workload (DESIGN.md §6): four blocks of Linear(768→3072)–ReLU–Linear(3072→768)–ReLU,
fp32, magnitude-pruned layer-wise (``prunekit.Pruner(model, s, granularity=g)`` then
``prunekit.strip``): unstructured at each sparsity, 2:4 along the inputs, and 8x1
blocks (8 consecutive output rows share their zeros) at 90%; batch 1 and 64, under
``torch.inference_mode()``.

- **dense**: the stripped model as is (the oracle).
- **onnxruntime** (fp32) and onnxruntime's own int8 of the same ONNX file
  (``bench/quant.py``): **ORT int8 static** = ``quantize_static`` in QDQ format,
  per-channel int8 weights, uint8 activations (MinMax over ``CALIBRATION`` batches of 16
  inputs), and **ORT int8 dynamic** = ``quantize_dynamic`` (per-channel int8 weights).
  The "best dense" runtime of a row is the fastest of dense, onnxruntime and the two
  ORT int8 models; every speed-up is given against it and against torch dense.
- **prunekit kernel**: every Linear as a ``SparseLinear`` in prunekit's own fp32 kernel for the
  pattern (``prunekit.runtime.kernels``, compiled at first use): CSR for unstructured,
  ``prunekit-nm`` for 2:4, ``prunekit-rows`` for 8x1 blocks; no per-layer selection. If
  the kernel is unavailable its column says so.
- **prunekit int8**: every Linear as ``Int8Linear`` (``prunekit.runtime.int8``) in the
  pattern's sparse int8 format (csr, nm 2:4, rows 8), static activation scales from the
  same calibration inputs as ORT static; no selection.
- **accelerate**: ``prunekit.accelerate(model, x)`` with x of the measured batch;
  it times dense/CSR/BSR/prunekit-kernel per layer and keeps the fastest.
- **accelerate int8**: ``prunekit.accelerate(model, x, quantize="int8", calibration=...)``
  (same calibration): the fp32 candidates plus dense and sparse int8, fastest within
  the int8 tolerance per layer, checked end to end.

The int8 variants' output error against dense (fp32) is reported, not checked. The
torch CSR baseline of earlier versions of this bench is gone (0.06-0.8× dense: nobody
picks it for speed), which keeps the full run near 20 minutes on 2 cores.

The variants run side by side in one process, interleaved in rounds (rotating
order): per round each runs ``BLOCK`` forwards in a row and the first one after a
switch is not counted, so the figures are steady-state latencies with warm caches,
as when a model is served, while drifting machine load still hits all alike. The
median per variant is reported; ratios are
dense time / variant time (> 1 is faster than dense). Every variant's output is
checked against dense (max relative error). Seed 0.

- **onnxruntime**: each stripped model exported once per sparsity with
  ``prunekit.export_onnx(..., dynamic_batch=True)`` (temp dir), run by an
  ``onnxruntime.InferenceSession`` (intra-op threads = torch's, sequential, intra-op
  spinning off so its idle threads do not steal the cores from the torch variants it
  is interleaved with), in the same timing loop on the same input; must match dense
  within 1e-4 relative. Interleaving costs it: torch's OpenMP workers keep spinning
  after a torch forward, so the ORT run that follows is slower than alone (measured
  6.9 ms alone vs 9.0 ms interleaved, 90%, batch 64, 2 threads); the worker's
  onnxruntime time (no torch in that process) is the fairer absolute ORT number.
- **DeepSparse 1.8.0**: needs its own venv (``bench/deepsparse_env.sh`` makes
  ``.venv-deepsparse`` once; set ``PRUNEKIT_BENCH_DEEPSPARSE=0`` to skip). After the
  torch rows, ``bench/deepsparse_worker.py`` runs there on the same ONNX files and the
  same inputs (passed in an .npz with dense's outputs, checked within 1e-3 relative),
  timing DeepSparse and onnxruntime interleaved in *its* process. The DeepSparse-vs-
  onnxruntime ratio is therefore side by side; DeepSparse vs dense/accelerate divides a
  time from the worker process by one from this process (measured minutes apart), so
  it is only as good as the machine's stability. If DeepSparse cannot be installed or
  run, its column says ``unavailable: <reason>`` and the bench still succeeds.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

import prunekit
from prunekit._io import atomic_write_json
from prunekit.runtime import kernels
from prunekit.runtime.selection import relative_error

from .quant import BLOCK, OrtModel, ort_int8, prunekit_int8, time_interleaved

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
# (label, granularity, sparsity): unstructured at every sparsity, then the structured patterns whose
# kernels prunekit has (N:M along the inputs; blocks of consecutive output rows).
PATTERNS = ([("unstructured", prunekit.Unstructured(), s) for s in SPARSITIES]
            + [("2:4", prunekit.NM(2, 4), 0.5), ("8x1 blocks", prunekit.Blocks((8, 1)), 0.9)])
QUICK_PATTERNS = (PATTERNS[3], PATTERNS[5], PATTERNS[6])
# Which own kernel the "prunekit kernel" column runs for each pattern.
KERNEL_FORMAT = {"2:4": ("prunekit-nm", None, (2, 4)), "8x1 blocks": ("prunekit-rows", 8, None)}
BATCHES = (1, 64)
SEED = 0
# 30 keeps the full `make bench` near 20 minutes on 2 cores with the int8 variants added.
FULL_REPEATS, QUICK_REPEATS = 30, 6
# Calls in a row per variant per round (BLOCK, bench/quant.py): the first after a switch is not counted. Per-call
# alternation would time every variant with caches cold from the others (the dense models'
# 75 MB of weights evict the sparse ones' ~9 MB from L3), which is not how a model is served.
VARIANTS = ("dense", "onnxruntime", "ort_int8_static", "ort_int8_dynamic", "prunekit_kernel", "prunekit_int8",
            "accelerate", "accelerate_int8")
# The dense runtimes a user would pick instead; "best dense" is the fastest of them per row.
DENSE_RUNTIMES = ("dense", "onnxruntime", "ort_int8_static", "ort_int8_dynamic")
INT8_VARIANTS = ("ort_int8_static", "ort_int8_dynamic", "prunekit_int8", "accelerate_int8")
# Which int8 format the "prunekit int8" column runs for each pattern (Int8Linear fmt, blocksize, pattern).
INT8_FORMAT = {"2:4": ("nm", None, (2, 4)), "8x1 blocks": ("rows", 8, None)}
# Static calibration inputs (ORT static QDQ, prunekit int8, accelerate int8): 4 batches of 16, own seeds.
CALIBRATION = 4
ORT_RTOL, DEEPSPARSE_RTOL = 1e-4, 1e-3
# DeepSparse on onnxruntime's static int8 (QDQ) file, checked against the fp32 reference (ORT int8 static
# itself is 2-4e-2 from it here; accelerate's default int8_rtol is 0.1).
DEEPSPARSE_INT8_RTOL = 0.1
BENCH_DIR = Path(__file__).resolve().parent
DEEPSPARSE_VENV = Path(os.environ.get("PRUNEKIT_DEEPSPARSE_VENV") or BENCH_DIR.parent / ".venv-deepsparse")


def bert_ffn4() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(768, 3072), nn.ReLU(), nn.Linear(3072, 768), nn.ReLU()]
    return nn.Sequential(*layers)


def kernel_model(model: nn.Sequential, label: str) -> nn.Sequential:
    """Every Linear run by prunekit's own kernel for the pattern (CSR, N:M or row blocks), no selection."""
    fmt, blocksize, pattern = KERNEL_FORMAT.get(label, ("prunekit", None, None))
    return nn.Sequential(*[prunekit.SparseLinear.from_linear(m, fmt, blocksize, pattern) if isinstance(m, nn.Linear)
                           else m for m in model])


def _time(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    return time_interleaved({n: (lambda m=m: m(x)) for n, m in models.items()}, repeats, BLOCK)


def calibration_inputs() -> list[torch.Tensor]:
    """The static calibration batches (same distribution as the timed inputs, other seeds)."""
    return [torch.randn(16, 768, generator=torch.Generator().manual_seed(SEED + 1000 + i)) for i in range(CALIBRATION)]


def int8_model(model: nn.Sequential, label: str, calibration: list[torch.Tensor]) -> nn.Module:
    """Every Linear as prunekit's ``Int8Linear`` in the pattern's sparse int8 format, static scales; no selection."""
    fmt, blocksize, pattern = INT8_FORMAT.get(label, ("csr", None, None))
    return prunekit_int8(model, fmt, calibration, blocksize, pattern)


def _pruned(granularity: prunekit.Granularity, sparsity: float) -> nn.Sequential:
    torch.manual_seed(SEED)
    dense = bert_ffn4().eval()
    prunekit.Pruner(dense, sparsity, granularity=granularity)
    prunekit.strip(dense)
    return dense


def _onnx_files(dense: nn.Sequential, tag: str, sparsity: float, tmp: Path,
                calibration: list[torch.Tensor]) -> dict[str, Path]:
    """fp32 ONNX (``prunekit.export_onnx``) and onnxruntime's static / dynamic int8 of it, once per sparsity."""
    paths = {"onnxruntime": tmp / f"bert_ffn4_{tag}_s{sparsity:g}.onnx"}
    paths |= {f"ort_int8_{m}": paths["onnxruntime"].with_suffix(f".int8-{m}.onnx") for m in ("static", "dynamic")}
    if not paths["onnxruntime"].exists():  # shared by both batches (dynamic batch dim)
        prunekit.export_onnx(dense, torch.randn(2, 768, generator=torch.Generator().manual_seed(SEED)),
                             paths["onnxruntime"], dynamic_batch=True, rtol=ORT_RTOL)
        for mode in ("static", "dynamic"):
            ort_int8(paths["onnxruntime"], paths[f"ort_int8_{mode}"], mode, calibration)
    return paths


def _models(dense: nn.Sequential, label: str, x: torch.Tensor, repeats: int, paths: dict[str, Path],
            calibration: list[torch.Tensor]) -> tuple[dict[str, nn.Module], dict[str, object]]:
    """Every variant of one row, and the two accelerate reports."""
    threads = torch.get_num_threads()
    fast, report = prunekit.accelerate(dense, x, repeats=max(repeats // 2, 3), progress=False)
    fast8, report8 = prunekit.accelerate(dense, x, repeats=max(repeats // 2, 3), quantize="int8",
                                         calibration=calibration, progress=False)
    models = {"dense": dense, **{n: OrtModel(p, threads) for n, p in paths.items()}}
    if kernels.available()[0]:
        models["prunekit_kernel"] = kernel_model(dense, label)
    models |= {"prunekit_int8": int8_model(dense, label, calibration), "accelerate": fast, "accelerate_int8": fast8}
    return {n: models[n] for n in VARIANTS if n in models}, {"accelerate": report, "accelerate_int8": report8}


def _ratios(ms: dict[str, float]) -> dict:
    best = min((n for n in DENSE_RUNTIMES if n in ms), key=ms.get)
    return {"ratio_vs_dense": {n: ms["dense"] / ms[n] for n in ms}, "best_dense": best,
            "ratio_vs_best_dense": {n: ms[best] / ms[n] for n in ms}}


def _row(pattern: tuple, batch: int, repeats: int, tmp: Path, io: dict[str, np.ndarray]) -> dict:
    label, granularity, sparsity = pattern
    dense = _pruned(granularity, sparsity)
    tag = label.replace(":", "of").replace(" ", "_")
    calibration = calibration_inputs()
    paths = _onnx_files(dense, tag, sparsity, tmp, calibration)
    x = torch.randn(batch, 768, generator=torch.Generator().manual_seed(SEED + batch))
    models, reports = _models(dense, label, x, repeats, paths, calibration)
    with torch.inference_mode():
        ref = dense(x)
        errors = {n: relative_error(m(x), ref) for n, m in models.items()}
    if not errors["onnxruntime"] <= ORT_RTOL:
        raise RuntimeError(f"onnxruntime output differs from dense by {errors['onnxruntime']:.2e} relative "
                           f"(> {ORT_RTOL:g}) at sparsity {sparsity}, batch {batch}")
    key = f"{tag}_s{sparsity:g}_b{batch}"
    io[f"x_{key}"], io[f"ref_{key}"] = x.numpy().copy(), ref.numpy().copy()
    ms = _time(models, x, repeats)
    return {
        "key": key, "onnx": str(paths["onnxruntime"]), "onnx_int8": str(paths["ort_int8_static"]), "pattern": label,
        "sparsity": sparsity, "batch": batch, "ms": ms, **_ratios(ms),
        "max_relative_error": errors,
        "accelerate_choices": dict(Counter(reports["accelerate"].choices.values())),
        "accelerate_int8_choices": dict(Counter(reports["accelerate_int8"].choices.values())),
        "accelerate_report": reports["accelerate"].to_dict(),
        "accelerate_int8_report": reports["accelerate_int8"].to_dict(),
    }


def _tail(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and "Location 'file:" not in ln]
    return (lines[-1] if lines else "no output")[:300]


def _deepsparse(rows: list[dict], tmp: Path, io: dict[str, np.ndarray], repeats: int) -> dict:
    """Set up .venv-deepsparse and run the worker; ``{"status": "ok" | "unavailable: ...", ...}``."""
    if os.environ.get("PRUNEKIT_BENCH_DEEPSPARSE", "1") == "0":
        return {"status": "unavailable: skipped (PRUNEKIT_BENCH_DEEPSPARSE=0)"}
    env = {**os.environ, "NM_DISABLE_ANALYTICS": "1"}
    info: dict = {}
    t0 = time.perf_counter()
    try:
        setup = subprocess.run(["bash", str(BENCH_DIR / "deepsparse_env.sh")], env=env, capture_output=True,
                               text=True, timeout=1200)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"status": f"unavailable: venv setup failed: {type(exc).__name__}: {exc}"[:300]}
    info["setup_s"] = time.perf_counter() - t0
    info["setup"] = _tail(setup.stdout) if setup.returncode == 0 else _tail(setup.stderr or setup.stdout)
    if setup.returncode != 0:
        return {**info, "status": f"unavailable: venv setup failed: {info['setup']}"}
    print(f"  deepsparse venv: {info['setup']} ({info['setup_s']:.1f} s)", flush=True)
    np.savez(tmp / "io.npz", **io)
    cases = [{"key": r["key"], "onnx": r["onnx"], "batch": r["batch"], "input": f"x_{r['key']}",
              "ref": f"ref_{r['key']}"} for r in rows]
    cases += [{**c, "key": c["key"] + "_int8", "onnx": r["onnx_int8"], "rtol": DEEPSPARSE_INT8_RTOL}
              for c, r in zip(list(cases), rows)]
    spec = {"cases": cases,
            "npz": str(tmp / "io.npz"), "repeats": repeats, "num_cores": torch.get_num_threads(), "seed": SEED,
            "rtol": DEEPSPARSE_RTOL, "out": str(tmp / "deepsparse.json"), "workdir": str(tmp)}
    (tmp / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([str(DEEPSPARSE_VENV / "bin" / "python"), str(BENCH_DIR / "deepsparse_worker.py"),
                               str(tmp / "spec.json")], env=env, capture_output=True, text=True, timeout=1200)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {**info, "status": f"unavailable: worker failed: {type(exc).__name__}: {exc}"[:300]}
    info["worker_s"] = time.perf_counter() - t0
    sys.stderr.write("".join(ln + "\n" for ln in proc.stderr.splitlines() if ln.startswith("  [deepsparse")))
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {**info, "status": f"unavailable: worker exited {proc.returncode}: {_tail(proc.stderr)}"}
    if "error" in result:
        return {**info, **result, "status": f"unavailable: {result['error']}"}
    return {**info, **result, "status": "ok"}


def _merge(rows: list[dict], ds: dict) -> None:
    """Attach the worker's per-case results to the rows (``row["deepsparse"]``: fp32 file, ``"deepsparse_int8"``:
    onnxruntime's static int8 file)."""
    cases = {c.get("key"): c for c in ds.get("cases", [])}
    for r in rows:
        for name, key in (("deepsparse", r["key"]), ("deepsparse_int8", r["key"] + "_int8")):
            r[name] = _merged(r, cases.get(key), ds["status"])


def _merged(r: dict, c: dict | None, status: str) -> dict:
    if status != "ok":
        return {"status": status}
    if c is None or "deepsparse" not in c.get("ms", {}):
        return {"status": f"unavailable: {(c or {}).get('deepsparse_error', 'no result from the worker')}"}
    d = c["ms"]["deepsparse"]
    return {
        "status": "ok", "ms": d, "worker_onnxruntime_ms": c["ms"].get("onnxruntime"),
        "ort_over_deepsparse_same_process": c.get("ort_over_deepsparse"),
        "dense_over_deepsparse_cross_process": r["ms"]["dense"] / d,
        "best_dense_over_deepsparse_cross_process": r["ms"][r["best_dense"]] / d,
        "accelerate_int8_over_deepsparse_cross_process": r["ms"]["accelerate_int8"] / d,
        "accelerate_over_deepsparse_cross_process": r["ms"]["accelerate"] / d,
        "prunekit_kernel_over_deepsparse_cross_process":
            r["ms"]["prunekit_kernel"] / d if "prunekit_kernel" in r["ms"] else None,
        "max_relative_error": c.get("max_relative_error", {}).get("deepsparse"),
        "compile_s": c.get("deepsparse_compile_s"),
    }


def run(out: Path, quick: bool) -> str:
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    patterns = QUICK_PATTERNS if quick else PATTERNS
    rows: list[dict] = []
    io: dict[str, np.ndarray] = {}
    t_start, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="prunekit-bench-runtime-") as tmpdir:
        tmp = Path(tmpdir)
        for batch in BATCHES:
            for pattern in patterns:
                rows.append(_row(pattern, batch, repeats, tmp, io))
                r = rows[-1]
                print(f"  batch {batch:>2} {pattern[0]} {pattern[2]:.0%}: " + ", ".join(
                    f"{n} {r['ms'][n]:.3f} ms" for n in VARIANTS if n in r["ms"]), flush=True)
        torch_s = time.perf_counter() - t_start
        ds = _deepsparse(rows, tmp, io, repeats)
        io.clear()
    _merge(rows, ds)
    if ds["status"] != "ok":
        print(f"  deepsparse: {ds['status']}", flush=True)
    timing = {"torch_and_onnxruntime_s": torch_s, "deepsparse_setup_s": ds.get("setup_s"),
              "deepsparse_worker_s": ds.get("worker_s"), "total_s": time.perf_counter() - t_start,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    atomic_write_json(out / "runtime.json", {
        "workload": "BERT-FFN-4 (4x Linear 768-3072-768 + ReLU), fp32, layer-wise magnitude pruning "
                    "(unstructured, 2:4 along the inputs, 8x1 blocks of output rows)",
        "seed": SEED, "repeats": repeats, "prunekit_kernel": list(kernels.available()),
        "prunekit_int8": list(__import__("prunekit.runtime.int8", fromlist=["available"]).available()), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "machine": platform.processor() or platform.machine(), "quick": quick, "rows": rows,
        "deepsparse": {k: v for k, v in ds.items() if k != "cases"}, "bench_seconds": timing,
        "notes": "ratio_vs_dense: vs torch dense; ratio_vs_best_dense: vs the fastest of torch dense, ORT fp32, ORT "
                 "int8 static, ORT int8 dynamic (best_dense names it); same process, interleaved. deepsparse.*_cross_process: DeepSparse time from "
                 "the worker process (.venv-deepsparse) vs torch times from this process, measured minutes apart; "
                 "ort_over_deepsparse_same_process: interleaved in the worker.",
    })
    return _section(rows, ds, timing, repeats)


LABELS = {"dense": "torch dense", "onnxruntime": "ORT fp32", "ort_int8_static": "ORT int8 static",
          "ort_int8_dynamic": "ORT int8 dyn", "prunekit_kernel": "prunekit fp32", "prunekit_int8": "prunekit int8",
          "accelerate": "accel fp32", "accelerate_int8": "accel int8", "deepsparse": "DeepSparse",
          "deepsparse_int8": "DeepSparse int8"}
FAST = ("deepsparse", "deepsparse_int8", "prunekit_kernel", "prunekit_int8", "accelerate", "accelerate_int8")
_WORKER = ("deepsparse", "deepsparse_int8")


def _ms_cell(r: dict, name: str) -> str:
    if name in _WORKER:
        d = r[name]
        return f"{d['ms']:.3f}" if d["status"] == "ok" else d["status"][:60]
    if name not in r["ms"]:
        return f"unavailable: {kernels.available()[1]}"[:60]
    return f"{r['ms'][name]:.3f}"


def _ratio_cell(r: dict, name: str, base_ms: float) -> str:
    if name in _WORKER:
        ms = r[name].get("ms")
    else:
        ms = r["ms"].get(name)
    return f"{base_ms / ms:.2f}×" if ms else "–"


def _choices(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {f}" for f, n in sorted(counts.items()))


def _section(rows: list[dict], ds: dict, timing: dict, repeats: int) -> str:
    """The Markdown section: times, ratios (to the best dense runtime and to torch), int8 errors."""
    head = (f"## runtime: sparse and int8 inference, BERT-FFN-4\n\n"
            f"{torch.get_num_threads()} threads, `torch.inference_mode()`, median of about {repeats} forwards per "
            f"variant, interleaved in rounds of {BLOCK} forwards in a row (the first after a switch not counted: "
            "steady state, warm caches). torch dense = the pruned fp32 model as is; ORT fp32 = `prunekit.export_onnx` "
            "+ onnxruntime `InferenceSession` (same threads, sequential, no spinning); ORT int8 static = "
            "`onnxruntime.quantization.quantize_static` (QDQ, per-channel int8 weights, uint8 activations, MinMax "
            f"calibration on {CALIBRATION} batches of 16); ORT int8 dyn = `quantize_dynamic` (per-channel int8 "
            "weights); prunekit fp32 = every layer `SparseLinear` in prunekit's fp32 kernel for the pattern (CSR, "
            "`prunekit-nm` for 2:4, `prunekit-rows` for 8x1); prunekit int8 = every layer `Int8Linear` in the "
            "pattern's sparse int8 format (csr / nm / rows), static scales from the same calibration; accel fp32 = "
            "`prunekit.accelerate(model, x)`; accel int8 = `prunekit.accelerate(model, x, quantize=\"int8\", "
            "calibration=...)` (per layer the fastest of the fp32 and int8 candidates within tolerance). "
            "DeepSparse 1.8.0 runs the fp32 ONNX (DeepSparse) and onnxruntime's static int8 QDQ file (DeepSparse "
            "int8) in its own process (`.venv-deepsparse`, `bench/deepsparse_worker.py`), so its ratios divide times "
            "from two processes measured minutes apart.\n")
    t1 = ["| batch | pattern | sparsity | " + " | ".join(f"{LABELS[n]} ms" for n in (*DENSE_RUNTIMES, *FAST)) + " |",
          "|---:|---|---:|" + "---:|" * (len(DENSE_RUNTIMES) + len(FAST))]
    t2 = ["| batch | pattern | sparsity | best dense | " + " | ".join(f"{LABELS[n]} × best" for n in FAST) + " | "
          + " | ".join(f"{LABELS[n]} × torch" for n in FAST) + " |",
          "|---:|---|---:|---|" + "---:|" * (2 * len(FAST))]
    t3 = ["| batch | pattern | sparsity | " + " | ".join(f"{LABELS[n]} err" for n in INT8_VARIANTS)
          + " | DeepSparse int8 err | fp32 max err | accel fp32 layers | accel int8 layers |",
          "|---:|---|---:|" + "---:|" * (len(INT8_VARIANTS) + 2) + "---|---|"]
    for r in rows:
        lead = f"| {r['batch']} | {r['pattern']} | {r['sparsity']:.0%} | "
        t1.append(lead + " | ".join(_ms_cell(r, n) for n in (*DENSE_RUNTIMES, *FAST)) + " |")
        best = r["best_dense"]
        t2.append(lead + f"{LABELS[best]} {r['ms'][best]:.3f} ms | "
                  + " | ".join(_ratio_cell(r, n, r["ms"][best]) for n in FAST) + " | "
                  + " | ".join(_ratio_cell(r, n, r["ms"]["dense"]) for n in FAST) + " |")
        err = r["max_relative_error"]
        fp32 = max([v for n, v in err.items() if n not in INT8_VARIANTS]
                   + [r["deepsparse"].get("max_relative_error") or 0.0])
        ds8 = r["deepsparse_int8"].get("max_relative_error")
        t3.append(lead + " | ".join(f"{err[n]:.1e}" if n in err else "–" for n in INT8_VARIANTS)
                  + f" | {'–' if ds8 is None else f'{ds8:.1e}'} | {fp32:.1e} | {_choices(r['accelerate_choices'])} | {_choices(r['accelerate_int8_choices'])} |")
    tail = (f"\nBench time: {timing['torch_and_onnxruntime_s']:.0f} s torch + onnxruntime, DeepSparse setup "
            + (f"{timing['deepsparse_setup_s']:.0f} s" if timing["deepsparse_setup_s"] is not None else "–")
            + ", worker " + (f"{timing['deepsparse_worker_s']:.0f} s" if timing["deepsparse_worker_s"] else "–")
            + f"; DeepSparse: {ds['status']}. Load average (1/5/15 min) at start "
            + "/".join(f"{v:.1f}" for v in timing["loadavg_start"]) + ", at end "
            + "/".join(f"{v:.1f}" for v in timing["loadavg_end"]) + f" on {os.cpu_count()} CPUs (other processes "
            "share the cores: above the thread count, times are inflated and noisy).")
    return "\n".join([head, "Times (ms):\n", *t1,
                      "\nSpeed-ups: best dense = the fastest of torch dense / ORT fp32 / ORT int8 static / ORT int8 "
                      "dyn on that row; × best = best dense time / variant time, × torch = torch dense time / "
                      "variant time (>1 = faster).\n", *t2,
                      "\nOutput error vs the fp32 model (`max|y - y_fp32| / max|y_fp32|`), and what accelerate "
                      "chose (layers per format):\n", *t3, tail])
