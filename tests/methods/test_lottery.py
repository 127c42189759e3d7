"""prunekit.methods.lottery: rounds, rewinding, controls, and resuming a run directory.

A tiny MLP on a synthetic, learnable 4-class problem keeps every run to a
fraction of a second. Expected counts are computed here from the closed form
``round(n * (1 - (1 - p)**r))``, not taken from the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from prunekit.methods.lottery import (
    LotteryConfig,
    LotteryData,
    RunStore,
    TrainSpec,
    run_control,
    run_lottery,
    train_early_stopping,
    train_masked,
)
from prunekit.methods.lottery.train import make_optimizer, snapshot

WEIGHTS = ("fc1.weight", "fc2.weight", "fc3.weight")
OUTPUT = "fc3.weight"
SPEC = TrainSpec(iterations=30, batch_size=32, lr=3e-3, eval_every=10)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 48)
        self.fc2 = nn.Linear(48, 24)
        self.fc3 = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_data(seed: int = 0) -> LotteryData:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(600, 20, generator=gen)
    y = (X @ torch.randn(20, 4, generator=gen)).argmax(dim=1)
    return LotteryData(X[:400], y[:400], X[400:500], y[400:500], X[500:], y[500:])


@pytest.fixture(scope="module")
def data() -> LotteryData:
    return make_data()


def config(**changes) -> LotteryConfig:
    return LotteryConfig(**{"train": SPEC, "rounds": 3, "rate": 0.3, **changes})


class Recorder:
    """Wraps the default trainer: counts calls and records the weights each training starts from."""

    def __init__(self) -> None:
        self.starts: list[dict[str, torch.Tensor]] = []
        self.pruned_nonzero_after_step: list[int] = []

    @property
    def calls(self) -> int:
        return len(self.starts)

    def __call__(self, model, optimizer, data, spec, **kwargs):
        self.starts.append(snapshot(model))
        zero = {n: p.detach() == 0 for n, p in model.named_parameters()}
        params = dict(model.named_parameters())

        def check(*_):  # runs after the pruner's own post-step hook (registered first)
            self.pruned_nonzero_after_step.append(sum(int((params[n].detach()[zero[n]] != 0).sum())
                                                      for n in WEIGHTS))

        handle = optimizer.register_step_post_hook(check)
        try:
            return train_early_stopping(model, optimizer, data, spec, **kwargs)
        finally:
            handle.remove()


def masks_of(run: Path, r: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"round_{r:02d}" / "mask.safetensors")


def weights_of(run: Path, r: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"round_{r:02d}" / "weights.safetensors")


def expected_pruned(n: int, p: float, r: int) -> int:
    return round(n * (1 - (1 - p) ** r))


# -- rounds ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ticket(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("ticket")
    recorder = Recorder()
    results = run_lottery(MLP, data, config(), out, trainer=recorder, progress=False)
    return out, results, recorder


def test_per_round_sparsity_follows_the_closed_form_exactly(ticket):
    out, results, _ = ticket
    numel = {n: p.numel() for n, p in MLP().named_parameters() if n in WEIGHTS}
    for r in range(4):
        masks = masks_of(out, r)
        assert set(masks) == set(WEIGHTS)
        for name in WEIGHTS:
            rate = 0.15 if name == OUTPUT else 0.3  # output layer at half rate
            assert int((~masks[name]).sum()) == expected_pruned(numel[name], rate, r), (name, r)
        kept = sum(int(m.sum()) for m in masks.values())
        assert results[r].remaining == pytest.approx(kept / sum(numel.values()))


def test_masks_only_shrink_and_pruned_weights_are_zero_in_saved_weights(ticket):
    out, _, _ = ticket
    for r in range(1, 4):
        before, after, weights = masks_of(out, r - 1), masks_of(out, r), weights_of(out, r)
        for name in WEIGHTS:
            assert not (after[name] & ~before[name]).any()  # nothing revived
            assert torch.equal(weights[name][~after[name]], torch.zeros(int((~after[name]).sum())))


def test_rewinding_restores_exactly_the_initial_values_of_survivors(ticket):
    out, _, recorder = ticket
    init = load_file(out / "init.safetensors")
    assert torch.equal(load_file(out / "rewind.safetensors")["fc1.weight"], init["fc1.weight"])  # k = 0
    for r in range(1, 4):
        start, masks = recorder.starts[r], masks_of(out, r)
        for name, value in init.items():
            keep = masks.get(name, torch.ones_like(value, dtype=torch.bool))
            assert torch.equal(start[name][keep], value[keep]), (name, r)
            assert torch.equal(start[name][~keep], torch.zeros(int((~keep).sum()))), (name, r)


def test_pruned_weights_stay_exactly_zero_after_every_step(ticket):
    _, _, recorder = ticket
    assert len(recorder.pruned_nonzero_after_step) == 4 * SPEC.iterations
    assert sum(recorder.pruned_nonzero_after_step) == 0


def test_early_stopping_iteration_is_the_minimum_of_the_validation_curve(ticket):
    _, results, _ = ticket
    for result in results:
        curve = result.metrics["curve"]
        assert [c["iteration"] for c in curve] == [10, 20, 30]
        best = min(curve, key=lambda c: c["val_loss"])
        assert result.early_stop_iteration == best["iteration"]
        # The kept weights of that iteration reproduce its validation loss exactly.
        assert result.metrics["early_stop"]["val_loss"] == best["val_loss"]
        assert 0.0 <= result.test_accuracy <= 1.0


def test_late_rewinding_rewinds_to_the_weights_of_iteration_k(tmp_path, data):
    k = 7
    recorder = Recorder()
    run_lottery(MLP, data, config(rounds=1, rewind_iteration=k), tmp_path, trainer=recorder, progress=False)
    # Independently: k steps from the same init, same optimizer and sample order.
    model = MLP()
    model.load_state_dict(load_file(tmp_path / "init.safetensors"))
    spec = TrainSpec(iterations=k, batch_size=SPEC.batch_size, lr=SPEC.lr, eval_every=k)
    train_early_stopping(model, make_optimizer(model, spec), data, spec, seed=0)
    rewind = load_file(tmp_path / "rewind.safetensors")
    assert all(torch.equal(rewind[n], v) for n, v in model.state_dict().items())
    keep = masks_of(tmp_path, 1)["fc2.weight"]
    assert torch.equal(recorder.starts[1]["fc2.weight"][keep], rewind["fc2.weight"][keep])
    assert not torch.equal(rewind["fc2.weight"], load_file(tmp_path / "init.safetensors")["fc2.weight"])


def test_global_ranking_prunes_the_hidden_layers_together_and_the_output_alone(tmp_path, data):
    run_lottery(MLP, data, config(rounds=2, ranking="global"), tmp_path, progress=False)
    hidden = 20 * 48 + 48 * 24
    for r in (1, 2):
        masks = masks_of(tmp_path, r)
        pruned_hidden = sum(int((~masks[n]).sum()) for n in ("fc1.weight", "fc2.weight"))
        assert pruned_hidden == expected_pruned(hidden, 0.3, r)
        assert int((~masks[OUTPUT]).sum()) == expected_pruned(24 * 4, 0.15, r)


# -- controls -------------------------------------------------------------------------------


def test_random_reinit_keeps_the_mask_but_draws_fresh_values(ticket, tmp_path, data):
    out, _, _ = ticket
    recorder = Recorder()
    run_control("reinit", MLP, data, config(), out, tmp_path, trainer=recorder, progress=False)
    init = load_file(out / "init.safetensors")
    for r in range(1, 4):
        mask = masks_of(tmp_path, r)
        assert all(torch.equal(mask[n], masks_of(out, r)[n]) for n in WEIGHTS)
        start = recorder.starts[r - 1]
        for name in WEIGHTS:
            keep = mask[name]
            assert not torch.equal(start[name][keep], init[name][keep])
            assert torch.equal(start[name][~keep], torch.zeros(int((~keep).sum())))
    assert not torch.equal(recorder.starts[0]["fc1.weight"], recorder.starts[1]["fc1.weight"])  # fresh per round


def test_random_mask_has_the_tickets_per_layer_counts(ticket, tmp_path, data):
    out, _, _ = ticket
    recorder = Recorder()
    run_control("random_mask", MLP, data, config(), out, tmp_path, trainer=recorder, progress=False)
    rewind = load_file(out / "rewind.safetensors")
    for r in range(1, 4):
        mask, reference = masks_of(tmp_path, r), masks_of(out, r)
        for name in WEIGHTS:
            assert int(mask[name].sum()) == int(reference[name].sum())
            assert torch.equal(recorder.starts[r - 1][name][mask[name]], rewind[name][mask[name]])
        assert not torch.equal(mask["fc1.weight"], reference["fc1.weight"])


def test_one_shot_prunes_the_dense_weights_to_the_same_sparsity(ticket, tmp_path, data):
    out, _, _ = ticket
    results = run_control("one_shot", MLP, data, config(), out, tmp_path, progress=False)
    assert [r.round for r in results] == [1, 2, 3]
    dense = weights_of(out, 0)
    for r in (1, 2, 3):
        mask = masks_of(tmp_path, r)
        for name in WEIGHTS:
            assert int(mask[name].sum()) == int(masks_of(out, r)[name].sum())
            # Magnitude on the dense weights: every kept |w| >= every pruned |w|.
            assert dense[name].abs()[mask[name]].min() >= dense[name].abs()[~mask[name]].max()
    # One round of IMP is one-shot pruning: identical masks and results.
    assert all(torch.equal(masks_of(tmp_path, 1)[n], masks_of(out, 1)[n]) for n in WEIGHTS)


def test_control_rerun_skips_finished_rounds(ticket, tmp_path, data):
    out, _, _ = ticket
    first = run_control("random_mask", MLP, data, config(), out, tmp_path, progress=False)
    recorder = Recorder()
    again = run_control("random_mask", MLP, data, config(), out, tmp_path, trainer=recorder, progress=False)
    assert recorder.calls == 0 and [r.metrics for r in again] == [r.metrics for r in first]


def test_control_needs_a_ticket_run(tmp_path, data):
    with pytest.raises(ValueError, match="not a lottery run directory"):
        run_control("reinit", MLP, data, config(), tmp_path / "missing", tmp_path / "reinit", progress=False)


# -- resuming -------------------------------------------------------------------------------


def test_rerun_skips_finished_rounds_and_can_extend_the_run(tmp_path, data):
    first = run_lottery(MLP, data, config(rounds=2), tmp_path, progress=False)
    recorder = Recorder()
    again = run_lottery(MLP, data, config(rounds=2), tmp_path, trainer=recorder, progress=False)
    assert recorder.calls == 0
    assert [r.metrics for r in again] == [r.metrics for r in first]
    longer = run_lottery(MLP, data, config(rounds=3), tmp_path, trainer=recorder, progress=False)
    assert recorder.calls == 1 and len(longer) == 4  # only round 3 trained


@pytest.mark.parametrize("changes", [dict(rate=0.25), dict(seed=1), dict(rewind_iteration=3),
                                     dict(train=TrainSpec(iterations=31, batch_size=32, lr=3e-3, eval_every=10))])
def test_resuming_with_a_different_config_is_refused(tmp_path, data, changes):
    run_lottery(MLP, data, config(rounds=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        run_lottery(MLP, data, config(rounds=1, **changes), tmp_path, progress=False)


def test_resuming_with_different_data_is_refused(tmp_path, data):
    run_lottery(MLP, data, config(rounds=0), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration.*data"):
        run_lottery(MLP, make_data(seed=1), config(rounds=0), tmp_path, progress=False)


def test_an_altered_round_file_is_detected(tmp_path, data):
    run_lottery(MLP, data, config(rounds=1), tmp_path, progress=False)
    path = tmp_path / "round_01" / "mask.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256"):
        run_lottery(MLP, data, config(rounds=2), tmp_path, progress=False)


def _worker(out: str, kill: str) -> None:
    """Run in a subprocess: a 4-round run that dies (``os._exit``, no cleanup) inside round 2."""
    torch.set_num_threads(1)
    calls = []

    def trainer(*args, **kwargs):
        calls.append(1)
        outcome = train_early_stopping(*args, **kwargs)
        if kill == "training" and len(calls) == 3:  # rounds 0, 1, 2: die with round 2 trained, unsaved
            os._exit(17)
        return outcome

    if kill == "metrics":
        write_metrics = RunStore.write_metrics

        def dying(self, round_index, metrics):
            if round_index == 2:  # weights of round 2 written, metrics not
                os._exit(17)
            write_metrics(self, round_index, metrics)

        RunStore.write_metrics = dying
    run_lottery(MLP, make_data(), config(rounds=4), out, trainer=trainer, progress=False)


@pytest.mark.slow  # a fresh interpreter per case (torch import)
@pytest.mark.parametrize("kill", ["training", "metrics"])
def test_resume_after_a_killed_round_equals_an_uninterrupted_run(tmp_path, data, kill):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
           f"import test_lottery; test_lottery._worker({str(killed)!r}, {kill!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    assert (killed / "round_01" / "metrics.json").exists() and not (killed / "round_02" / "metrics.json").exists()
    recorder = Recorder()
    resumed = run_lottery(MLP, data, config(rounds=4), killed, trainer=recorder, progress=False)
    assert recorder.calls == 3  # rounds 2, 3, 4
    reference = run_lottery(MLP, data, config(rounds=4), clean, progress=False)
    for a, b in zip(resumed, reference):
        assert {k: v for k, v in a.metrics.items() if k != "seconds"} == \
               {k: v for k, v in b.metrics.items() if k != "seconds"}
    files = sorted(p.relative_to(clean) for p in clean.rglob("*.safetensors"))
    assert len(files) == 2 + 5 * 2
    for rel in files:
        assert (killed / rel).read_bytes() == (clean / rel).read_bytes(), rel
    assert not list(killed.rglob("*.tmp"))  # the killed writes left no half files behind


# -- pieces ---------------------------------------------------------------------------------


def test_train_masked_refuses_a_trainer_that_moves_pruned_weights(data):
    model = MLP()
    masks = {n: torch.rand_like(p) > 0.5 for n, p in model.named_parameters() if n in WEIGHTS}

    def rogue(model, optimizer, data, spec, **kwargs):
        outcome = train_early_stopping(model, optimizer, data, spec, **kwargs)
        with torch.no_grad():
            model.fc1.weight.add_(1.0)  # after the last step: bypasses the optimizer and the pruner
        return outcome

    with pytest.raises(RuntimeError, match="changed pruned weights"):
        train_masked(model, model.state_dict(), masks, data, SPEC, seed=0, trainer=rogue)


def test_config_validation_and_round_trip():
    cfg = config(ranking="global", output_rate=0.2, exclude=("fc2.*",))
    assert LotteryConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="rewind_iteration"):
        config(rewind_iteration=31)
    with pytest.raises(ValueError, match="rate"):
        config(rate=1.0)
    with pytest.raises(ValueError, match="ranking"):
        config(ranking="random")
    with pytest.raises(ValueError, match="unknown fields"):
        LotteryConfig.from_dict({**cfg.to_dict(), "extra": 1})


def test_unknown_output_layer_is_an_error(tmp_path, data):
    with pytest.raises(ValueError, match="output_layer"):
        run_lottery(MLP, data, config(output_layer="head.weight"), tmp_path, progress=False)


def test_carve_is_deterministic_and_disjoint():
    X, y = torch.arange(200.0).reshape(100, 2), torch.arange(100) % 5
    a = LotteryData.carve(X, y, X[:5], y[:5], val_fraction=0.2, seed=3)
    b = LotteryData.carve(X, y, X[:5], y[:5], val_fraction=0.2, seed=3)
    assert torch.equal(a.X_val, b.X_val) and len(a.X_val) == 20 and len(a.X_train) == 80
    assert not set(a.X_val[:, 0].tolist()) & set(a.X_train[:, 0].tolist())
    assert a.fingerprint() == b.fingerprint()
