"""Time DeepSparse 1.8.0 and onnxruntime side by side on ONNX models (no torch here).

Run with ``.venv-deepsparse/bin/python`` (made by ``bench/deepsparse_env.sh``); the
runtime bench (``bench/runtime.py``) calls it. Standalone use::

    NM_DISABLE_ANALYTICS=1 .venv-deepsparse/bin/python bench/deepsparse_worker.py spec.json

``spec.json``::

    {"cases": [{"key": "s0.9_b64", "onnx": "/tmp/x/s0.9.onnx", "batch": 64,
                "input": "x_s0.9_b64", "ref": "ref_s0.9_b64"}, ...],
     "npz": "/tmp/x/io.npz",      # arrays named by "input"/"ref" (both optional)
     "repeats": 60, "num_cores": 2, "seed": 0, "rtol": 1e-3,
     "out": "/tmp/x/deepsparse.json"}   # optional; the JSON is always printed too

or, without a spec file: ``deepsparse_worker.py --onnx a.onnx b.onnx --batch 1 64
--repeats 60 [--num-cores N] [--npz io.npz] [--out res.json]`` (every model × every
batch; inputs ``x_<stem>_b<B>`` / references ``ref_<stem>_b<B>`` from the npz if present).

For each case: compile ``deepsparse.Engine(model, batch_size=B, num_cores=N)`` and an
``onnxruntime.InferenceSession`` (N intra-op threads, sequential, spinning off so the two
thread pools do not steal each other's cores), warm both up, then time them in rounds,
rotating which goes first: each runs ``BLOCK`` calls in a row per round and the first
call after a switch is not counted (it pays for caches the other engine evicted), until
about ``repeats`` calls of each are counted; report medians. Inputs
come from the npz (so they match the caller's) or else seeded numpy. Outputs are checked
against the npz reference: DeepSparse within ``rtol`` relative (``max|out-ref|/max|ref|``;
it reorders reductions), else the case is marked failed and not timed.

DeepSparse 1.8.0 bundles an onnxruntime that reads ONNX IR <= 9 and opsets <= 17, while
torch's exporter writes IR 10 / opset >= 18. If the graph only uses ops whose definition
did not change after opset 17 (Gemm, MatMul, Relu, Add, ...), a copy is written with IR 8 /
opset 17 declared, for DeepSparse only (the graph is untouched); otherwise the case fails
with that reason. onnxruntime always reads the original file.

Prints one JSON object on stdout (last line); exits 0 even when cases fail (each case
says why); exits 2 only if the spec itself is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402

# Ops whose ONNX definition is the same at opset 17 as at the newest opsets (so declaring
# opset 17 does not change the graph's meaning).
_STABLE_OPS = {"Gemm", "MatMul", "Relu", "Add", "Mul", "Sub", "Div", "Identity", "Transpose",
               "Tanh", "Sigmoid", "Constant", "Softmax", "Erf", "Sqrt"}
# QuantizeLinear / DequantizeLinear changed after opset 17 only by new attributes (saturate, block_size,
# output_dtype) and new types (float8, int4); a per-tensor or per-axis int8/uint8 QDQ graph (what
# onnxruntime's quantize_static writes: only ``axis``) means the same at opset 17.
_QDQ_OPS, _QDQ_ATTRS = {"QuantizeLinear", "DequantizeLinear"}, {"axis"}
_DS_MAX_IR, _DS_MAX_OPSET = 8, 17


BLOCK = 4  # calls in a row per engine per round (keep equal to bench/runtime.py's BLOCK)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = next((ln.strip() for ln in reversed(text) if ln.strip()), type(exc).__name__)
    return line[:300]


def _deepsparse_copy(path: Path, workdir: Path) -> Path:
    """``path`` itself, or a copy declaring IR 8 / opset 17 that DeepSparse 1.8.0 can read."""
    import onnx

    model = onnx.load(str(path))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if model.ir_version <= _DS_MAX_IR and opsets.get("ai.onnx", 0) <= _DS_MAX_OPSET:
        return path
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    qdq_ok = all({a.name for a in n.attribute} <= _QDQ_ATTRS for n in model.graph.node if n.op_type in _QDQ_OPS)
    ops -= _QDQ_OPS if qdq_ok else set()
    others = set(opsets) - {"ai.onnx"}
    if ops - _STABLE_OPS or others:
        raise RuntimeError(f"ONNX IR {model.ir_version} / opset {opsets} is newer than DeepSparse 1.8.0 reads "
                           f"(IR <= 9, opset <= 17) and ops {sorted(ops - _STABLE_OPS) or sorted(others)} "
                           "may differ at opset 17")
    model.ir_version = _DS_MAX_IR
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = _DS_MAX_OPSET
    out = workdir / f"{path.stem}.ir{_DS_MAX_IR}-opset{_DS_MAX_OPSET}.onnx"
    if not out.exists():
        onnx.save(model, str(out))
    return out


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    if out.shape != ref.shape:
        return float("inf")
    diff = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _case(case: dict, arrays: dict, repeats: int, cores: int, seed: int, rtol: float, workdir: Path) -> dict:
    import deepsparse

    batch, path = int(case["batch"]), Path(case["onnx"])
    res: dict = {"key": case.get("key", f"{path.stem}_b{batch}"), "onnx": str(path), "batch": batch}
    x = arrays.get(case.get("input", ""))
    if x is None:
        res["input"] = f"numpy default_rng({seed + batch}).standard_normal"
        x = np.random.default_rng(seed + batch).standard_normal((batch, 768), dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    ref = arrays.get(case.get("ref", ""))
    runners: dict = {}
    try:
        ds_path = _deepsparse_copy(path, workdir)
        res["deepsparse_onnx"] = str(ds_path)
        t0 = time.perf_counter()
        engine = deepsparse.Engine(model=str(ds_path), batch_size=batch, num_cores=cores)
        res["deepsparse_compile_s"] = time.perf_counter() - t0
        runners["deepsparse"] = lambda: engine.run([x])[0]
    except Exception as exc:  # noqa: BLE001 - any failure becomes the case's reason
        res["deepsparse_error"] = _one_line(exc)
    try:
        session = _ort_session(path, cores)
        feed = {session.get_inputs()[0].name: x}
        runners["onnxruntime"] = lambda: session.run(None, feed)[0]
    except Exception as exc:  # noqa: BLE001
        res["onnxruntime_error"] = _one_line(exc)
    errors = {}
    for name in list(runners):
        out = runners[name]()
        if ref is not None:
            errors[name] = _rel_err(out, ref)
            # A case's own rtol (an int8 model against the fp32 reference) holds for both runtimes.
            tol = float(case["rtol"]) if "rtol" in case else rtol if name == "deepsparse" else 1e-4
            if not errors[name] <= tol:
                res[f"{name}_error"] = f"output differs from reference by {errors[name]:.2e} relative (> {tol:g})"
                del runners[name]
    res["max_relative_error"] = errors
    names = list(runners)
    samples: dict = {n: [] for n in names}
    for n in names:  # warm-up
        runners[n]()
        runners[n]()
    for r in range(max(repeats // (BLOCK - 1), 1)):
        k = r % max(len(names), 1)
        for n in names[k:] + names[:k]:
            for i in range(BLOCK):  # steady state: the first call after a switch is not counted
                t0 = time.perf_counter_ns()
                runners[n]()
                if i:
                    samples[n].append((time.perf_counter_ns() - t0) / 1e6)
    res["ms"] = {n: statistics.median(v) for n, v in samples.items() if v}
    if "deepsparse" in res["ms"] and "onnxruntime" in res["ms"]:
        res["ort_over_deepsparse"] = res["ms"]["onnxruntime"] / res["ms"]["deepsparse"]
    return res


def _spec_from_args(argv: list[str]) -> dict:
    if len(argv) == 1 and argv[0].endswith(".json"):
        return json.loads(Path(argv[0]).read_text())
    p = argparse.ArgumentParser(prog="deepsparse_worker.py", description=__doc__.split("\n")[0])
    p.add_argument("--onnx", nargs="+", required=True)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--num-cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--npz", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cases = [{"key": f"{Path(o).stem}_b{b}", "onnx": o, "batch": b, "input": f"x_{Path(o).stem}_b{b}",
              "ref": f"ref_{Path(o).stem}_b{b}"} for o in a.onnx for b in a.batch]
    return {"cases": cases, "npz": a.npz, "repeats": a.repeats, "num_cores": a.num_cores, "seed": a.seed,
            "rtol": a.rtol, "out": a.out}


def main(argv: list[str]) -> int:
    try:
        spec = _spec_from_args(argv)
        cases = list(spec["cases"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(json.dumps({"error": f"bad spec: {_one_line(exc)}"}))
        return 2
    cores = int(spec.get("num_cores") or os.cpu_count() or 1)
    result: dict = {"python": platform.python_version(), "num_cores": cores, "repeats": int(spec.get("repeats", 60)),
                    "numpy": np.__version__, "cases": []}
    try:
        import deepsparse
        import onnxruntime

        result["deepsparse"] = deepsparse.__version__
        result["onnxruntime"] = onnxruntime.__version__
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"import failed: {_one_line(exc)}"
    if "error" not in result:
        arrays = dict(np.load(spec["npz"])) if spec.get("npz") else {}
        workdir = Path(spec.get("workdir") or (Path(cases[0]["onnx"]).parent if cases else "."))
        for case in cases:
            try:
                res = _case(case, arrays, result["repeats"], cores, int(spec.get("seed", 0)),
                            float(spec.get("rtol", 1e-3)), workdir)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                res = {"key": case.get("key"), "deepsparse_error": _one_line(exc)}
            print(f"  [deepsparse worker] {res['key']}: " + ", ".join(
                f"{n} {v:.3f} ms" for n, v in res.get("ms", {}).items()) +
                  (f" ({res['deepsparse_error']})" if "deepsparse_error" in res else ""), file=sys.stderr, flush=True)
            result["cases"].append(res)
    text = json.dumps(result, sort_keys=True)
    if spec.get("out"):
        tmp = Path(spec["out"]).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, spec["out"])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
