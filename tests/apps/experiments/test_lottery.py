"""prunekit.apps.experiments.lottery: the quick variant writes the documented files and fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunekit.apps.cli import build_parser
from prunekit.apps.experiments import get_experiment
from prunekit.apps.experiments.lottery import CONDITIONS, FULL, QUICK, run

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lottery")
    return out, run(out, quick=True, seeds=SEEDS, progress=False)


def test_writes_table_results_and_plot(quick):
    out, results = quick
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "Test accuracy (%) at the early-stopping iteration" in table and "Early-stopping iteration" in table
    assert all(label in table for label in CONDITIONS.values())
    assert not list(out.rglob("*.tmp"))


def test_results_have_every_condition_at_every_round_with_mean_and_std(quick):
    _, results = quick
    assert results["experiment"] == "lottery" and results["quick"] is True and results["seeds"] == SEEDS
    assert set(results["conditions"]) == {"dense", *CONDITIONS}
    dense = results["conditions"]["dense"]
    assert len(dense) == 1 and dense[0]["remaining"] == 1.0
    for condition in CONDITIONS:
        rows = results["conditions"][condition]
        assert [row["round"] for row in rows] == list(range(1, QUICK.rounds + 1))
        for row in rows:
            for metric in ("test_accuracy", "early_stop_iteration", "final_test_accuracy"):
                stats = row[metric]
                assert set(stats) == {"mean", "std", "values"} and len(stats["values"]) == len(SEEDS)
            assert 0.0 <= row["test_accuracy"]["mean"] <= 1.0
            assert 0 < row["early_stop_iteration"]["mean"] <= QUICK.train.iterations
    # Every condition is measured at the ticket's sparsities, which follow (1 - p)^r.
    remaining = [[row["remaining"] for row in results["conditions"][c]] for c in CONDITIONS]
    assert all(r == remaining[0] for r in remaining)
    assert remaining[0] == sorted(remaining[0], reverse=True)
    assert remaining[0][-1] < 0.5 ** (QUICK.rounds - 1)
    # Round 1 of IMP *is* one-shot pruning to that sparsity: bit-identical training.
    first = {c: results["conditions"][c][0]["test_accuracy"]["values"] for c in ("ticket", "one_shot")}
    assert first["ticket"] == first["one_shot"]


def test_rerun_resumes_from_the_saved_runs(quick):
    out, results = quick
    again = run(out, quick=True, seeds=SEEDS, progress=False)
    assert again["conditions"] == results["conditions"]
    assert again["seconds"] < results["seconds"]


def test_registered_on_the_command_line():
    assert get_experiment("lottery").module == "prunekit.apps.experiments.lottery"
    args = build_parser().parse_args(["experiment", "lottery", "--quick", "--out", "x"])
    assert args.experiment == "lottery" and args.quick and args.out == Path("x")


@pytest.mark.slow  # spawns two worker processes
def test_parallel_workers_give_the_same_numbers(quick, tmp_path):
    _, results = quick
    parallel = run(tmp_path, quick=True, seeds=[0], workers=2, progress=False)
    assert parallel["workers"] == 2
    for condition, rows in parallel["conditions"].items():
        for row, reference in zip(rows, results["conditions"][condition]):
            for metric in ("test_accuracy", "early_stop_iteration", "final_test_accuracy"):
                assert row[metric]["values"] == reference[metric]["values"][:1], (condition, metric)


def test_full_setup_reaches_about_two_percent_of_the_weights():
    from prunekit.apps.models import LeNet300100
    from prunekit.core.granularity import prune_count
    from prunekit.methods.lottery import imp_targets
    from prunekit.methods.lottery.masks import pruned_names

    model = LeNet300100()
    config = FULL.config(seed=0)
    names = pruned_names(model, config)
    numel = {n: p.numel() for n, p in model.named_parameters() if n in names}
    targets = imp_targets(names, config, FULL.rounds)
    kept = sum(n - prune_count(n, targets.of(name)) for name, n in numel.items())
    assert names == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert 0.02 < kept / sum(numel.values()) < 0.03
