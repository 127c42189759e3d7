"""The int8 / whole-model bench pieces on tiny models (the bench itself is ``make bench``; no timings here)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("onnxruntime")
quant = importlib.import_module("bench.quant")
runtime = importlib.import_module("bench.runtime")
main = importlib.import_module("bench.__main__")

import prunekit  # noqa: E402
from prunekit.runtime.selection import relative_error  # noqa: E402


def _tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    prunekit.Pruner(model, 0.8)
    return prunekit.strip(model)


def test_benchmarks_registered_and_unknown_rejected(capsys):
    names = [n for n, _ in main.BENCHES]
    assert "runtime" in names and "models" in names
    assert all(importlib.util.find_spec(module) for _, module in main.BENCHES)
    with pytest.raises(SystemExit):
        main.main(["--only", "no-such-bench"])
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_ort_int8_close_to_fp32_and_differs(tmp_path, mode):
    model = _tiny()
    src = tmp_path / "m.onnx"
    prunekit.export_onnx(model, torch.randn(2, 32), src, dynamic_batch=True)
    calib = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    dst = quant.ort_int8(src, tmp_path / f"m.{mode}.onnx", mode, calib)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        ref = model(x)
    fp32 = quant.OrtModel(src, 1)(x)
    int8 = quant.OrtModel(dst, 1)(x)
    assert relative_error(fp32, ref) <= 1e-5
    err = relative_error(int8, ref)
    assert 1e-6 < err < 0.5  # quantized (QDQ rounds the outputs too): near, but not the fp32 result
    import onnx

    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ("QuantizeLinear" in ops) if mode == "static" else ({"DynamicQuantizeLinear", "MatMulInteger"} & ops)


def test_prunekit_int8_model_static_scales():
    int8 = pytest.importorskip("prunekit.runtime.int8")
    model = _tiny(1)
    calib = [torch.randn(4, 32), 2 * torch.randn(4, 32)]
    scales = quant.static_scales(model, calib)
    want0 = max(float(c.abs().max()) for c in calib) / 127
    assert set(scales) == {"0", "2"} and scales["0"] == pytest.approx(want0, rel=1e-6)
    q = quant.prunekit_int8(model, "csr", calib)
    assert all(isinstance(q[i], int8.Int8Linear) and q[i].activations == "static" for i in (0, 2))
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    x = torch.randn(3, 32)
    with torch.inference_mode():
        assert relative_error(q(x), model(x)) < 0.1


def test_time_interleaved_counts_and_rotates():
    order: list[str] = []
    calls = {n: (lambda n=n: order.append(n)) for n in ("a", "b", "c")}
    ms = quant.time_interleaved(calls, repeats=6, block=4)
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())
    rounds = 6 // 3
    assert len(order) == 3 * 2 + rounds * 3 * 4  # warm-up twice each, then block calls per round
    assert order[6:10] == ["a"] * 4 and order[18:22] == ["b"] * 4  # round 2 starts with the next variant


def _row(batch: int) -> dict:
    ms = {n: 1.0 + i for i, n in enumerate(runtime.VARIANTS)}
    ms["ort_int8_static"] = 0.5
    return {"key": f"k{batch}", "batch": batch, "pattern": "unstructured", "sparsity": 0.9, "ms": ms,
            **runtime._ratios(ms), "max_relative_error": {n: 1e-3 for n in runtime.VARIANTS},
            "accelerate_choices": {"prunekit": 8}, "accelerate_int8_choices": {"int8-csr": 8},
            "deepsparse": {"status": "unavailable: skipped"}, "deepsparse_int8": {"status": "unavailable: skipped"}}


def test_runtime_section_ratios_to_best_dense():
    r = _row(64)
    assert r["best_dense"] == "ort_int8_static"
    assert r["ratio_vs_best_dense"]["accelerate_int8"] == pytest.approx(0.5 / r["ms"]["accelerate_int8"])
    assert r["ratio_vs_dense"]["accelerate_int8"] == pytest.approx(1.0 / r["ms"]["accelerate_int8"])
    timing = {"torch_and_onnxruntime_s": 1.0, "deepsparse_setup_s": None, "deepsparse_worker_s": None,
              "loadavg_start": (1.0, 1.0, 1.0), "loadavg_end": (2.0, 2.0, 2.0)}
    text = runtime._section([r, _row(1)], {"status": "unavailable: skipped"}, timing, 6)
    assert "| 64 | unstructured | 90% | ORT int8 static 0.500 ms |" in text
    assert "accel int8 × best" in text and "accel int8 × torch" in text and "8 int8-csr" in text
    assert "unavailable: skipped" in text and "Load average" in text


def test_models_labels():
    models = importlib.import_module("bench.models")
    assert models._label("accelerate_int8_s0.9") == "accel int8 90%"
    assert models._label("accelerate_s0.5") == "accel fp32 50%" and models._label("onnxruntime") == "ORT fp32"


def test_merge_attaches_the_fp32_and_int8_deepsparse_cases():
    rows = [_row(64), _row(1)]
    ds = {"status": "ok", "cases": [
        {"key": "k64", "ms": {"deepsparse": 2.0, "onnxruntime": 4.0}, "ort_over_deepsparse": 2.0},
        {"key": "k64_int8", "ms": {"deepsparse": 0.25}, "max_relative_error": {"deepsparse": 0.03}},
        {"key": "k1_int8", "deepsparse_error": "output differs"}]}
    runtime._merge(rows, ds)
    fp32, int8 = rows[0]["deepsparse"], rows[0]["deepsparse_int8"]
    assert fp32["status"] == "ok" and fp32["ms"] == 2.0 and fp32["ort_over_deepsparse_same_process"] == 2.0
    assert int8["status"] == "ok" and int8["max_relative_error"] == 0.03
    assert int8["best_dense_over_deepsparse_cross_process"] == pytest.approx(0.5 / 0.25)
    assert rows[1]["deepsparse"]["status"].startswith("unavailable: no result")
    assert rows[1]["deepsparse_int8"]["status"] == "unavailable: output differs"
    timing = {"torch_and_onnxruntime_s": 1.0, "deepsparse_setup_s": 1.0, "deepsparse_worker_s": 1.0,
              "loadavg_start": (1.0, 1.0, 1.0), "loadavg_end": (2.0, 2.0, 2.0)}
    text = runtime._section(rows, ds, timing, 6)
    assert "DeepSparse int8 ms" in text and "| 0.250 |" in text and "3.0e-02" in text


@pytest.mark.parametrize("attrs, ok", [({"axis": 0}, True), ({}, True), ({"axis": 0, "saturate": 1}, False)])
def test_deepsparse_copy_declares_opset_17_only_for_plain_qdq(tmp_path, attrs, ok):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    worker = importlib.import_module("bench.deepsparse_worker")
    init = [helper.make_tensor("s", TensorProto.FLOAT, [2], [0.1, 0.2]),
            helper.make_tensor("z", TensorProto.INT8, [2], [0, 0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], init)
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(path))
    if not ok:
        with pytest.raises(RuntimeError, match="QuantizeLinear"):
            worker._deepsparse_copy(path, tmp_path)
        return
    copy = onnx.load(str(worker._deepsparse_copy(path, tmp_path)))
    assert copy.ir_version == 8 and [o.version for o in copy.opset_import] == [17]
    assert [n.op_type for n in copy.graph.node] == ["QuantizeLinear", "DequantizeLinear"]
