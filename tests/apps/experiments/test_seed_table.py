"""`prunekit experiment seed-table --quick`: files, fields and their ranges, schedule, registry, bad input."""

from __future__ import annotations

import json
import sys

import pytest
from tqdm import tqdm

from prunekit.apps.cli import main
from prunekit.apps.experiments import get_experiment
from prunekit.apps.experiments import seed_table as exp

FAMILY_KEYS = ["mlp", "cnn", "lstm"]
QUICK_SPARSITIES = [0.0, 0.5, 0.9]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits for --help and bad arguments
        return exc.code


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seed-table")
    code = _exit_code(["experiment", "seed-table", "--quick", "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text()) if code == 0 else None
    return code, out, results


@pytest.mark.slow
def test_quick_run_writes_every_file(quick_run):
    code, out, _ = quick_run
    assert code == 0
    for name in ("plot.png", "schedule.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text().startswith("### Pruning across model families")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left by atomic writes


@pytest.mark.slow
def test_accuracies_and_measured_sparsities(quick_run):
    _, _, results = quick_run
    assert results["experiment"] == "seed-table" and results["quick"] is True and results["seeds"] == [0]
    assert sorted(results["families"]) == sorted(FAMILY_KEYS) and results["sparsities"] == QUICK_SPARSITIES
    for fam in results["families"].values():
        assert [r["sparsity"] for r in fam["rows"]] == QUICK_SPARSITIES
        n = fam["pruned_parameters"]
        assert 0 < n < fam["parameters"]  # biases are never pruned
        for row in fam["rows"]:
            for key in ("accuracy", "int8_accuracy"):
                stat = row[key]
                assert len(stat["values"]) == 1 and stat["std"] == 0.0
                assert 0.0 <= stat["mean"] <= 1.0
            # Global ranking over n weights prunes round(n * s) of them; a kept weight is almost never exactly 0.
            measured = row["measured_sparsity"]["mean"]
            assert abs(measured * n - round(n * row["sparsity"])) <= 1, (fam["label"], row["sparsity"], measured)


@pytest.mark.slow
def test_file_sizes_shrink_with_sparsity(quick_run):
    _, _, results = quick_run
    for fam in results["families"].values():
        lossless = [r["bytes"]["mean"] for r in fam["rows"]]
        int8 = [r["int8_bytes"]["mean"] for r in fam["rows"]]
        assert lossless == sorted(lossless, reverse=True) and len(set(lossless)) == len(lossless), fam["label"]
        assert int8 == sorted(int8, reverse=True) and len(set(int8)) == len(int8), fam["label"]
        assert all(q < b for q, b in zip(int8, lossless))
        fp32 = 4 * fam["parameters"]
        # Dense fp32 weights compress little; at 90% sparsity values + positions take a small fraction.
        assert 0.6 * fp32 < lossless[0] < 1.1 * fp32 + 4096
        assert lossless[-1] < 0.25 * fp32


@pytest.mark.slow
def test_latency_cells(quick_run):
    _, _, results = quick_run
    for key, fam in results["families"].items():
        for row in fam["rows"]:
            cell = row["latency"]["1"]
            assert cell["dense_ms"] > 0
            if key == "lstm":
                assert cell["accelerated_ms"] is None and "does not cover nn.LSTM" in cell["note"]
            else:
                assert cell["accelerated_ms"] > 0 and set(cell["formats"]) >= {"fc1", "fc2", "fc3"}


@pytest.mark.slow
def test_minilm_row_and_table(quick_run):
    _, out, results = quick_run
    mini, table = results["minilm"], (out / "table.md").read_text()
    if not mini["available"]:
        assert mini["note"].startswith(exp.NOT_AVAILABLE) and mini["rows"] == []
        assert exp.NOT_AVAILABLE in table
    else:
        assert [r["sparsity"] for r in mini["rows"]] == list(exp.QUICK.minilm_sparsities)
        assert mini["rows"][0]["cosine"] > 0.999  # the unpruned copy embeds like the dense model
        for row in mini["rows"]:
            assert -1.0 <= row["cosine"] <= 1.0 + 1e-6 and 0.0 <= row["top10"] <= 1.0
            assert abs(row["measured_sparsity"] - row["sparsity"]) < 0.01  # per-row rounding
    for fam in results["families"].values():
        assert fam["label"] in table
    for s in QUICK_SPARSITIES:
        assert f"| {s:.1%} |" in table


def test_oneshot_missing_gives_a_row_that_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "prunekit.methods.oneshot", None)  # makes the import raise ImportError
    with tqdm(disable=True) as bar:
        mini = exp._run_minilm(exp.QUICK, bar)
    assert mini["available"] is False and mini["note"].startswith(exp.NOT_AVAILABLE) and mini["rows"] == []


@pytest.mark.parametrize("config", [exp.FULL, exp.QUICK], ids=["full", "quick"])
@pytest.mark.parametrize("target", [0.5, 0.875, 0.95])
def test_schedule_follows_zhu_gupta_and_reaches_the_target(config, target):
    schedule, steps = exp.make_schedule(config, 4000, target)
    end = schedule.end_step
    assert steps == config.finetune_epochs * -(-4000 // config.batch_size)
    assert 0 < end < steps and end % schedule.frequency == 0 and schedule.begin_step == 0
    for t in range(0, end + 1, schedule.frequency):
        assert schedule.should_update(t)
        assert schedule.sparsity(t) == pytest.approx(target * (1 - (1 - t / end) ** 3))  # s_i = 0
    assert schedule.sparsity(end) == target and schedule.sparsity(steps) == target


def test_registry_and_bad_input(tmp_path):
    entry = get_experiment("seed-table")
    assert entry.load() is exp and entry.default_seeds == 3
    with pytest.raises(TypeError, match="quick"):
        exp.run(tmp_path, quick="yes")
    with pytest.raises(TypeError, match="seeds"):
        exp.run(tmp_path, quick=True, seeds=[])
    with pytest.raises(ValueError, match="distinct"):
        exp.run(tmp_path, quick=True, seeds=[1, 1])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out must be a directory"):
        exp.run(tmp_path / "file", quick=True)
