"""Sparsity reports: per layer and total, as a table and as a dict."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunekit import LayerSparsity, Pruner, SparsityReport, sparsity_report

pytestmark = pytest.mark.usefixtures("single_thread")


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, 3))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Conv1d(8, 4, 3), Odd(), nn.LayerNorm(4),
                         nn.LSTM(4, 5))


def test_report_without_pruner_counts_exact_zeros():
    m = model()
    with torch.no_grad():
        m[0].weight[:3] = 0.0          # 30 zeros of 80
        m[2].weight.view(-1)[:5] = -0.0  # negative zeros count as zeros
        m[0].bias.zero_()              # biases are not reported
    rep = sparsity_report(m)
    names = [r.name for r in rep.rows]
    assert names == ["0.weight", "2.weight", "5.weight_ih_l0", "5.weight_hh_l0"]
    rows = {r.name: r for r in rep.rows}
    assert (rows["0.weight"].zeros, rows["0.weight"].numel, rows["0.weight"].shape) == (30, 80, (8, 10))
    assert rows["0.weight"].sparsity == 30 / 80 and rows["0.weight"].layer == "Linear"
    assert (rows["2.weight"].zeros, rows["2.weight"].numel) == (5, 96)
    assert rows["5.weight_ih_l0"].layer == "LSTM" and rows["5.weight_ih_l0"].numel == 80
    assert all(r.target is None for r in rep.rows)
    assert rep.numel == 80 + 96 + 80 + 100 and rep.zeros == 35
    assert rep.sparsity == 35 / 356
    assert [m for m, _ in rep.skipped] == ["3"]


def test_report_with_pruner_lists_its_parameters_and_targets():
    m = model()
    pruner = Pruner(m, 0.5, layers=["0", "5.weight_hh_l0"], overrides={"0": 0.25})
    rep = pruner.report()
    assert [r.name for r in rep.rows] == ["0.weight", "5.weight_hh_l0"]
    assert [r.target for r in rep.rows] == [0.25, 0.5]
    assert [r.zeros for r in rep.rows] == [20, 50]
    assert rep.zeros == 70 and rep.numel == 180 and rep.sparsity == pytest.approx(70 / 180)
    assert sparsity_report(m, pruner=pruner).to_dict() == rep.to_dict()
    assert rep.skipped == pruner.skipped


def test_report_follows_training():
    m = nn.Sequential(nn.Linear(8, 8))
    from prunekit import PolynomialDecay
    pruner = Pruner(m, PolynomialDecay(0.25, 0.75, 0, 4, power=1, frequency=2))
    assert pruner.report().zeros == 16
    pruner.step()
    pruner.step()
    rep = pruner.report()
    assert rep.zeros == 32 and rep.rows[0].target == 0.5


def test_to_dict_fields_values_and_json():
    m = model()
    pruner = Pruner(m, 0.5)
    d = pruner.report().to_dict()
    assert set(d) == {"layers", "skipped", "numel", "zeros", "sparsity"}
    assert [row["name"] for row in d["layers"]] == pruner.names
    first = d["layers"][0]
    assert first == {"name": "0.weight", "layer": "Linear", "shape": [8, 10], "numel": 80, "zeros": 40,
                     "target": 0.5, "aliases": [], "sparsity": 0.5}
    assert d["numel"] == sum(r["numel"] for r in d["layers"]) == 356
    assert d["zeros"] == sum(round(r["numel"] * 0.5) for r in d["layers"]) == 178
    assert d["sparsity"] == 178 / 356
    assert d["skipped"] == [{"module": "3", "reason": pruner.skipped[0][1]}]
    assert json.loads(json.dumps(d)) == d


def test_table_contains_every_parameter_and_total():
    m = model()
    pruner = Pruner(m, 0.5, overrides={"2": 0.25})
    text = str(pruner.report())
    lines = text.splitlines()
    assert lines[0].split() == ["parameter", "layer", "shape", "params", "zeros", "sparsity", "target"]
    assert set(lines[1]) <= {"-", " "}
    for name in pruner.names:
        assert any(line.startswith(name + " ") for line in lines), name
    row = next(line for line in lines if line.startswith("2.weight"))
    assert row.split() == ["2.weight", "Conv1d", "4x8x3", "96", "24", "25.00%", "25.00%"]
    total = next(line for line in lines if line.startswith("total"))
    assert total.split() == ["total", "356", "154", "43.26%"]  # 40 + 24 + 40 + 50 zeros
    assert lines[-1].startswith("skipped 3:") and "Odd" in lines[-1]
    # columns are aligned: every row of the table has its 'zeros' column at the same offset
    header_at = lines[0].index("zeros")
    assert all(line[header_at - 1] == " " for line in lines[2:-1])


def test_table_uses_thousands_separators_and_dash_without_target():
    m = nn.Linear(100, 50)
    text = str(sparsity_report(m))
    row = text.splitlines()[2].split()
    assert row == ["weight", "Linear", "50x100", "5,000", "0", "0.00%", "-"]


def test_empty_rows_and_zero_numel():
    rep = SparsityReport()
    assert rep.numel == 0 and rep.zeros == 0 and rep.sparsity == 0.0
    assert rep.to_dict() == {"layers": [], "skipped": [], "numel": 0, "zeros": 0, "sparsity": 0.0}
    assert "total" in str(rep)
    assert LayerSparsity("x", "Linear", (0, 3), 0, 0).sparsity == 0.0


def test_report_rejects_non_module():
    with pytest.raises(TypeError, match="sparsity_report: model must be an nn.Module"):
        sparsity_report("model")
