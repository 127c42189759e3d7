"""prunekit.apps.demo_device: the phone path of the demo (quick variant), checked against the runtimes themselves.

References are independent of the demo's own bookkeeping: each written file is loaded here in its
runtime's bindings and run on the test digits (accuracy), its bytes are read and gzipped here
(sizes), the pruned model's parameter count is recomputed from the file's torch twin, and the dense
model is retrained here with the plain demo's code (same seed, same numbers).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json

import numpy as np
import pytest

from prunekit.apps.cli import main
from prunekit.apps.demo import run_demo
from prunekit.apps.demo_device import DEVICE_QUICK, run_device_demo
from prunekit.formats import mobile
from prunekit.training.data import load_mnist5k

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (mobile.runtime_available("executorch") and mobile.runtime_available("litert")),
    reason=f"ExecuTorch and LiteRT not both installed: {mobile.EXECUTORCH_INSTALL}; {mobile.LITERT_INSTALL}")]
LOAD = {"executorch": mobile.load_executorch, "litert": mobile.load_litert}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-device")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        results = run_device_demo(out, quick=True, progress=False)
    return out, results, buffer.getvalue()


def test_results_files_hold_every_row_and_the_table(quick):
    out, results, printed = quick
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    rows = results["rows"]
    assert [(r["runtime"], r["model"], r["precision"]) for r in rows] == [
        ("executorch", "dense", "int8"), ("executorch", "pruned", "int8"),
        ("litert", "dense", "int8"), ("litert", "pruned", "int8")]
    table = (out / "results.md").read_text()
    assert table.strip() in printed and "tfmot, published (not measured here" in table
    for r in rows:
        assert f"| {r['runtime']} | {r['model']} | int8 | {r['bytes'] / 1024:.1f} |" in table
        assert r["calibration_samples"] == 256 and r["max_rel_error"] <= mobile.INT8_RTOL
        assert r["latency_ms"] > 0 and r["latency_spread_ms"][0] <= r["latency_ms"] <= r["latency_spread_ms"][1]
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", "results.md"]
                                                           + [r["file"] for r in rows])  # no temporary files


def test_sizes_and_accuracies_are_the_ones_the_files_give(quick):
    out, results, _ = quick
    X_test, y_test = load_mnist5k("test")
    X_test, y_test = X_test[:DEVICE_QUICK.demo.test_samples], y_test[:DEVICE_QUICK.demo.test_samples]
    for r in results["rows"]:
        data = (out / r["file"]).read_bytes()
        assert r["bytes"] == len(data) and r["gzip_bytes"] == len(gzip.compress(data, 9))
        run = LOAD[r["runtime"]](out / r["file"], threads=1)  # the runtime's own bindings, on the written file
        predicted = np.array([int(np.asarray(run([x[None]])[0]).argmax()) for x in X_test])
        assert r["accuracy"] == pytest.approx(float((predicted == y_test.numpy()).mean()), abs=1e-6), r["file"]
        # int8 in the runtime stays near the torch model it came from (a few digits of 200)
        assert abs(r["accuracy"] - results["torch"][r["model"]]["accuracy"]) <= 0.03, r


def test_pruned_files_are_structurally_smaller_and_the_dense_model_is_the_demos(quick, tmp_path):
    _, results, _ = quick
    t = results["torch"]
    assert t["pruned"]["params"] < 0.5 * t["dense"]["params"]  # 50% of channels: about a quarter of the weights
    by = {(r["runtime"], r["model"]): r for r in results["rows"]}
    for runtime in ("executorch", "litert"):
        assert by[runtime, "pruned"]["bytes"] < 0.5 * by[runtime, "dense"]["bytes"]
        assert by[runtime, "dense"]["speedup"] == pytest.approx(1.0)
    with contextlib.redirect_stdout(io.StringIO()):
        plain = run_demo(tmp_path, quick=True, progress=False)
    assert t["dense"]["accuracy"] == plain["dense_accuracy"]  # the plain demo's dense model, same seed


def test_cli_device_flag_with_no_runtime_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mobile, "runtime_available", lambda runtime: False)
    assert main(["demo", "--device", "--quick", "--out", str(tmp_path / "d"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs ExecuTorch or LiteRT" in err[0] and "pip install" in err[0]
    assert not (tmp_path / "d").exists()
