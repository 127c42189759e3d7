"""`prunekit prune` with bad input: exit code 2, one line on stderr, and nothing written."""

from __future__ import annotations

import pytest
from recipe_helpers import FINAL_ARTIFACTS, TINY, merged, write_recipe

from prunekit.apps.cli import main

CASES = [
    ("invalid field", dict(training={"epochs": -1}), "recipe.training.epochs: must be a positive integer, got -1"),
    ("unknown key", dict(training={"epocs": 2}), "recipe.training: unknown key 'epocs'; allowed: epochs"),
    ("unknown module", dict(model={"factory": "nosuch.models:Net"}),
     "recipe.model.factory: cannot import module 'nosuch.models'"),
    ("unknown attribute", dict(model={"factory": "prunekit.apps.models:LeNet7"}),
     "recipe.model.factory: module 'prunekit.apps.models' has no attribute 'LeNet7'"),
    ("not a module", dict(model={"factory": "prunekit.apps.models:check_int"}), "recipe.model"),
    ("bad factory kwargs", dict(model={"kwargs": {"depth": 3}}), "recipe.model: prunekit.apps.models:LeNet5(**{'depth': 3}) failed"),
    ("flat data into a conv net", dict(data={"flat": True}),
     "recipe.data: the model cannot take inputs of shape (2, 784) from LeNet5"),
    ("8x8 digits into a 784-feature net", dict(model={"factory": "prunekit.apps.models:LeNet300100"},
                                                data={"name": "digits", "train_samples": 64}),
     "recipe.data: the model cannot take inputs of shape (2, 1, 8, 8) from LeNet300100"),
    ("too few logits", dict(model={"kwargs": {"num_classes": 3}}),
     "recipe.model: outputs of shape (2, 3) for inputs (2, 1, 28, 28); expected (batch, >= 10 logits)"),
    ("pattern does not tile", dict(granularity="2:4", schedule={"type": "ConstantSparsity", "target_sparsity": 0.5,
                                                              "frequency": 4}),
     "recipe.scope/granularity: cannot prune 'conv1.weight' with NM(2, 4)"),
    ("ramp with a fixed pattern", dict(model={"factory": "prunekit.apps.models:LeNet300100"}, granularity="2:4"),
     "recipe.schedule: 2:4 sparsity is fixed at 0.5, but the schedule asks for 0.6"),
    ("layer matching nothing", dict(scope={"layers": ["fc9"]}),
     "recipe.scope/granularity: layers: 'fc9' matched no prunable parameter"),
]


def _prune(recipe, out, capsys) -> tuple[int, list[str]]:
    try:
        code = main(["prune", "--recipe", str(recipe), "--out", str(out), "--no-progress"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_nothing_written(out):
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in written if p.name in FINAL_ARTIFACTS], written
    assert written == [], f"a rejected recipe wrote {written}"


@pytest.mark.parametrize("changes,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_recipe_exits_2_with_one_line_and_writes_nothing(changes, message, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "bad.yaml", merged(TINY, **changes))
    out = tmp_path / "runs"
    code, err = _prune(recipe, out, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("prunekit: error: ") and message in err[0], err[0]
    _assert_nothing_written(out)


def test_missing_recipe_file(tmp_path, capsys):
    code, err = _prune(tmp_path / "missing.yaml", tmp_path / "runs", capsys)
    assert code == 2 and len(err) == 1 and "missing.yaml" in err[0] and "not found" in err[0]
    _assert_nothing_written(tmp_path / "runs")


def test_invalid_yaml(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: x\nmodel: [unclosed\n")
    code, err = _prune(recipe, tmp_path / "runs", capsys)
    assert code == 2 and len(err) == 1 and "not valid YAML" in err[0]
    _assert_nothing_written(tmp_path / "runs")


def test_out_is_a_file(tmp_path, capsys, tiny_yaml):
    taken = tmp_path / "taken"
    taken.write_text("")
    code, err = _prune(tiny_yaml, taken, capsys)
    assert code == 2 and len(err) == 1 and "not a directory" in err[0]


@pytest.mark.parametrize("argv,message", [
    (["export", "--to", "onnx", "--out", "m.onnx"], "give either a run directory"),
    (["export", "{tmp}", "--to", "onnx", "--out", "m.onnx"], "not a recipe run directory"),
    (["bench", "{tmp}/nothing"], "not a recipe run directory"),
    (["export", "--recipe", "{tmp}/r.yaml", "--runs", "{tmp}", "--to", "int8", "--out", "{tmp}/m.pkt"],
     "run 'prunekit prune --recipe ...' first"),
    (["export", "x", "--to", "tflite", "--out", "m"], "invalid choice: 'tflite'"),
    (["bench", "x", "--batch", "0"], "must be a positive integer, got '0'"),
])
def test_export_and_bench_usage_errors(argv, message, tmp_path, capsys):
    write_recipe(tmp_path / "r.yaml", TINY)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "m.pkt").exists()
