"""Sparse inference on CPU: torch dense vs torch CSR vs ``prunekit.accelerate`` on BERT-FFN-4.

Workload (DESIGN.md §6): four blocks of Linear(768→3072)–ReLU–Linear(3072→768)–ReLU,
fp32, magnitude-pruned layer-wise (``prunekit.Pruner(model, s, granularity=g)`` then
``prunekit.strip``): unstructured at each sparsity, 2:4 along the inputs, and 8x1
blocks (8 consecutive output rows share their zeros) at 90%; batch 1 and 64, under
``torch.inference_mode()``.

- **dense**: the stripped model as is (the oracle).
- **torch CSR**: what a user writes with plain torch: each weight as
  ``weight.to_sparse_csr()`` and ``torch.sparse.mm(W, x.T).T + b``.
- **prunekit kernel**: every Linear as a ``SparseLinear`` in prunekit's own kernel for the
  pattern (``prunekit.runtime.kernels``, compiled at first use): CSR for unstructured,
  ``prunekit-nm`` for 2:4, ``prunekit-rows`` for 8x1 blocks; no per-layer selection. If
  the kernel is unavailable its column says so.
- **accelerate**: ``prunekit.accelerate(model, x)`` with x of the measured batch;
  it times dense/CSR/BSR/prunekit-kernel per layer and keeps the fastest.

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
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import numpy as np
from torch import nn

import prunekit
from prunekit._io import atomic_write_json
from prunekit.runtime import kernels
from prunekit.runtime.selection import relative_error

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
FULL_REPEATS, QUICK_REPEATS = 60, 6
# Calls in a row per variant per round; the first after a switch is not counted. Per-call
# alternation would time every variant with caches cold from the others (the dense models'
# 75 MB of weights evict the sparse ones' ~9 MB from L3), which is not how a model is served.
BLOCK = 4
VARIANTS = ("dense", "torch_csr", "prunekit_kernel", "accelerate", "onnxruntime")
ORT_RTOL, DEEPSPARSE_RTOL = 1e-4, 1e-3
BENCH_DIR = Path(__file__).resolve().parent
DEEPSPARSE_VENV = Path(os.environ.get("PRUNEKIT_DEEPSPARSE_VENV") or BENCH_DIR.parent / ".venv-deepsparse")


def bert_ffn4() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(768, 3072), nn.ReLU(), nn.Linear(3072, 768), nn.ReLU()]
    return nn.Sequential(*layers)


class TorchCSRLinear(nn.Module):
    """The plain-torch baseline: ``torch.sparse.mm`` with a CSR weight (int64 indices)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.weight, x.t()).t() + self.bias


def torch_csr(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[TorchCSRLinear(m) if isinstance(m, nn.Linear) else m for m in model])


def kernel_model(model: nn.Sequential, label: str) -> nn.Sequential:
    """Every Linear run by prunekit's own kernel for the pattern (CSR, N:M or row blocks), no selection."""
    fmt, blocksize, pattern = KERNEL_FORMAT.get(label, ("prunekit", None, None))
    return nn.Sequential(*[prunekit.SparseLinear.from_linear(m, fmt, blocksize, pattern) if isinstance(m, nn.Linear)
                           else m for m in model])


def _time(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            models[n](x)
            models[n](x)
        for r in range(max(repeats // (BLOCK - 1), 1)):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                for i in range(BLOCK):  # steady state: the first call after a switch is not counted
                    t0 = time.perf_counter_ns()
                    models[n](x)
                    if i:
                        samples[n].append((time.perf_counter_ns() - t0) / 1e6)
    return {n: statistics.median(v) for n, v in samples.items()}


class OrtModel:
    """An onnxruntime session called like a torch module (torch tensor in, torch tensor out)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def _pruned(granularity: prunekit.Granularity, sparsity: float) -> nn.Sequential:
    torch.manual_seed(SEED)
    dense = bert_ffn4().eval()
    prunekit.Pruner(dense, sparsity, granularity=granularity)
    prunekit.strip(dense)
    return dense


def _row(pattern: tuple, batch: int, repeats: int, tmp: Path, io: dict[str, np.ndarray]) -> dict:
    label, granularity, sparsity = pattern
    dense = _pruned(granularity, sparsity)
    tag = label.replace(":", "of").replace(" ", "_")
    onnx_path = tmp / f"bert_ffn4_{tag}_s{sparsity:g}.onnx"
    if not onnx_path.exists():  # one export per sparsity, shared by both batches (dynamic batch dim)
        prunekit.export_onnx(dense, torch.randn(2, 768, generator=torch.Generator().manual_seed(SEED)), onnx_path,
                             dynamic_batch=True, rtol=ORT_RTOL)
    x = torch.randn(batch, 768, generator=torch.Generator().manual_seed(SEED + batch))
    fast, report = prunekit.accelerate(dense, x, repeats=max(repeats // 2, 3), progress=False)
    models = {"dense": dense, "torch_csr": torch_csr(dense)}
    if kernels.available()[0]:
        models["prunekit_kernel"] = kernel_model(dense, label)
    models |= {"accelerate": fast, "onnxruntime": OrtModel(onnx_path, torch.get_num_threads())}
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
        "key": key, "onnx": str(onnx_path), "pattern": label,
        "sparsity": sparsity, "batch": batch, "ms": ms,
        "ratio_vs_dense": {n: ms["dense"] / ms[n] for n in ms},
        "max_relative_error": errors,
        "accelerate_choices": dict(Counter(report.choices.values())),
        "accelerate_report": report.to_dict(),
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
    spec = {"cases": [{"key": r["key"], "onnx": r["onnx"], "batch": r["batch"], "input": f"x_{r['key']}",
                       "ref": f"ref_{r['key']}"} for r in rows],
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
    """Attach the worker's per-case results to the rows (``row["deepsparse"]``)."""
    cases = {c.get("key"): c for c in ds.get("cases", [])}
    for r in rows:
        c = cases.get(r["key"])
        if ds["status"] != "ok":
            r["deepsparse"] = {"status": ds["status"]}
        elif c is None or "deepsparse" not in c.get("ms", {}):
            reason = (c or {}).get("deepsparse_error", "no result from the worker")
            r["deepsparse"] = {"status": f"unavailable: {reason}"}
        else:
            d = c["ms"]["deepsparse"]
            r["deepsparse"] = {
                "status": "ok", "ms": d, "worker_onnxruntime_ms": c["ms"].get("onnxruntime"),
                "ort_over_deepsparse_same_process": c.get("ort_over_deepsparse"),
                "dense_over_deepsparse_cross_process": r["ms"]["dense"] / d,
                "accelerate_over_deepsparse_cross_process": r["ms"]["accelerate"] / d,
                "prunekit_kernel_over_deepsparse_cross_process":
                    r["ms"]["prunekit_kernel"] / d if "prunekit_kernel" in r["ms"] else None,
                "max_relative_error": c.get("max_relative_error", {}).get("deepsparse"),
                "compile_s": c.get("deepsparse_compile_s"),
            }


def _ds_cell(r: dict) -> tuple[str, str]:
    d = r["deepsparse"]
    if d["status"] != "ok":
        return d["status"], "–"
    ort = d["ort_over_deepsparse_same_process"]
    return (f"{d['ms']:.3f} ({d['dense_over_deepsparse_cross_process']:.2f}×"
            + (f"; {ort:.2f}× vs its ORT" if ort else "") + ")",
            f"{d['accelerate_over_deepsparse_cross_process']:.2f}")


def run(out: Path, quick: bool) -> str:
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    patterns = QUICK_PATTERNS if quick else PATTERNS
    rows: list[dict] = []
    io: dict[str, np.ndarray] = {}
    t_start = time.perf_counter()
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
              "deepsparse_worker_s": ds.get("worker_s"), "total_s": time.perf_counter() - t_start}
    atomic_write_json(out / "runtime.json", {
        "workload": "BERT-FFN-4 (4x Linear 768-3072-768 + ReLU), fp32, layer-wise magnitude pruning "
                    "(unstructured, 2:4 along the inputs, 8x1 blocks of output rows)",
        "seed": SEED, "repeats": repeats, "prunekit_kernel": list(kernels.available()), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "machine": platform.processor() or platform.machine(), "quick": quick, "rows": rows,
        "deepsparse": {k: v for k, v in ds.items() if k != "cases"}, "bench_seconds": timing,
        "notes": "ratio_vs_dense: same process, interleaved. deepsparse.*_cross_process: DeepSparse time from "
                 "the worker process (.venv-deepsparse) vs torch times from this process, measured minutes apart; "
                 "ort_over_deepsparse_same_process: interleaved in the worker.",
    })
    lines = [
        "## runtime: sparse inference, BERT-FFN-4\n",
        f"fp32, {torch.get_num_threads()} threads, `torch.inference_mode()`, median of about {repeats} forwards per "
        f"variant, interleaved in rounds of {BLOCK} forwards in a row (the first after a switch not counted: "
        "steady state, warm caches); ratio = dense time / variant time (>1 = faster than dense). "
        "torch CSR = `torch.sparse.mm(W_csr, x.T).T + b`; prunekit kernel = every layer as "
        "`SparseLinear` in prunekit's own kernel for the pattern (`prunekit`: CSR; `prunekit-nm` for 2:4; "
        "`prunekit-rows` for 8x1 blocks; no selection); accelerate = "
        "`prunekit.accelerate` (per-layer choice among dense/CSR/BSR/prunekit kernels, timed on this machine); "
        "onnxruntime = `prunekit.export_onnx` + "
        "`InferenceSession` (same threads, sequential), interleaved with the torch variants.\n",
        "DeepSparse 1.8.0 runs in a separate process (`.venv-deepsparse`, `bench/deepsparse_worker.py`), "
        "interleaved there with its own onnxruntime session: \"vs its ORT\" is that side-by-side ratio "
        "(ORT time / DeepSparse time). Its × vs dense and \"accel / DS\" (accelerate time / DeepSparse time; "
        ">1 = DeepSparse faster) divide times from two processes measured minutes apart.\n",
        "| batch | pattern | sparsity | dense ms | torch CSR ms (×) | prunekit kernel ms (×) | accelerate ms (×) "
        "| onnxruntime ms (×) | DeepSparse ms (×) | accel / DS | accelerate layers | max rel err |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        ms, x = r["ms"], r["ratio_vs_dense"]
        choice = ", ".join(f"{n} {f}" for f, n in sorted(r["accelerate_choices"].items()))
        ds_cell, ratio = _ds_cell(r)
        err = max([*r["max_relative_error"].values(), r["deepsparse"].get("max_relative_error") or 0.0])
        kern = (f"{ms['prunekit_kernel']:.3f} ({x['prunekit_kernel']:.2f}×)" if "prunekit_kernel" in ms
                else f"unavailable: {kernels.available()[1]}")
        lines.append(f"| {r['batch']} | {r['pattern']} | {r['sparsity']:.0%} | {ms['dense']:.3f} | {ms['torch_csr']:.3f} "
                     f"({x['torch_csr']:.2f}×) | {kern} | **{ms['accelerate']:.3f} ({x['accelerate']:.2f}×)** "
                     f"| {ms['onnxruntime']:.3f} ({x['onnxruntime']:.2f}×) | {ds_cell} | {ratio} | {choice} "
                     f"| {err:.1e} |")
    lines.append(f"\nBench time: {timing['torch_and_onnxruntime_s']:.0f} s torch + onnxruntime, DeepSparse setup "
                 + (f"{timing['deepsparse_setup_s']:.0f} s" if timing["deepsparse_setup_s"] is not None else "–")
                 + ", worker " + (f"{timing['deepsparse_worker_s']:.0f} s" if timing["deepsparse_worker_s"] else "–")
                 + f"; DeepSparse: {ds['status']}.")
    return "\n".join(lines)
