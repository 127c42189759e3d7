"""``stop_when`` in a recipe: validated as data, stops where a free run says it must, resumes mid-run bit for bit.

The reference for where a run stops is the same recipe with a tolerance that never
triggers: until the stop, a stopping run is that run (the hook's evaluation leaves
training alone), so its checks' metrics give the first update beyond any threshold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_helpers import TINY, merged, write_recipe
from safetensors.torch import load_file, save_file

from prunekit.apps.recipe import RecipeError, StopWhenConfig, parse_recipe, run_recipe
from prunekit.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

HERE = Path(__file__).parent
# digits -> DropNet (dropout: resuming needs the RNG state); 10 steps per epoch (the dense phase's checkpoints are at
# steps 4 and 8), 50 pruning steps, 9 mask updates (every 5 steps), a pruning checkpoint every 4 steps.
BASE = {
    "name": "stopme",
    "model": {"factory": "recipe_models:DropNet", "kwargs": {"in_features": 64}},
    "data": {"name": "digits", "batch_size": 32, "train_samples": 320, "test_samples": 200},
    "schedule": {"type": "PolynomialDecay", "initial_sparsity": 0.2, "final_sparsity": 0.97,
                 "begin_step": 0, "end_step": 40, "frequency": 5},
    "training": {"dense_epochs": 1, "epochs": 5, "optimizer": "adamw", "lr": 0.01, "checkpoint_every": 4},
    "export": {"prunekit": False, "int8": False, "onnx": False},
}
NEVER = {"loss": 100.0, "accuracy": 1.0}  # tolerances no update can leave


def _recipe(seed: int, metric: str, max_drop: float, relative: bool) -> dict:
    return merged(BASE, training={"seed": seed},
                  stop_when={"metric": metric, "max_drop": max_drop, "relative": relative})


def _drops(checks: list[dict], baseline: float, metric: str, relative: bool) -> list[float]:
    worse = [(baseline - c["metric"]) if metric == "accuracy" else (c["metric"] - baseline) for c in checks]
    return [w / abs(baseline) if relative else w for w in worse]


def _threshold(drops: list[float], first: int = 2) -> tuple[float, int]:
    """A max_drop between the worst drop so far and the first later drop above it (from update ``first`` on)."""
    for k in range(first, len(drops)):
        so_far = max(drops[:k])
        if drops[k] > so_far + 1e-6:
            return (so_far + drops[k]) / 2, k
    pytest.fail(f"the free run never gets worse after its second update: {drops}")


def _zeros(path: Path, names: tuple[str, ...]) -> float:
    weights = load_file(path)
    return sum(int(weights[n].eq(0).sum()) for n in names) / sum(weights[n].numel() for n in names)


@pytest.mark.parametrize("seed,metric,relative", [(0, "loss", True), (1, "loss", False), (2, "accuracy", False)])
def test_stops_at_the_first_update_past_the_tolerance(seed, metric, relative, tmp_path):
    free = run_recipe(parse_recipe(_recipe(seed, metric, NEVER[metric], relative)), tmp_path, log=None,
                      progress=False).results["prune-train"]
    report = free["stop_when"]
    assert not report["stopped"] and report["stop_step"] is None and len(report["checks"]) == 9
    assert report["sparsity_reached"] == pytest.approx(0.97, abs=1e-3)  # the free run follows the schedule
    max_drop, k = _threshold(_drops(report["checks"], report["baseline"], metric, relative))
    result = run_recipe(parse_recipe(_recipe(seed, metric, max_drop, relative)), tmp_path, log=None, progress=False)
    stop = result.results["prune-train"]["stop_when"]
    assert stop["baseline"] == report["baseline"]  # the dense model, measured before the first update
    assert stop["checks"] == report["checks"][:k] + [{**report["checks"][k], "ok": False}]
    assert stop["stopped"] and stop["stop_step"] == report["checks"][k]["step"]
    reached = report["checks"][k - 1]["sparsity"]
    assert stop["sparsity_reached"] == pytest.approx(reached, abs=1e-12)
    assert stop["last_good"]["step"] == report["checks"][k - 1]["step"]
    assert _zeros(result.run_dir / "pruned.safetensors", ("fc1.weight", "fc2.weight")) == pytest.approx(reached)
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["stop_when"] == stop and results["sparsity"] < report["sparsity_reached"]


def _prune(recipe: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "prunekit", "prune", "--recipe", str(recipe), "--out", str(out),
                           "--no-progress"], check=False, capture_output=True, text=True, timeout=120, env=full_env)


@pytest.fixture(scope="module")
def stopping(tmp_path_factory):
    """A stopping recipe (stop at step 15 or later), its YAML file, its uninterrupted run and the free run."""
    root = tmp_path_factory.mktemp("stop")
    free = run_recipe(parse_recipe(_recipe(0, "loss", NEVER["loss"], True)), root / "free", log=None,
                      progress=False).results["prune-train"]["stop_when"]
    max_drop, _ = _threshold(_drops(free["checks"], free["baseline"], "loss", True), first=3)
    data = _recipe(0, "loss", max_drop, True)
    reference = run_recipe(parse_recipe(data), root / "reference", log=None, progress=False)
    return data, write_recipe(root / "stopme.yaml", data), reference, free


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [11, 30])  # pruning checkpoints at 12 (before the stop) and 32 (after it, held)
def test_kill_and_resume_mid_run_is_bit_identical(stopping, kill_at, tmp_path):
    data, path, reference, _ = stopping
    stop_step = reference.results["prune-train"]["stop_when"]["stop_step"]
    assert (kill_at < stop_step) == (kill_at == 11)
    proc = _prune(path, tmp_path, PRUNEKIT_TEST_KILL_AT_STEP=str(kill_at))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = tmp_path / parse_recipe(data).run_name
    _, meta = load_checkpoint(run_dir / "checkpoints" / "prune.safetensors")
    assert meta["position"]["step"] == kill_at + 1 + (kill_at == 30)  # the first pruning checkpoint after kill_at
    assert meta["pruner"]["stop_when"]["stopped"] == (kill_at > stop_step)
    proc = _prune(path, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"stopped at step {stop_step}" in proc.stdout and "resumed at step" in proc.stdout
    got = json.loads((run_dir / "stages" / "prune-train.json").read_text())
    want = reference.results["prune-train"]
    assert got["stop_when"] == want["stop_when"] and got["epoch_losses"] == want["epoch_losses"]
    a, b = load_file(run_dir / "pruned.safetensors"), load_file(reference.run_dir / "pruned.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_resume_reads_the_saved_search_negative_control(stopping, tmp_path):
    """A checkpoint whose saved baseline is changed resumes into another search: the state is really read."""
    data, _, reference, free = stopping
    recipe = parse_recipe(data)
    first = _prune(write_recipe(tmp_path / "r.yaml", data), tmp_path, PRUNEKIT_TEST_KILL_AT_STEP="11")
    assert first.returncode == -signal.SIGKILL, first.stderr
    ckpt = tmp_path / recipe.run_name / "checkpoints" / "prune.safetensors"
    tensors, meta = load_checkpoint(ckpt)
    meta["pruner"]["stop_when"]["baseline"] *= 10  # every later loss is then far better than the "baseline"
    save_file(tensors, str(ckpt), metadata={"prunekit.checkpoint": json.dumps(meta)})
    result = run_recipe(recipe, tmp_path, log=None, progress=False)
    stop = result.results["prune-train"]["stop_when"]
    assert result.results["prune-train"]["resumed_at"] == 12 and not stop["stopped"]
    assert stop["sparsity_reached"] == pytest.approx(free["sparsity_reached"])
    assert reference.results["prune-train"]["stop_when"]["stopped"]


@pytest.mark.parametrize("stop_when,match", [
    ({"metric": "accuracy"}, r"recipe\.stop_when\.max_drop: required"),
    ({"max_drop": 0.1}, r"recipe\.stop_when\.metric: required"),
    ({"metric": "top5", "max_drop": 0.1}, r"recipe\.stop_when\.metric: must be one of accuracy, loss"),
    ({"metric": "loss", "max_drop": -0.1}, r"recipe\.stop_when\.max_drop: must be a number in \[0, inf\)"),
    ({"metric": "accuracy", "max_drop": 1.5}, r"recipe\.stop_when\.max_drop: must be a number in \[0, 1\]"),
    ({"metric": "accuracy", "max_drop": "0.1"}, r"recipe\.stop_when\.max_drop: must be a number"),
    ({"metric": "loss", "max_drop": 0.1, "relative": "yes"}, r"recipe\.stop_when\.relative: must be true or false"),
    ({"metric": "loss", "max_drop": 0.1, "split": "val"}, r"recipe\.stop_when\.split: must be one of test, train"),
    ({"metric": "loss", "max_drop": 0.1, "samples": 0}, r"recipe\.stop_when\.samples: must be a positive integer"),
    ({"metric": "loss", "max_drop": 0.1, "patience": 2}, r"recipe\.stop_when: unknown key 'patience'; allowed:"),
    ([0.1], r"recipe\.stop_when: must be a mapping"),
])
def test_bad_stop_when_is_refused_by_field(stop_when, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(merged(TINY, stop_when=stop_when))


def test_stop_when_needs_a_gradual_schedule():
    constant = {"type": "ConstantSparsity", "target_sparsity": 0.5, "frequency": 4}
    with pytest.raises(RecipeError, match=r"recipe\.stop_when: needs a gradual schedule .*got ConstantSparsity"):
        parse_recipe(merged(TINY, schedule=constant, stop_when={"metric": "loss", "max_drop": 0.1}))
    assert parse_recipe(merged(TINY, schedule=constant)).stop_when is None  # without stop_when it is fine


def test_round_trip_and_digest_of_recipes_without_it():
    plain = parse_recipe(TINY)
    assert "stop_when" not in plain.to_dict()  # older recipes keep their digest (and run directory)
    with_stop = parse_recipe(merged(TINY, stop_when={"metric": "accuracy", "max_drop": 0.005, "samples": 50}))
    assert with_stop.stop_when == StopWhenConfig("accuracy", 0.005, False, "test", 50)
    assert parse_recipe(with_stop.to_dict()) == with_stop and with_stop.digest != plain.digest
    assert parse_recipe(merged(TINY, stop_when=None)).digest == plain.digest
