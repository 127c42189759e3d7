"""`prunekit sensitivity --recipe R.yaml`: end to end on the tiny recipe, reuse of a run's dense model, errors."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from prunekit.apps.cli import main
from prunekit.apps.recipe import load_recipe, run_dir_for
from prunekit.apps.recipe.build import build_model
from prunekit.apps.recipe.run import prepare
from prunekit.apps.recipe.sensitivity_cli import parse_sparsities, run_sensitivity, sensitivity_command
from prunekit.apps.recipe.stages import Context, run_stage
from prunekit.training.loop import evaluate

sys.path.insert(0, str(Path(__file__).parent / "recipe"))
from recipe_helpers import TINY, merged, write_recipe  # noqa: E402

WEIGHTS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_error_line(argv: list[str], capsys, code: int = 2) -> str:
    got = _exit_code(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert got == code and len(lines) == 1 and "Traceback" not in captured.err, (got, captured.err)
    return lines[0]


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", TINY)


def _dense_by_the_stage(recipe_path: Path, run_dir: Path, *, marker: bool):
    """The recipe's dense model as `prunekit prune` trains it (the dense-train stage), optionally as a finished stage."""
    recipe = load_recipe(recipe_path)
    data = prepare(recipe)
    result = run_stage("dense-train", Context(recipe, run_dir, data, False))
    if marker:
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
        (run_dir / "stages" / "dense-train.json").write_text(json.dumps(result))
    tensors = st_load((run_dir / "dense.safetensors").read_bytes())
    tensors.pop("rng/torch")
    model = build_model(recipe.model)
    model.load_state_dict(tensors)
    return model, data


def _hand_pruned_accuracy(model, name: str, sparsity: float, data) -> float:
    ref = copy.deepcopy(model)
    w = dict(ref.named_parameters())[name]
    n = w.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(w.detach().abs().flatten(), n - round(n * sparsity)).indices] = True
    with torch.no_grad():
        w.mul_(keep.reshape(w.shape))
    return evaluate(ref, data.X_test, data.y_test)["accuracy"]


def test_end_to_end_on_the_tiny_recipe(tiny, tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert _exit_code(["sensitivity", "--recipe", str(tiny), "--out", str(out), "--runs", str(runs),
                       "--sparsities", "0.3,0.7", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "dense model: trained by the dense-train stage" in captured.out and f"results in {out}" in captured.out
    assert captured.err == ""
    assert sorted(p.name for p in out.iterdir()) == ["sensitivity.json", "sensitivity.md", "sensitivity.png"]
    assert not runs.exists()  # the dense model was trained in a temporary directory, nothing left behind
    doc = json.loads((out / "sensitivity.json").read_text())
    assert doc["format"] == "prunekit.sensitivity" and doc["metric"] == "test accuracy" and doc["higher_is_better"]
    assert doc["sparsities"] == [0.3, 0.7] and doc["cost"]["evaluations"] == 1 + 5 * 2
    assert [r["name"] for r in doc["layers"]] == WEIGHTS and doc["layers"][0]["numel"] == 150
    assert doc["run"] == load_recipe(tiny).run_name and doc["test_samples"] == 100
    assert doc["dense_model"]["source"] == "trained" and doc["criterion"] == "Magnitude()"
    assert doc["recipe"]["name"] == "tiny"
    # Independently: the dense-train stage's model, one layer pruned by hand with torch.topk, test accuracy.
    model, data = _dense_by_the_stage(tiny, tmp_path / "check", marker=False)
    assert doc["dense"] == evaluate(model, data.X_test, data.y_test)["accuracy"]
    for row in doc["layers"]:
        assert row["curve"] == [[s, _hand_pruned_accuracy(model, row["name"], s, data)] for s in (0.3, 0.7)]
    md = (out / "sensitivity.md").read_text()
    assert md.startswith("# Sensitivity of `tiny`") and "| layer | weights | 30% | 70% |" in md
    assert "| fc1.weight | 48,000 |" in md
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_dense_stage_is_reused(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = run_dir_for(load_recipe(tiny), runs)
    model, data = _dense_by_the_stage(tiny, run_dir, marker=True)
    doc = run_sensitivity(tiny, runs=runs, sparsities="0.5", progress=False, log=None)
    assert doc["dense_model"] == {"source": "run directory", "path": str(run_dir / "dense.safetensors")}
    assert (run_dir / "sensitivity" / "sensitivity.json").is_file()  # default --out: inside the run directory
    assert [row["curve"] for row in doc["layers"]] == \
        [[[0.5, _hand_pruned_accuracy(model, name, 0.5, data)]] for name in WEIGHTS]
    # Negative control: the file is really read (a changed dense model changes the dense accuracy).
    tensors = st_load((run_dir / "dense.safetensors").read_bytes())
    tensors["fc3.bias"] = tensors["fc3.bias"] + torch.arange(10.0) * 100
    (run_dir / "dense.safetensors").write_bytes(st_save(tensors))
    changed = run_sensitivity(tiny, tmp_path / "other", runs=runs, sparsities="0.5", progress=False, log=None)
    assert changed["dense"] != doc["dense"]


def test_a_dense_file_that_does_not_fit_is_one_error_line(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = run_dir_for(load_recipe(tiny), runs)
    (run_dir / "stages").mkdir(parents=True)
    (run_dir / "stages" / "dense-train.json").write_text("{}")
    (run_dir / "dense.safetensors").write_bytes(st_save({"fc9.weight": torch.zeros(2)}))
    line = _one_error_line(["sensitivity", "--recipe", str(tiny), "--runs", str(runs), "--no-progress"], capsys)
    assert "does not fit the recipe's model" in line and "dense.safetensors" in line


def test_nm_recipe_uses_its_pattern_sparsity_by_default(tmp_path):
    recipe = write_recipe(tmp_path / "nm.yaml", merged(
        TINY, name="nm", model={"factory": "prunekit.apps.models:LeNet300100", "kwargs": {"in_features": 64}},
        data={"name": "digits", "flat": True, "train_samples": 128, "test_samples": 64},
        schedule={"type": "ConstantSparsity", "target_sparsity": 0.5}, granularity="2:4"))
    doc = run_sensitivity(recipe, tmp_path / "out", runs=tmp_path / "runs", progress=False, log=None)
    assert doc["sparsities"] == [0.5] and doc["granularity"] == "NM(2, 4)"
    with pytest.raises(ValueError, match=r"NM\(2, 4\) fixes the sparsity at 0.5, got 0.3"):
        run_sensitivity(recipe, tmp_path / "out2", runs=tmp_path / "runs", sparsities="0.3", progress=False, log=None)
    assert not (tmp_path / "out2").exists()


def test_recipe_scope_is_honoured(tmp_path):
    recipe = write_recipe(tmp_path / "scoped.yaml", merged(TINY, name="scoped", scope={"exclude": ["conv*"]}))
    doc = run_sensitivity(recipe, tmp_path / "out", runs=tmp_path / "runs", sparsities=(0.5,), progress=False,
                          log=None)
    assert [r["name"] for r in doc["layers"]] == ["fc1.weight", "fc2.weight", "fc3.weight"]


def test_a_data_driven_recipe_criterion(tmp_path):
    recipe = write_recipe(tmp_path / "taylor.yaml", merged(TINY, name="taylor",
                                                           criterion={"name": "taylor", "params": {"samples": 64}}))
    doc = run_sensitivity(recipe, tmp_path / "out", runs=tmp_path / "runs", sparsities=(0.5, 0.9), progress=False,
                          log=None)
    magnitude = run_sensitivity(write_recipe(tmp_path / "m.yaml", merged(TINY, name="m")), tmp_path / "out2",
                                runs=tmp_path / "runs", sparsities=(0.5, 0.9), progress=False, log=None)
    assert doc["criterion"].startswith("Taylor") and doc["dense"] == magnitude["dense"]
    assert [r["curve"] for r in doc["layers"]] != [r["curve"] for r in magnitude["layers"]]


@pytest.mark.parametrize("grid,message", [
    ("0.1,x", "--sparsities: 'x' is not a number"),
    ("0.5,1.5", "--sparsities: '1.5' is outside [0, 1)"),
    ("nan", "--sparsities: 'nan' is outside [0, 1)"),
    ("", "--sparsities: empty"),
    ("0.5,0.5", "sparsities has duplicates"),
])
def test_bad_grid_is_one_error_line_and_writes_nothing(grid, message, tiny, tmp_path, capsys, monkeypatch):
    from prunekit.apps.recipe import sensitivity_cli

    monkeypatch.setattr(sensitivity_cli, "prepare", None)  # refused before the data is even loaded
    out = tmp_path / "out"
    line = _one_error_line(["sensitivity", "--recipe", str(tiny), "--out", str(out), "--runs", str(tmp_path / "r"),
                            "--sparsities", grid, "--no-progress"], capsys)
    assert line.startswith("prunekit: error: ") and message in line
    assert not out.exists()


def test_other_errors_are_one_line(tiny, tmp_path, capsys):
    assert "missing.yaml' not found" in _one_error_line(
        ["sensitivity", "--recipe", str(tmp_path / "missing.yaml")], capsys)
    (tmp_path / "taken").write_text("")
    assert "is an existing file, not a directory" in _one_error_line(
        ["sensitivity", "--recipe", str(tiny), "--out", str(tmp_path / "taken")], capsys)
    bad = write_recipe(tmp_path / "bad.yaml", merged(TINY, scope={"layers": ["nope"]}))
    assert "'nope' matched no prunable parameter" in _one_error_line(
        ["sensitivity", "--recipe", str(bad), "--runs", str(tmp_path / "r")], capsys)
    assert "the following arguments are required: --recipe" in _one_error_line(["sensitivity"], capsys)


def test_missing_matplotlib_is_exit_1_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    line = _one_error_line(["sensitivity", "--recipe", str(tiny), "--out", str(tmp_path / "out")], capsys, code=1)
    assert line == "prunekit sensitivity: error: sensitivity.png needs matplotlib: pip install 'prunekit[plot]'"
    assert not (tmp_path / "out").exists()


def test_help_and_plain_arguments(capsys, tmp_path):
    assert _exit_code(["sensitivity", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--recipe", "--out", "--runs", "--sparsities", "--no-progress"):
        assert option in out
    assert parse_sparsities(" 0.1,0.9 ") == (0.1, 0.9)
    with pytest.raises(FileNotFoundError):
        sensitivity_command(tmp_path / "none.yaml", tmp_path / "out", progress=False)
