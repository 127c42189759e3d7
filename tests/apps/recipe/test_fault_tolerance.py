"""kill -9 during a recipe run, then resume: the result is bit-identical to an uninterrupted run.

The killed process is a real ``python -m prunekit prune`` subprocess. It kills
itself with SIGKILL through the test-only hooks of
:mod:`prunekit.training.checkpoint`: right after a checkpoint is complete
(``PRUNEKIT_TEST_KILL_AT_STEP``), or in the middle of writing one, after the
temporary file is written and before the rename (``PRUNEKIT_TEST_KILL_IN_WRITE``).
The model has dropout, so the global RNG state is part of what must be resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_helpers import FINAL_ARTIFACTS, write_recipe
from safetensors.torch import load_file, save_file

from prunekit._io import temp_prefix
from prunekit.apps.recipe import parse_recipe, run_recipe
from prunekit.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

HERE = Path(__file__).parent
# digits 8x8 -> DropNet; 320 samples, batch 32: 10 steps per epoch, 30 pruning steps, a checkpoint every 4.
RECIPE = {
    "name": "killme",
    "model": {"factory": "recipe_models:DropNet", "kwargs": {"in_features": 64}},
    "data": {"name": "digits", "batch_size": 32, "train_samples": 320, "test_samples": 100},
    "schedule": {"type": "PolynomialDecay", "initial_sparsity": 0.3, "final_sparsity": 0.8,
                 "begin_step": 0, "end_step": 20, "frequency": 5},
    "training": {"dense_epochs": 1, "epochs": 3, "optimizer": "adamw", "lr": 0.01, "weight_decay": 0.01,
                 "checkpoint_every": 4},
    "export": {"prunekit": True, "int8": False, "onnx": False},
}
KILL_STEP = 13  # the first checkpoint at or after it is at step 16 (12 before it)


def _prune(recipe: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "prunekit", "prune", "--recipe", str(recipe), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=120, env=full_env)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(_bits(a[key]), _bits(b[key])), f"{what}: {key}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The uninterrupted reference run, and a run killed while writing a checkpoint (kept for two tests)."""
    root = tmp_path_factory.mktemp("kill")
    recipe = parse_recipe(RECIPE)
    path = write_recipe(root / "killme.yaml", RECIPE)
    reference = run_recipe(recipe, root / "reference", progress=False, log=None)
    proc = _prune(path, root / "killed-in-write", PRUNEKIT_TEST_KILL_IN_WRITE=str(KILL_STEP))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = root / "killed-in-write" / recipe.run_name / "checkpoints" / "prune.safetensors"
    shutil.copy(ckpt, root / "step12.safetensors")
    return recipe, path, root, reference.run_dir


def _final_state(run_dir: Path) -> tuple[dict, dict]:
    weights = load_file(run_dir / "pruned.safetensors")
    tensors, _ = load_checkpoint(run_dir / "checkpoints" / "prune.safetensors")
    return weights, tensors


@pytest.mark.slow
def test_kill_after_checkpoint_then_resume_is_bit_identical(setup):
    recipe, path, root, reference = setup
    out = root / "killed"
    proc = _prune(path, out, PRUNEKIT_TEST_KILL_AT_STEP=str(KILL_STEP))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = out / recipe.run_name
    _, meta = load_checkpoint(run_dir / "checkpoints" / "prune.safetensors")
    assert meta["position"]["step"] == 16 and meta["pruner"]["step"] == 16  # killed mid-schedule
    assert (run_dir / "stages" / "dense-train.json").is_file()
    assert not (run_dir / "stages" / "prune-train.json").exists()
    assert not any((run_dir / name).exists() for name in FINAL_ARTIFACTS if name != "dense.safetensors")

    proc = _prune(path, out)  # a fresh process resumes
    assert proc.returncode == 0, proc.stderr
    assert "dense-train: done before, skipped" in proc.stdout and "resumed at step 16" in proc.stdout
    assert json.loads((run_dir / "stages" / "prune-train.json").read_text())["resumed_at"] == 16
    (w_ref, ck_ref), (w, ck) = _final_state(reference), _final_state(run_dir)
    _assert_identical(w_ref, w, "final weights")
    _assert_identical(ck_ref, ck, "final checkpoint (model, optimizer, masks, RNG)")
    losses = [json.loads((d / "stages" / "prune-train.json").read_text())["epoch_losses"] for d in (reference, run_dir)]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one(setup):
    recipe, path, root, reference = setup
    out = root / "killed-in-write"
    ckpt_dir = out / recipe.run_name / "checkpoints"
    temps = temp_prefix(ckpt_dir / "prune.safetensors") + "*"  # atomic_open's temporary files for the checkpoint
    leftovers = list(ckpt_dir.glob(temps))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # step 16's write was cut off before its rename
    _, meta = load_checkpoint(ckpt_dir / "prune.safetensors")
    assert meta["position"]["step"] == 12  # ... and the previous checkpoint is intact
    result = run_recipe(recipe, out, progress=False, log=None)
    assert result.executed == ["prune-train", "export", "evaluate"]
    assert result.results["prune-train"]["resumed_at"] == 12
    assert not list(ckpt_dir.glob(temps))  # the resumed run cleared the debris
    (w_ref, ck_ref), (w, ck) = _final_state(reference), _final_state(result.run_dir)
    _assert_identical(w_ref, w, "final weights")
    _assert_identical(ck_ref, ck, "final checkpoint")


@pytest.mark.slow
def test_comparison_is_sensitive_to_the_rng_state(setup, tmp_path):
    """Negative control: resuming with another RNG state (other dropout masks) does not reproduce the run."""
    recipe, path, root, reference = setup
    run_dir = tmp_path / recipe.run_name
    shutil.copytree(reference, run_dir)
    for name in ("prune-train", "export", "evaluate"):
        (run_dir / "stages" / f"{name}.json").unlink()
    tensors, meta = load_checkpoint(root / "step12.safetensors")
    tensors["rng/torch"] = torch.Generator().manual_seed(12345).get_state()
    save_file(tensors, str(run_dir / "checkpoints" / "prune.safetensors"),
              metadata={"prunekit.checkpoint": json.dumps(meta)})
    result = run_recipe(recipe, tmp_path, progress=False, log=None)
    assert result.results["prune-train"]["resumed_at"] == 12
    w_ref, w = load_file(reference / "pruned.safetensors"), load_file(run_dir / "pruned.safetensors")
    assert any(not torch.equal(w_ref[k], w[k]) for k in w_ref)
