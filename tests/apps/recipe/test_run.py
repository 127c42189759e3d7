"""Recipe runs: stages, idempotent re-runs, the examples (tiny versions), export and bench."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch
import yaml
from recipe_helpers import EXAMPLES, TINY, merged, write_recipe
from safetensors.torch import load_file
from torch import nn

import prunekit
from prunekit._repro import seeded
from prunekit.apps.cli import main
from prunekit.apps.demo import QUICK, demo_schedule, run_demo
from prunekit.apps.models import LeNet300100
from prunekit.apps.recipe import load_recipe, parse_recipe, run_recipe
from prunekit.apps.recipe.build import load_data
from prunekit.apps.recipe.stages import STAGES, load_final_model
from prunekit.training.loop import epoch_seed, train

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recipe = parse_recipe(merged(TINY, export={"onnx": True}))
    first = run_recipe(recipe, out, progress=False, log=None)
    second = run_recipe(recipe, out, progress=False, log=None)
    return recipe, first, second


@pytest.mark.slow  # the module's tiny run (seconds) happens in this test's setup
def test_first_run_executes_every_stage_and_writes_artifacts(tiny_run):
    recipe, first, _ = tiny_run
    assert first.executed == list(STAGES) and first.skipped == []
    assert first.run_dir.name == recipe.run_name
    for name in ("dense.safetensors", "pruned.safetensors", "model.pkt", "model_int8.pkt", "model.onnx",
                 "results.json", "recipe.json"):
        assert (first.run_dir / name).is_file(), name
    assert json.loads((first.run_dir / "recipe.json").read_text()) == recipe.to_dict()


def test_second_run_trains_nothing(tiny_run):
    _, first, second = tiny_run
    assert second.executed == [] and second.skipped == list(STAGES)
    log = json.loads((first.run_dir / "stages" / "log.json").read_text())
    ran = [e["stage"] for e in log if e["event"] == "ran"]
    assert ran == list(STAGES)  # each stage ran exactly once over both calls
    assert second.results == {k: json.loads(json.dumps(v)) for k, v in first.results.items()}


def test_final_model_is_pruned_to_the_schedule_and_matches_the_files(tiny_run):
    recipe, first, _ = tiny_run
    model = load_final_model(recipe, first.run_dir)
    target = recipe.schedule.sparsity(first.results["prune-train"]["pruner_steps"])
    report = prunekit.sparsity_report(model)
    for layer in report.rows:
        assert layer.sparsity == pytest.approx(target, abs=1e-2), layer.name
    # the lossless prunekit file holds exactly these weights
    state = prunekit.formats.loads((first.run_dir / "model.pkt").read_bytes())
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name
    # the evaluate stage's accuracy is that of the final model (recomputed independently here)
    data = load_data(recipe.data)
    with torch.no_grad():
        acc = (model(data.X_test).argmax(1) == data.y_test).float().mean().item()
    assert first.results["evaluate"]["pruned"]["accuracy"] == pytest.approx(acc, abs=1e-6)


def test_changed_recipe_gets_its_own_run_dir(tiny_run, tmp_path):
    recipe, first, _ = tiny_run
    other = parse_recipe(merged(TINY, training={"seed": 1}))
    assert other.run_name != recipe.run_name


def _demo_quick_recipe(tmp_path):
    """examples/demo.yaml shrunk to prunekit.apps.demo's QUICK variant (its data, epochs and schedule)."""
    data = yaml.safe_load((EXAMPLES / "demo.yaml").read_text())
    data["data"].update(train_samples=QUICK.train_samples, test_samples=QUICK.test_samples,
                        batch_size=QUICK.batch_size)
    data["training"].update(dense_epochs=QUICK.dense_epochs, epochs=QUICK.finetune_epochs)
    data["schedule"] = demo_schedule(QUICK, QUICK.train_samples).to_dict()
    data["export"]["onnx"] = False
    return write_recipe(tmp_path / "demo-quick.yaml", data)


@pytest.mark.slow
def test_demo_example_reproduces_the_demo_bit_for_bit(tmp_path, capsys):
    recipe_path = _demo_quick_recipe(tmp_path)
    assert main(["prune", "--recipe", str(recipe_path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / load_recipe(recipe_path).run_name
    reference = run_demo(tmp_path / "demo", quick=True, progress=False)
    capsys.readouterr()
    ours, theirs = load_file(run_dir / "pruned.safetensors"), load_file(tmp_path / "demo" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    results = json.loads((run_dir / "results.json").read_text())
    dense = json.loads((run_dir / "stages" / "dense-train.json").read_text())
    assert dense["accuracy"] == reference["dense_accuracy"] and dense["loss"] == reference["dense_loss"]
    assert results["pruned"] == {"accuracy": reference["pruned_accuracy"], "loss": reference["pruned_loss"]}
    assert results["model_int8.pkt"]["accuracy"] == reference["int8_accuracy"]


@pytest.mark.slow
def test_obd_example_tiny_matches_a_hand_written_run(tmp_path):
    data = yaml.safe_load((EXAMPLES / "obd.yaml").read_text())
    data["data"].update(train_samples=192, test_samples=100)
    data["training"].update(dense_epochs=1, epochs=2)
    data["criterion"]["params"]["samples"] = 64
    data["schedule"].update(end_step=4, frequency=2)  # 3 steps per epoch: updates at 0, 2, 4
    recipe = parse_recipe(data)
    result = run_recipe(recipe, tmp_path, progress=False, log=None)
    ours = load_file(result.run_dir / "pruned.safetensors")
    # The same run written out with the library's own pieces (prunekit.training.loop.train, Pruner, OBD).
    d = load_data(recipe.data)
    with seeded(0):
        model = LeNet300100()
        train(model, d.X_train, d.y_train, epochs=1, batch_size=64, seed=epoch_seed(0, 0), progress=False,
              optimizer=torch.optim.Adam(model.parameters(), lr=1e-3))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        obd = prunekit.OBD([(d.X_train[:64], d.y_train[:64])], nn.functional.cross_entropy, estimator="gauss-newton")
        pruner = prunekit.Pruner(model, recipe.schedule, criterion=obd, ranking="global", optimizer=opt)
        train(model, d.X_train, d.y_train, epochs=2, batch_size=64, seed=epoch_seed(0, 1), progress=False,
              optimizer=opt)
        prunekit.strip(model)
    assert obd.estimates == 3  # one OBD estimate per mask update
    for name, value in model.state_dict().items():
        assert torch.equal(ours[name], value), name
    # one global ranking: the total reaches the target while the layers differ from it
    report = prunekit.sparsity_report(model)
    assert report.sparsity == pytest.approx(recipe.schedule.final_sparsity, abs=1e-4)
    assert len({round(layer.sparsity, 3) for layer in report.rows}) > 1


def test_export_cli_formats(tiny_run, tmp_path, capsys):
    recipe, first, _ = tiny_run
    model = load_final_model(recipe, first.run_dir)
    x = load_data(recipe.data).X_test[:5]
    for fmt, name in (("prunekit", "m.pkt"), ("int8", "m8.pkt"), ("onnx", "m.onnx")):
        assert main(["export", str(first.run_dir), "--to", fmt, "--out", str(tmp_path / name)]) == 0
    lossless = prunekit.formats.load(tmp_path / "m.pkt")
    assert all(torch.equal(lossless[k], v) for k, v in model.state_dict().items())
    int8 = prunekit.formats.load(tmp_path / "m8.pkt")
    for k, v in model.state_dict().items():
        assert torch.equal(int8[k] == 0, v == 0) or v.dim() < 2, k  # zeros stay zeros
        if v.dim() >= 2:  # symmetric per-output-channel int8: error <= half a step of that channel's grid
            step = v.reshape(len(v), -1).abs().amax(1) / 127 * (1 + 2**-7)  # scales are rounded up to bfloat16
            err = (int8[k] - v).reshape(len(v), -1).abs().amax(1)
            assert (err <= step * 0.5 + 1e-7).all(), k
        else:
            assert torch.equal(int8[k], v), k
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)
    assert "wrote" in capsys.readouterr().out


def test_export_by_recipe_finds_the_run(tiny_run, tmp_path):
    recipe, first, _ = tiny_run
    path = write_recipe(tmp_path / "r.yaml", recipe.to_dict())
    assert main(["export", "--recipe", str(path), "--runs", str(first.run_dir.parent), "--to", "prunekit",
                 "--out", str(tmp_path / "m.pkt")]) == 0
    exported, staged = (prunekit.formats.load(p) for p in (tmp_path / "m.pkt", first.run_dir / "model.pkt"))
    assert sorted(exported) == sorted(staged) and all(torch.equal(exported[k], staged[k]) for k in staged)


def test_bench_cli_writes_table_and_json(tiny_run, tmp_path, capsys):
    _, first, _ = tiny_run
    out = tmp_path / "bench.json"
    assert main(["bench", str(first.run_dir), "--batch", "1", "3", "--rounds", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dense ms" in text and "accelerated ms" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["dense_ms"] > 0 and r["accelerated_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["accelerated_ms"])


@pytest.mark.parametrize("argv", [
    ["export", "{run}", "--to", "prunekit", "--out", "{file}/m.pkt"],
    ["export", "{run}", "--to", "int8", "--out", "{tmp}/" + "x" * 300 + ".pkt"],
    ["export", "{run}", "--to", "onnx", "--out", "{file}/m.onnx"],
    ["bench", "{run}", "--batch", "1", "--rounds", "1", "--out", "{file}/b.json"],
], ids=["export under a file", "export name too long", "onnx under a file", "bench under a file"])
def test_export_and_bench_output_os_errors_exit_2_with_one_line(argv, tiny_run, tmp_path, capsys):
    _, first, _ = tiny_run
    (tmp_path / "file").write_text("")
    argv = [a.replace("{run}", str(first.run_dir)).replace("{file}", str(tmp_path / "file"))
            .replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunekit: error: ") and str(tmp_path) in err[0], err
    assert (tmp_path / "file").read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
@pytest.mark.parametrize("granularity,schedule", [
    ("2:4", {"type": "ConstantSparsity", "target_sparsity": 0.5, "frequency": 5}),
    ({"type": "blocks", "block": [1, 4]}, {"type": "PolynomialDecay", "initial_sparsity": 0.25,
                                           "final_sparsity": 0.75, "begin_step": 0, "end_step": 10, "frequency": 5}),
])
def test_structured_granularities_give_their_pattern(granularity, schedule, tmp_path):
    recipe = parse_recipe(merged(TINY, model={"factory": "prunekit.apps.models:LeNet300100", "kwargs": {"in_features": 64}},
                                 data={"name": "digits", "train_samples": 160}, granularity=granularity,
                                 schedule=schedule, training={"epochs": 2}, export={"int8": False}))
    result = run_recipe(recipe, tmp_path, progress=False, log=None)
    model = load_final_model(recipe, result.run_dir)
    target = recipe.schedule.sparsity(result.results["prune-train"]["pruner_steps"])
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        groups = (dict(model.named_parameters())[name] != 0).reshape(-1, 4).sum(1)
        if recipe.granularity.type == "nm":
            assert (groups == 2).all(), name  # exactly 2 of every 4 consecutive inputs kept
        else:
            assert ((groups == 0) | (groups == 4)).all(), name  # 1x4 blocks pruned whole ...
            assert (groups == 0).float().mean().item() == pytest.approx(target, abs=0.01), name  # ... to the target


def test_a_run_directory_in_use_is_refused(tmp_path, capsys):
    import fcntl

    recipe = parse_recipe(TINY)
    run_dir = tmp_path / recipe.run_name
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:  # as another process running this recipe holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = write_recipe(tmp_path / "r.yaml", TINY)
        assert main(["prune", "--recipe", str(path), "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another prunekit process" in err[0]
    assert not (run_dir / "stages").exists()
