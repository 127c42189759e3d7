"""Every engine on the one MaskKeeper keeps masks alike: optimizers, hooks, resume, kill-and-resume, DDP.

The engines (tests/core/engine_worker.py builds them alike): a bare :class:`prunekit.MaskKeeper`, a
:class:`prunekit.Pruner` on a schedule, :meth:`prunekit.Pruner.manual` (what lottery tickets and
iterative pruning use) and a :class:`prunekit.StructuredPruner`. Each test runs against all four, with
a negative control wherever it could pass without an engine doing anything.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import engine_worker as w
from core_helpers import assert_bit_identical, bits
import pytest
import torch
from torch import nn

import prunekit
from prunekit._io import TEMP_MARK

pytestmark = pytest.mark.usefixtures("single_thread")

WORKER = Path(__file__).with_name("engine_worker.py")
FIRST = ("momentum_buffer", "exp_avg", "grad_avg")  # pushes a weight: must be 0 at pruned entries
SECOND = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")  # divides: never 0.0 there
OPT_UPDATES = (0, 5, 10)  # masks from before the first step (lazy optimizer state), then two changes


def active_slots(run: w.Run):
    return [s for s in run.keeper.slots if s.active]


def assert_nontrivial(run: w.Run) -> None:
    """Some entries pruned, some kept: a mask test on all-ones or all-zeros masks would be vacuous."""
    slots = active_slots(run)
    assert slots, f"{run.engine_name}: no mask"
    assert all(bool((~s.pruned).any()) for s in slots), f"{run.engine_name}: a parameter is pruned entirely"


def torch_roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------------------
# the engines under test
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", w.ENGINES)
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_every_engine_reaches_the_same_nontrivial_sparsity_after_the_same_steps(engine, kind):
    run = w.build(engine, kind)
    assert not active_slots(run)  # nothing before the first update (step 3)
    history = []
    for _ in range(w.STEPS):
        run.train_step()
        history.append(sum(int(s.pruned.sum()) for s in run.keeper.slots))
    assert_nontrivial(run)
    changes = [step + 1 for step in range(1, len(history)) if history[step] != history[step - 1]]
    assert history[0] == 0 and changes == list(w.UPDATES)


def test_structured_masks_zero_whole_units_across_layers():
    run = w.build("structured", "conv")
    for _ in range(w.STEPS):
        run.train_step()
    masks = run.keeper.masks
    kept = masks["conv.weight"].flatten(1).all(1)
    assert not kept.all() and kept.any()
    assert torch.equal(masks["conv.weight"], kept[:, None, None, None].expand(8, 2, 3, 3))
    for name in ("conv.bias", "bn.weight", "bn.bias"):
        assert torch.equal(masks[name], kept), name
    columns = kept.repeat_interleave(16)  # fc's input columns of each conv channel (4 x 4 positions)
    assert torch.equal(masks["fc.weight"], columns.expand(3, -1))


# --------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------


def _check_after_backward(run: w.Run) -> None:
    for s in active_slots(run):
        assert s.param.grad is not None and torch.count_nonzero(s.param.grad[s.pruned]) == 0, s.name


def _check_after_step(run: w.Run) -> None:
    for s in active_slots(run):
        pruned = s.param.detach()[s.pruned]
        assert torch.count_nonzero(pruned) == 0 and not torch.signbit(pruned).any(), f"{s.name} revived"
        state = run.opt.state.get(s.param, {})
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != s.param.shape:
                continue
            assert torch.isfinite(value).all(), f"{s.name}: {key} not finite"
            if key in FIRST:
                assert torch.count_nonzero(value[s.pruned]) == 0, f"{s.name}: {key} of pruned entries"
            if key in SECOND:
                assert (value[s.pruned] != 0).all(), f"{s.name}: {key} holds 0.0 at pruned entries"


@pytest.mark.parametrize("opt_name", list(w.OPTIMIZERS))
@pytest.mark.parametrize("engine", w.ENGINES)
def test_pruned_entries_and_their_optimizer_state_stay_clean_for_20_steps(engine, opt_name):
    run = w.build(engine, "conv", w.OPTIMIZERS[opt_name], updates=OPT_UPDATES)
    assert_nontrivial(run)  # masks before the first step: the optimizer creates its state afterwards
    for step in range(20):
        x, y = w.batch("conv", step)
        run.opt.zero_grad()
        nn.functional.cross_entropy(run.model(x), y).backward()
        _check_after_backward(run)
        run.opt.step()
        run.steps += 1
        run.update_manually(run.steps)
        _check_after_step(run)
    assert run.keeper.masks != {} and sum(int(s.pruned.sum()) for s in run.keeper.slots) > 0
    state = run.opt.state[active_slots(run)[0].param]
    assert any(k in state for k in FIRST + SECOND) or opt_name == "sgd"  # the state checks did run


@pytest.mark.parametrize("opt_name", [n for n in w.OPTIMIZERS if n != "sgd"])
@pytest.mark.parametrize("engine", w.ENGINES)
def test_lazily_created_second_moments_hold_no_zero_after_the_first_step(engine, opt_name):
    run = w.build(engine, "conv", w.OPTIMIZERS[opt_name], updates=OPT_UPDATES)
    slots = active_slots(run)
    lazy = not any(run.opt.state.get(s.param) for s in slots)  # Adagrad creates its state at construction
    assert lazy or opt_name == "adagrad"
    run.train_step()
    for s in slots:
        state = run.opt.state[s.param]
        seconds = [k for k in SECOND if k in state]
        for key in seconds:
            assert (state[key][s.pruned] != 0).all(), f"{s.name}: {key} after the first step"
        for key in (k for k in FIRST if k in state):
            assert torch.count_nonzero(state[key][s.pruned]) == 0, f"{s.name}: {key} after the first step"


@pytest.mark.parametrize("opt_name", list(w.OPTIMIZERS))
def test_without_an_engine_the_optimizer_moves_zeroed_entries(opt_name):
    """Negative control: zeroing entries once is not enough; the engines' checks above are not vacuous."""
    model = w.make_model("conv", 0)
    opt = w.OPTIMIZERS[opt_name](model.parameters())
    zeroed = w.magnitude_keeps(model, ["conv.weight", "fc.weight"], 0.5)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in zeroed.items():
            params[name].masked_fill_(~keep, 0.0)
    for step in range(3):
        x, y = w.batch("conv", step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.count_nonzero(params[n].detach()[~k]) > 0 for n, k in zeroed.items())


def test_masked_scalar_parameter_keeps_its_optimizer_step_count():
    """A pruned 0-dim parameter: its state's ``step`` (and NAdam's ``mu_product``) are counters, not moments."""
    model = nn.Linear(3, 2)
    model.scale = nn.Parameter(torch.tensor(2.0))
    opt = torch.optim.NAdam(model.parameters(), lr=0.01)
    keeper = prunekit.MaskKeeper(model, ["scale", "weight"], optimizer=opt)
    for _ in range(2):
        opt.zero_grad()
        (model(torch.randn(4, 3)) * model.scale).sum().backward()
        opt.step()
    keeper.set_masks({"scale": torch.tensor(False)})
    state = opt.state[model.scale]
    assert float(model.scale.detach()) == 0.0
    assert float(state["step"]) == 2.0, "the keeper reset the step counter of a masked scalar parameter"
    assert float(state["mu_product"]) != 0.0
    keeper.remove()


# --------------------------------------------------------------------------------------
# hooks: strip, remove, finalize
# --------------------------------------------------------------------------------------


def _hooked(params) -> list:
    return [p for p in params if p._post_accumulate_grad_hooks]


def _trained(engine: str) -> w.Run:
    run = w.build(engine, "conv", w.OPTIMIZERS["sgd-momentum"], updates=OPT_UPDATES)
    for _ in range(3):
        run.train_step()
    assert_nontrivial(run)
    assert _hooked(run.model.parameters()) and run.opt._optimizer_step_post_hooks  # hooks to remove
    return run


def _assert_engine_is_gone(run: w.Run, params: list, pruned: dict) -> None:
    assert not _hooked(params), "a gradient hook is left"
    assert not run.opt._optimizer_step_post_hooks, "an optimizer step post hook is left"
    with pytest.raises(RuntimeError):
        run.engine.step()
    with pytest.raises(RuntimeError):
        run.engine.attach(torch.optim.SGD(run.model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError):
        if run.engine_name == "keeper":
            run.engine.set_masks(run.keeper.masks)
        else:
            run.engine.update_masks(0.9)
    for param, mask in pruned.items():
        assert torch.count_nonzero(param.detach()[mask]) == 0


def _pruned(run: w.Run) -> dict:
    return {s.param: s.pruned.clone() for s in active_slots(run)}


@pytest.mark.parametrize("engine", w.ENGINES)
def test_strip_removes_every_hook_and_the_engine_refuses_steps(engine):
    run = _trained(engine)
    keys = list(run.model.state_dict())
    pruned = _pruned(run)
    assert prunekit.strip(run.model) is run.model
    _assert_engine_is_gone(run, list(run.model.parameters()), pruned)
    assert list(run.model.state_dict()) == keys
    run.train_step()  # training goes on as with any model (nothing is called into the engine)
    prunekit.Pruner(run.model, 0.5).remove()  # the parameters are released: another engine may own them


def test_strip_after_structured_pruner_leaves_no_hooks():
    """Proof of issue 16: ``strip`` removes what a StructuredPruner installed, like a Pruner's."""
    run = _trained("structured")
    hooked = {id(p) for p in _hooked(run.model.parameters())}
    assert {n for n, p in run.model.named_parameters() if id(p) in hooked} >= {"conv.weight", "bn.weight", "fc.weight"}
    pruned = _pruned(run)
    prunekit.strip(run.model)
    _assert_engine_is_gone(run, list(run.model.parameters()), pruned)
    prunekit.StructuredPruner(run.model, w.example_input("conv"), 0.5)  # and a new one may be built


@pytest.mark.parametrize("engine", w.ENGINES)
def test_remove_or_finalize_removes_every_hook(engine):
    run = _trained(engine)
    params, pruned = list(run.model.parameters()), _pruned(run)
    if engine == "structured":
        model, _ = run.engine.finalize()
        assert model.conv.out_channels < 8 and not _hooked(model.parameters())
    else:
        assert run.engine.remove() is run.model
    _assert_engine_is_gone(run, params, pruned)


# --------------------------------------------------------------------------------------
# resume (in this process; a fresh interpreter in the kill-and-resume tests)
# --------------------------------------------------------------------------------------

KS = (0, 2, 4)  # before any step, just before the first mask update (3), after it


@pytest.fixture(scope="module")
def references():
    """Per engine: the uninterrupted run's final snapshot and its checkpoints at every k in KS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed runs (and the worker processes): same reduction order
    try:
        return _reference_runs()
    finally:
        torch.set_num_threads(threads)


def _reference_runs() -> dict:
    out = {}
    for engine in w.ENGINES:
        run, ckpts = w.build(engine), {}
        for step in range(w.STEPS + 1):
            if step in KS:
                ckpts[step] = torch_roundtrip(w.checkpoint(run))
            if step < w.STEPS:
                run.train_step()
        out[engine] = {"final": w.snapshot(run), "ckpts": ckpts}
    return out


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("engine", w.ENGINES)
def test_resume_from_step_k_is_bit_identical(references, engine, k):
    ref = references[engine]
    run = w.resume(engine, ref["ckpts"][k])
    while run.steps < w.STEPS:
        run.train_step()
    final = w.snapshot(run)
    assert_nontrivial(run)
    for part in ("step", "model", "masks", "engine", "optimizer"):
        assert_bit_identical(ref["final"][part], final[part], part)


@pytest.mark.parametrize("engine", w.ENGINES)
def test_resume_without_the_engine_state_is_not_identical(references, engine):
    """Negative control: the comparison above sees the engine's state."""
    run = w.resume(engine, references[engine]["ckpts"][4], load_engine=False)
    while run.steps < w.STEPS:
        run.train_step()
    ref = references[engine]["final"]["model"]
    assert any(not torch.equal(bits(ref[n]), bits(v)) for n, v in run.model.state_dict().items())


def test_structured_pruner_checkpoint_resumes_bit_identically(tmp_path):
    """Proof of issue 16: a StructuredPruner checkpoint (file, weights_only) resumes bit-identically."""
    args = ("structured", "mlp", w.OPTIMIZERS["adamw"])
    full = w.build(*args)
    for _ in range(4):
        full.train_step()
    assert_nontrivial(full)
    state = w.checkpoint(full)
    assert state["engine"]["format"] == "prunekit.StructuredPruner" and state["engine"]["version"] == 1
    w.save_atomic(tmp_path / "ckpt.pt", state)
    resumed = w.resume(*args[:1], w.load(tmp_path / "ckpt.pt"), *args[1:])
    for run in (full, resumed):
        while run.steps < w.STEPS:
            run.train_step()
    a, b = w.snapshot(full), w.snapshot(resumed)
    assert a["engine"]["keeps"] != {} and a["step"] == w.STEPS
    for part in ("model", "masks", "engine", "optimizer"):
        assert_bit_identical(a[part], b[part], part)


# --------------------------------------------------------------------------------------
# Proof: Adam/AdamW second moments are handled alike by both pruners
# --------------------------------------------------------------------------------------


def _mirror(kind: str, opt_name: str, twin: str):
    """A StructuredPruner run and an identical copy whose ``twin`` engine is handed the same masks."""
    structured = w.build("structured", kind, w.OPTIMIZERS[opt_name], updates=(0, 4, 8))
    model = w.make_model(kind, 0)
    model.load_state_dict(structured.model.state_dict())  # same start (the masked weights included)
    opt = w.OPTIMIZERS[opt_name](model.parameters())
    if twin == "manual":
        names = [n for n in structured.keeper.names if n.endswith("weight")]
        engine = prunekit.Pruner.manual(model, optimizer=opt)
        assert engine.names == names  # bias-free: the weights are all StructuredPruner masks
    else:
        engine = prunekit.MaskKeeper(model, structured.keeper.names, optimizer=opt)
    return structured, w.Run(twin, kind, model, opt, engine, ())


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "adam-amsgrad"])
@pytest.mark.parametrize("kind,twin", [("mlp-nobias", "manual"), ("conv", "keeper")])
def test_adam_second_moments_identical_for_structured_and_manual_pruner(kind, twin, opt_name):
    """Proof of issue 16: a StructuredPruner and a Pruner.manual (or bare keeper) with its masks agree bitwise."""
    structured, other = _mirror(kind, opt_name, twin)
    changes = 0
    for step in range(-1, 12):
        if step >= 0:
            for run in (structured, other):
                run.train_step()
        masks = structured.keeper.masks  # the twin takes them at the same point: right after the step
        if any(not torch.equal(masks[n], m) for n, m in other.keeper.masks.items()):
            other.engine.set_masks({n: masks[n] for n in other.keeper.names})
            changes += 1
        for s, t in zip(structured.keeper.slots, other.keeper.slots):
            assert s.name == t.name
            assert_bit_identical(s.param.detach(), t.param.detach(), f"step {step}: {s.name}")
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in structured.opt.state[s.param]:
                    assert_bit_identical(structured.opt.state[s.param][key], other.opt.state[t.param][key],
                                         f"step {step}: {s.name}/{key}")
    assert changes >= 2  # masks at 0, then changed (after step 4 or 8) with the optimizer state already there
    s = active_slots(structured)[0]
    assert (structured.opt.state[s.param]["exp_avg_sq"][s.pruned] != 0).all()  # handled, not just equal


# --------------------------------------------------------------------------------------
# kill -9 mid-run and resume in a fresh interpreter
# --------------------------------------------------------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """One process trains every engine with a checkpoint every 2 steps, is SIGKILLed while writing one of
    step 6, and a new process resumes every engine from its last checkpoint (step 4)."""
    out = tmp_path_factory.mktemp("kill")
    cmd = [sys.executable, str(WORKER), "run", ",".join(w.ENGINES), str(out), "--steps", str(w.STEPS),
           "--every", "2"]
    proc = subprocess.Popen([*cmd, "--hang-at", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "hanging":
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert lines[-1:] == ["hanging"], f"{lines} {err[-3000:]}"
    killed = {"rc": proc.returncode, "lines": lines,
              "files": {e: sorted(p.name for p in (out / e).iterdir()) for e in w.ENGINES},
              "ckpt_step": {e: w.load(out / e / "ckpt.pt")["step"] for e in w.ENGINES}}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"killed": killed, "resumed_lines": done.stdout.splitlines(),
            "final": {e: w.load(out / e / "final.pt") for e in w.ENGINES}}


@pytest.mark.slow
@pytest.mark.parametrize("engine", w.ENGINES)
def test_killed_mid_checkpoint_and_resumed_in_a_new_process_is_bit_identical(killed_runs, references, engine):
    killed = killed_runs["killed"]
    assert killed["rc"] == -signal.SIGKILL
    assert [line for line in killed["lines"] if line.split()[1:2] == [engine]] == [f"start {engine} 0", f"saved {engine} 2",
                                                                    f"saved {engine} 4"]
    assert killed["lines"][-1] == "hanging"
    assert killed["ckpt_step"][engine] == 4 and "final.pt" not in killed["files"][engine]
    if engine == w.ENGINES[0]:  # its checkpoint of step 6 was being written: the half file never landed
        assert any(TEMP_MARK in name for name in killed["files"][engine])
    assert f"start {engine} 4" in killed_runs["resumed_lines"]
    ref = references[engine]["final"]
    for part in ("step", "model", "masks", "engine", "optimizer"):
        assert_bit_identical(ref[part], killed_runs["final"][engine][part], part)


# --------------------------------------------------------------------------------------
# DDP: 2 processes (torchrun, gloo, CPU), every engine in one process group
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), "ddp", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "ddp.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("engine", w.MASKING_ENGINES)
def test_every_rank_holds_rank_0s_masks_after_each_update(ddp, engine):
    assert ddp["world"] == 2
    ranks, alone = ddp[f"{engine}/sync"], ddp[f"{engine}/nosync"]
    for r in range(2):
        assert all(ranks[r]["pruned_zero"]), f"rank {r}: a pruned weight is not zero"
    for step, (h0, h1) in enumerate(zip(ranks[0]["hashes"], ranks[1]["hashes"])):
        assert h0 == h1, f"{engine}: masks differ between ranks at step {step}"
    assert len(set(ranks[0]["hashes"])) == 2  # masks at step 0, changed at step 3: the sync ran twice
    # Negative control: without the sync each rank computes its own masks from its own weights ...
    assert alone[0]["hashes"][0] != alone[1]["hashes"][0]
    # ... and with it every rank took rank 0's.
    assert ranks[0]["hashes"][0] == alone[0]["hashes"][0]
