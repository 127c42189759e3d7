"""``prunekit inspect``: the table, the JSON fields, and errors on bad files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from formats_helpers import make_sparse

import prunekit.formats as pf
from prunekit.apps.cli import main


@pytest.fixture
def saved(tmp_path):
    state = {"fc.weight": make_sparse((60, 100), torch.float32, 0.9, seed=0), "fc.bias": torch.randn(60),
             "steps": torch.tensor(3)}
    path = tmp_path / "m.pkt"
    pf.save(state, path, quantize="int8", metadata={"model": "toy"})
    return path, state


def test_table_lists_every_tensor_and_the_totals(saved, capsys):
    path, state = saved
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for name in state:
        assert name in out
    for word in ("sparsity", "encoding", "bits/w", "dense fp32", "gzip fp32", "bound", "int8"):
        assert word in out


def test_json_fields_are_consistent(saved, capsys):
    path, state = saved
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["tensors"]}
    assert list(rows) == list(state)
    w = rows["fc.weight"]
    assert w["shape"] == [60, 100] and w["stored"] == "int8" and w["encoding"] in ("bitmask", "gaps")
    assert w["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert w["bits_per_weight"] == pytest.approx(8 * w["bytes"] / 6000)
    assert rows["fc.bias"]["stored"] == "float32" and rows["steps"]["dtype"] == "int64"
    t = report["totals"]
    assert t["file_bytes"] == path.stat().st_size
    assert t["file_bytes"] == sum(r["bytes"] for r in report["tensors"]) + t["overhead_bytes"]
    assert t["fp32_bytes"] == 4 * (6000 + 60) + 8
    assert t["ratio_vs_fp32"] == pytest.approx(t["fp32_bytes"] / t["file_bytes"])
    # The bound, by hand: n*H(k/n) + k*8 for the weight, raw bits for the rest.
    n, k = 6000, w["numel"] - round(w["sparsity"] * w["numel"])
    h = -(k / n) * math.log2(k / n) - (1 - k / n) * math.log2(1 - k / n)
    assert t["bound_bytes"] == pytest.approx((n * h + 8 * k + 60 * 32 + 64) / 8)
    assert report["metadata"] == {"model": "toy"}


def test_inspect_report_object(saved):
    path, _ = saved
    report = pf.inspect_file(path)
    assert report.numel == 6061
    assert 0 < report.bound_bytes < report.fp32_bytes
    assert "file is" in str(report)


def test_a_bad_file_exits_2_with_the_reason(tmp_path, capsys):
    path = tmp_path / "bad.pkt"
    path.write_bytes(b"\x80\x04junk")
    assert main(["inspect", str(path)]) == 2
    assert "pickle" in capsys.readouterr().err


def test_an_all_zero_file_has_no_infinite_ratios(tmp_path, capsys):
    path = tmp_path / "z.pkt"
    pf.save({"w": torch.zeros(10, 10, dtype=torch.bool)}, path)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)  # strict JSON: no Infinity
    assert report["totals"]["file_vs_bound"] is None
