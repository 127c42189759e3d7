"""Resume: a run checkpointed at step k and resumed in a new process ends bit-identical.

The worker (tests/resume_worker.py) trains a small Conv1d/Linear/GRU model with
dropout, Adam with weight decay and a PolynomialDecay Pruner on synthetic data.
Checkpoints hold model, optimizer, pruner and RNG state (``torch.save``); every
resume runs in a fresh interpreter and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from core_helpers import assert_bit_identical, bits
import torch
from torch import nn

from prunekit import ConstantSparsity, PolynomialDecay, Pruner

pytestmark = pytest.mark.usefixtures("single_thread")

WORKER = Path(__file__).with_name("resume_worker.py")
UPDATE_STEPS = [0, 3, 6, 9, 12]  # the worker's schedule: PolynomialDecay(0.1, 0.85, 0, 12, frequency=3)
# k = 0 (right after construction), at updates (3, 12), between updates (4), after the end (15)
KS = [0, 3, 4, 12, 15]
CONTROLS = ["skip-rng", "skip-pruner"]  # negative controls, resumed from ckpt_4


def _run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"worker {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    full = root / "full"
    full.mkdir()
    _run(["full", str(full), "--save-at", ",".join(map(str, KS))])
    jobs = {}
    for i, k in enumerate(KS):
        out = root / f"resume_{k}"
        out.mkdir()
        order = "model-first" if i % 2 else "pruner-first"
        jobs[k] = ["resume", str(out), "--ckpt", str(full / f"ckpt_{k}.pt"), "--order", order]
    controls = root / "controls"
    controls.mkdir()
    jobs["controls"] = ["controls", str(controls), "--ckpt", str(full / "ckpt_4.pt")]
    with ThreadPoolExecutor(max_workers=2) as pool:  # separate processes, two at a time
        list(pool.map(_run, jobs.values()))
    load = lambda path: torch.load(path, weights_only=True)  # noqa: E731
    results = {"full": load(full / "final.pt"), "ckpts": {k: load(full / f"ckpt_{k}.pt") for k in KS}}
    for k in KS:
        results[k] = load(Path(jobs[k][1]) / "final.pt")
    for name in CONTROLS:
        results[name] = load(controls / f"{name}.pt")
    return results


def test_uninterrupted_run_is_pruned_and_trained(runs):
    full = runs["full"]
    assert full["step"] == 16
    masks = full["masks"]
    assert list(masks) == ["conv.weight", "fc1.weight", "fc2.weight", "gru.weight_ih_l0", "gru.weight_hh_l0",
                           "out.weight"]
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(mask.numel() * 0.85), name
        w = full["model"][name]
        assert torch.count_nonzero(w[~mask]) == 0 and not torch.signbit(w[~mask]).any()
    # the checkpoints are genuinely different points of the run (sparsity grows along the schedule)
    pruned = [sum(int((~m).sum()) for m in runs["ckpts"][k]["pruner"]["masks"].values()) for k in KS]
    assert pruned == sorted(pruned) and pruned[0] < pruned[-1]
    assert [runs["ckpts"][k]["pruner"]["step"] for k in KS] == KS


@pytest.mark.parametrize("k", KS)
def test_resume_in_new_process_is_bit_identical(runs, k):
    full, resumed = runs["full"], runs[k]
    assert resumed["step"] == full["step"] == 16
    assert_bit_identical(full["model"], resumed["model"], "model")
    assert_bit_identical(full["masks"], resumed["masks"], "masks")
    assert_bit_identical(full["pruner"], resumed["pruner"], "pruner")
    assert_bit_identical(full["optimizer"]["state"], resumed["optimizer"]["state"], "optimizer")


@pytest.mark.parametrize("control", CONTROLS)
def test_comparison_is_sensitive(runs, control):
    """Negative controls: dropping the RNG state or the pruner state changes the result."""
    full, other = runs["full"], runs[control]
    differs = any(not torch.equal(bits(full["model"][n]), bits(other["model"][n])) for n in full["model"])
    assert differs, f"resuming with {control} should not reproduce the run; the test would be vacuous"


# --------------------------------------------------------------------------------------
# In-process state_dict round trips and load_state_dict validation
# --------------------------------------------------------------------------------------


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_state_dict_is_weights_only_loadable_and_restores_masks_and_step():
    model = _mlp(0)
    sched = PolynomialDecay(0.2, 0.7, 0, 6, frequency=2)
    pruner = Pruner(model, sched)
    for _ in range(3):
        pruner.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    state = ckpt["pruner"]
    assert state["step"] == 3 and state["format"] == "prunekit.Pruner" and state["version"] == 1
    assert state["schedule"] == sched.to_dict() and state["ranking"] == "layerwise"
    assert all(m.dtype == torch.bool for m in state["masks"].values())

    other = _mlp(1)
    fresh = Pruner(other, sched)
    other.load_state_dict(ckpt["model"])
    fresh.load_state_dict(state)
    assert fresh.current_step == 3
    for name in pruner.names:
        assert torch.equal(fresh.masks[name], pruner.masks[name])
        assert fresh.target_sparsity(name) == pruner.target_sparsity(name) == sched.sparsity(2)
    # stepping both gives the same next masks
    pruner.step()
    fresh.step()
    for name in pruner.names:
        assert torch.equal(fresh.masks[name], pruner.masks[name])
        assert torch.equal(dict(other.named_parameters())[name], dict(model.named_parameters())[name])


def test_load_state_dict_applies_masks_and_clears_optimizer_momentum():
    model = _mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model, ConstantSparsity(0.5, begin_step=100), optimizer=opt)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    donor = Pruner(_mlp(2), 0.5)
    state = donor.state_dict()
    state["schedule"] = pruner.schedule.to_dict()
    state["step"] = 1
    pruner.load_state_dict(state)
    for name, mask in donor.masks.items():
        assert torch.equal(pruner.masks[name], mask)
        param = dict(model.named_parameters())[name]
        assert torch.count_nonzero(param[~mask]) == 0
        assert torch.count_nonzero(opt.state[param]["momentum_buffer"][~mask]) == 0


def _state():
    return Pruner(_mlp(0), 0.5).state_dict()


def _with(**changes):
    state = _state()
    for key, value in changes.items():
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
    return state


def _mask_change(name, value):
    state = _state()
    if value is KeyError:
        del state["masks"][name]
    else:
        state["masks"][name] = value
    return state


LOAD_BAD = [
    ("not a dict", [1, 2], r"not a prunekit Pruner state"),
    ("no format", _with(format=KeyError), r"not a prunekit Pruner state \(missing format marker\)"),
    ("wrong format", _with(format="other"), r"not a prunekit Pruner state"),
    ("version 2", _with(version=2), r"unsupported version 2; expected 1"),
    ("no version", _with(version=KeyError), r"unsupported version None"),
    ("masks not dict", _with(masks=[torch.ones(8, 6, dtype=torch.bool)]), r"'masks' must be a dict"),
    ("missing mask", _mask_change("2.weight", KeyError), r"missing \['2.weight'\], unexpected \[\]"),
    ("unexpected mask", _mask_change("9.weight", torch.ones(2, dtype=torch.bool)), r"unexpected \['9.weight'\]"),
    ("wrong shape", _mask_change("0.weight", torch.ones(6, 8, dtype=torch.bool)),
     r"mask for '0.weight' must be a bool tensor of shape \(8, 6\), got torch.bool \(6, 8\)"),
    ("wrong dtype", _mask_change("0.weight", torch.ones(8, 6)), r"mask for '0.weight' must be a bool tensor.*float32"),
    ("not a tensor", _mask_change("0.weight", [[True] * 6] * 8), r"mask for '0.weight' must be a bool tensor"),
    ("schedule mismatch", _with(schedule=ConstantSparsity(0.6, 0, 0, 1).to_dict()),
     r"saved schedule .* differs from this pruner's .*strict=False"),
    ("ranking mismatch", _with(ranking="global"), r"saved ranking 'global' differs"),
    ("negative step", _with(step=-1), r"load_state_dict: step must be >= 0"),
    ("bool step", _with(step=True), r"load_state_dict: step must be an integer"),
    ("missing step", _with(step=KeyError), r"load_state_dict: step must be an integer"),
]


@pytest.mark.parametrize("state,match", [c[1:] for c in LOAD_BAD], ids=[c[0] for c in LOAD_BAD])
def test_load_state_dict_rejects(state, match):
    model = _mlp(0)
    pruner = Pruner(model, 0.5)
    pruner.step()
    before = pruner.state_dict()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=match):
        pruner.load_state_dict(state)
    # a failed load changes nothing
    assert pruner.current_step == 1
    assert_bit_identical(pruner.state_dict(), before, "pruner")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_non_strict_load_tolerates_schedule_change_and_missing_masks():
    model = _mlp(0)
    pruner = Pruner(model, ConstantSparsity(0.3, 0, -1, 1))
    donor = Pruner(_mlp(3), 0.6)
    state = donor.state_dict()
    del state["masks"]["2.weight"]
    state["masks"]["extra.weight"] = torch.ones(3, dtype=torch.bool)
    before_2 = pruner.masks["2.weight"]
    pruner.load_state_dict(state, strict=False)
    assert torch.equal(pruner.masks["0.weight"], donor.masks["0.weight"])
    assert torch.equal(pruner.masks["2.weight"], before_2)
    assert pruner.current_step == 0


# --------------------------------------------------------------------------------------
# In-process resume across optimizers and schedules (cheap; complements the subprocess test)
# --------------------------------------------------------------------------------------

RESUME_OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
}
RESUME_SCHEDULES = {
    "rising": PolynomialDecay(0.2, 0.8, begin_step=1, end_step=9, frequency=2),
    # a falling target revives pruned weights after the checkpoint: their optimizer state matters then
    "falling": PolynomialDecay(0.8, 0.2, begin_step=1, end_step=13, frequency=4),
}


def _train(opt_name, sched, steps, state=None):
    torch.manual_seed(0 if state is None else 7)
    model = nn.Sequential(nn.Linear(6, 10), nn.Dropout(0.2), nn.Tanh(), nn.Linear(10, 3))
    opt = RESUME_OPTIMIZERS[opt_name](model.parameters())
    pruner = Pruner(model, sched, optimizer=opt)
    start = 0
    if state is not None:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        pruner.load_state_dict(state["pruner"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 6, generator=g), torch.randn(40, 3, generator=g)
    snapshots = {}
    for step in range(start, steps):
        snapshots[step] = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                           "pruner": pruner.state_dict(), "rng": torch.get_rng_state(), "step": step}
        idx = torch.randint(0, 40, (16,))
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    return model, pruner, snapshots


@pytest.mark.parametrize("sched_name", list(RESUME_SCHEDULES))
@pytest.mark.parametrize("opt_name", list(RESUME_OPTIMIZERS))
def test_in_process_resume_is_bit_identical(opt_name, sched_name):
    sched = RESUME_SCHEDULES[sched_name]
    steps = 18
    full_model, full_pruner, snaps = _train(opt_name, sched, steps)
    for k in (1, 2, 5, 10):
        model, pruner, _ = _train(opt_name, sched, steps, state=snaps[k])
        assert pruner.current_step == full_pruner.current_step == steps
        for name in full_pruner.names:
            assert torch.equal(pruner.masks[name], full_pruner.masks[name]), (k, name)
        for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
            assert torch.equal(bits(a), bits(b)), (k, name)
