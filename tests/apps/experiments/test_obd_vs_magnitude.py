"""`prunekit experiment obd-vs-magnitude --quick`: files, fields, and the experiment registry/CLI."""

from __future__ import annotations

import json

import pytest

from prunekit.apps.cli import main
from prunekit.apps.experiments import EXPERIMENTS, get_experiment
from prunekit.apps.experiments import obd_vs_magnitude as exp

LEVELS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]
CRITERIA = ["magnitude", "random", "obd-gauss-newton", "obd-fisher", "obd-hutchinson", "taylor"]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits for --help and bad arguments
        return exc.code


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("obd")
    code = _exit_code(["experiment", "obd-vs-magnitude", "--quick", "--out", str(out), "--no-progress"])
    return code, out


def test_quick_run_writes_the_three_files(quick_run):
    code, out = quick_run
    assert code == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left by atomic writes


def test_results_json_fields(quick_run):
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "obd-vs-magnitude" and results["quick"] is True
    assert results["seeds"] == [0, 1] and results["levels"] == LEVELS
    assert set(results["dense"]) == {"loss", "accuracy"}
    rows = results["rows"]
    keys = {(r["phase"], r["criterion"], r["ranking"], r["sparsity"]) for r in rows}
    assert len(keys) == len(rows)  # one row per combination
    for criterion in CRITERIA:
        for ranking in ("layerwise", "global"):
            for s in LEVELS:
                assert ("oneshot", criterion, ranking, s) in keys
    retrained = {(c, k) for p, c, k, _ in keys if p == "retrained"}
    assert retrained == {("magnitude", "layerwise"), ("magnitude", "global"), ("random", "layerwise"),
                         ("obd-gauss-newton", "global"), ("obd-fisher", "global"), ("obd-hutchinson", "global"),
                         ("taylor", "global")}
    for row in rows:
        for metric in ("loss", "accuracy"):
            stat = row[metric]
            assert len(stat["values"]) == 2 and stat["std"] >= 0
            assert stat["mean"] == pytest.approx(sum(stat["values"]) / 2)
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0
    diag = results["diagnostics"]
    assert {"gauss-newton", "fisher", "hutchinson-4", "hutchinson-32"} == set(diag["estimator_error"])
    assert set(CRITERIA) | {"quadratic"} == set(diag["deletion_spearman"])
    # ReLU network: the Gauss-Newton diagonal is the exact diagonal.
    assert diag["estimator_error"]["gauss-newton"]["rel_error"]["mean"] < 1e-3


def test_retraining_never_hurts_much_and_pruned_models_are_sparse(quick_run):
    _, out = quick_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    one = {(r["criterion"], r["ranking"], r["sparsity"]): r["accuracy"]["mean"] for r in rows if r["phase"] == "oneshot"}
    # Random pruning at 95% leaves about chance accuracy; magnitude at 30% about the dense model's.
    assert one[("random", "layerwise", 0.95)] < 0.3
    assert one[("magnitude", "global", 0.3)] > 0.5


def test_table_md_has_every_section(quick_run):
    _, out = quick_run
    table = (out / "table.md").read_text()
    for heading in ("One-shot pruning, no retraining: test accuracy", "One-shot pruning, no retraining: test loss",
                    "Iterative pruning with retraining: test accuracy", "Iterative pruning with retraining: test loss",
                    "Diagonal estimators vs the exact Hessian diagonal", "Single-weight deletions"):
        assert heading in table
    assert "| 30% | 50% | 70% | 80% | 90% | 95% |" in table
    assert "Seeds 0, 1" in table
    rows = [line for line in table.splitlines() if line.startswith("| magnitude") and "global" in line]
    assert len(rows) == 4  # one-shot and retrained, accuracy and loss
    for line in rows:
        assert line.replace("\\|", "").count("|") == 9  # the |w| label is escaped: no extra columns


def test_registry_and_cli_errors(tmp_path, capsys):
    assert "obd-vs-magnitude" in EXPERIMENTS
    with pytest.raises(ValueError, match="known: .*obd-vs-magnitude"):
        get_experiment("nope")
    assert _exit_code(["experiment", "nope"]) == 2
    assert _exit_code(["experiment"]) == 2
    assert _exit_code(["experiment", "obd-vs-magnitude", "--seeds", "0"]) == 2
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert _exit_code(["experiment", "obd-vs-magnitude", "--quick", "--out", str(a_file)]) == 2
    assert "existing file" in capsys.readouterr().err
    assert _exit_code(["experiment", "obd-vs-magnitude", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_run_validates_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        exp.run(tmp_path, quick=True, seeds=[0, 0])
    with pytest.raises(TypeError, match="quick"):
        exp.run(tmp_path, quick="yes")
