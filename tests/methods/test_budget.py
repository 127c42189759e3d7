"""Accuracy-budgeted pruning: the one-shot search against known thresholds, and StopWhen against runs stopped by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit import PolynomialDecay, Pruner, StopWhen, allocate, prune_to_budget
from prunekit.apps.models import LeNet5, LeNet300100
from prunekit.methods.budget import Tolerance, Trial
from prunekit.training.data import load_digits
from prunekit.training.loop import evaluate as evaluate_model
from prunekit.training.loop import train


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models: one intra-op thread (the machine is shared)."""


def mlp(seed: int, inputs: int = 12, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet300100(num_classes=classes, in_features=inputs)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]


def zero_fraction(model: nn.Module) -> float:
    ws = weights(model)
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# -- the tolerance ----------------------------------------------------------------------------------------------------


def test_tolerance_by_hand():
    assert Tolerance(0.05).ok(0.9, 0.85) and not Tolerance(0.05).ok(0.9, 0.8499)
    assert Tolerance(0.05).ok(0.9, 0.99)  # better is always within
    loss = Tolerance(0.1, relative=True, higher_is_better=False)
    assert loss.drop(2.0, 2.2) == 0.1 and loss.ok(2.0, 2.2) and not loss.ok(2.0, 2.21) and loss.ok(2.0, 1.0)
    assert Tolerance(0.01, relative=True).drop(-2.0, -2.02) == 0.01  # |reference| for a negative metric
    with pytest.raises(ValueError, match="max_drop must be >= 0"):
        Tolerance(-0.1)
    with pytest.raises(TypeError, match="relative must be True or False"):
        Tolerance(0.1, relative=1)
    with pytest.raises(ValueError, match="nonzero reference"):
        Tolerance(0.1, relative=True).check_reference(0.0)


# -- one-shot: a metric that reads the sparsity, so the answer is known exactly ---------------------------------------


def kept_fraction(model: nn.Module) -> float:
    return 1.0 - zero_fraction(model)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", ["uniform", "erk", "lamp"])
def test_monotone_threshold_within_tol(seed, rule):
    model = mlp(seed)
    dense = state_of(model)
    max_drop = [0.37, 0.6, 0.81][seed]
    r = prune_to_budget(model, kept_fraction, max_drop=max_drop, rule=rule, tol=0.004, progress=False)
    # the metric is 1 - sparsity: the threshold is max_drop itself
    assert max_drop - 0.004 - 1e-3 <= r.sparsity <= max_drop + 1e-12
    assert r.metric == kept_fraction(model) and r.dense == 1.0 and r.drop <= max_drop
    assert r.sparsity == pytest.approx(zero_fraction(model), abs=0) and r.allocation.rule == rule
    r.allocation.verify(model)  # exact counts per layer, as allocated
    assert r.allocation == allocate(mlp(seed), r.requested, rule)  # allocated on the dense weights
    bad = [t for t in r.trials if not t.ok]
    assert all(t.ok == (1 - t.metric <= max_drop + 1e-12) for t in r.trials)
    assert min(t.sparsity for t in bad) - r.requested <= 0.004  # a bad trial within tol above the answer
    # nothing but the weights in scope changed, and those only to zero
    for key, value in model.state_dict().items():
        assert torch.equal(value[value != 0], dense[key][value != 0])


def test_hi_within_tolerance_is_taken_at_once():
    model = mlp(0)
    r = prune_to_budget(model, lambda m: 1.0, max_drop=0.0, hi=0.9, progress=False)
    assert [t.sparsity for t in r.trials] == [0.9] and r.requested == 0.9
    assert r.sparsity == pytest.approx(0.9, abs=1e-4) and r.evaluations == 3  # dense, hi, final


def test_lower_is_better_relative():
    model = mlp(3)
    loss = lambda m: 2.0 + 3.0 * zero_fraction(m) ** 2
    r = prune_to_budget(model, loss, max_drop=0.3, relative=True, higher_is_better=False, tol=0.002,
                        progress=False)
    threshold = math.sqrt(0.3 * 2.0 / 3.0)  # 2 + 3 s^2 <= 2 * 1.3
    assert threshold - 0.003 <= r.sparsity <= threshold and r.metric <= 2.6 + 1e-12


def bumpy(regions):
    """A metric of the sparsity that is 1 inside the good regions and 0 elsewhere (non-monotone)."""
    def metric(model: nn.Module) -> float:
        s = zero_fraction(model)
        return 1.0 if any(a <= s <= b for a, b in regions) else 0.0
    return metric


def test_non_monotone_known_answer():
    # good on [0, 0.2] and [0.4, 0.6]: bisection tries 0.99 (bad), 0.495 (good), then closes in on 0.6
    model = mlp(0)
    r = prune_to_budget(model, bumpy([(0.0, 0.2), (0.4, 0.6)]), max_drop=0.5, tol=0.003, progress=False)
    assert r.trials[0].sparsity == 0.99 and not r.trials[0].ok and r.trials[1].ok
    assert 0.597 - 1e-3 <= r.sparsity <= 0.6 and r.metric == 1.0
    assert bumpy([(0.0, 0.2), (0.4, 0.6)])(model) == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_non_monotone_never_outside(seed):
    g = torch.Generator().manual_seed(seed)
    edges = sorted(torch.rand(6, generator=g).tolist())
    regions = [(0.0, edges[0])] + [(edges[i], edges[i + 1]) for i in (1, 3)]
    metric = bumpy(regions)
    model = mlp(seed)
    r = prune_to_budget(model, metric, max_drop=0.5, tol=0.01, progress=False)
    assert metric(model) == 1.0 and r.metric == 1.0  # the returned model is good on its evaluation set
    if r.trials[0].ok:
        assert r.requested == 0.99
    else:  # a boundary: a bad trial less than tol above
        above = [t.sparsity for t in r.trials if not t.ok and t.sparsity > r.requested]
        assert min(above) - r.requested <= 0.01


def searched_then(monkeypatch, flag):
    """Set ``flag["final"]`` once the bisection is over: every later evaluation is a final check."""
    from prunekit.methods import budget as module
    real = module._bisect

    def bisect(*args, **kwargs):
        out = real(*args, **kwargs)
        flag["final"] = True
        return out
    monkeypatch.setattr(module, "_bisect", bisect)


def test_non_reproducible_evaluate_falls_back(monkeypatch):
    # good up to 0.6, except that the first re-evaluation of a pruned model is bad
    flag = {"final": False, "finals": 0}

    def flaky(model: nn.Module) -> float:
        if flag["final"]:
            flag["finals"] += 1
            if flag["finals"] == 1:
                return 0.0
        return 1.0 if zero_fraction(model) <= 0.6 else 0.0
    searched_then(monkeypatch, flag)
    model = mlp(1)
    r = prune_to_budget(model, flaky, max_drop=0.5, tol=0.01, progress=False)
    good = sorted((t.sparsity for t in r.trials if t.ok), reverse=True)
    assert r.rejected == [good[0]] and r.requested == good[1] and r.metric == 1.0 and flag["finals"] == 2
    assert zero_fraction(model) == pytest.approx(r.sparsity, abs=0) and r.sparsity <= 0.6


def test_all_finals_rejected_leaves_dense(monkeypatch):
    model = mlp(2)
    dense = state_of(model)
    flag = {"final": False}
    searched_then(monkeypatch, flag)
    metric = lambda m: 1.0 if not flag["final"] or zero_fraction(m) == 0 else 0.0
    r = prune_to_budget(model, metric, max_drop=0.0, hi=0.5, progress=False)
    assert r.rejected == [0.5] and r.sparsity == 0.0 and r.allocation is None and r.metric == r.dense
    assert_same(state_of(model), dense)
    with pytest.raises(RuntimeError, match="not reproducible"):
        flag["final"] = False
        prune_to_budget(model, metric, max_drop=0.0, lo=0.1, hi=0.5, progress=False)
    assert_same(state_of(model), dense)


def test_evaluate_changes_are_undone_and_errors_restore():
    model = mlp(4)
    dense = state_of(model)

    def meddling(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            weights(m)[0].mul_(2.0)  # zeros stay zeros: the metric is unchanged
        return kept_fraction(m)
    r = prune_to_budget(model, meddling, max_drop=0.5, progress=False)
    assert model.training  # modes back
    assert r.sparsity == pytest.approx(0.5, abs=0.01)
    # the returned model is the pruned dense one, not the meddled one
    for key, value in model.state_dict().items():
        assert torch.equal(value[value != 0], dense[key][value != 0])

    model = mlp(4)

    def boom(m: nn.Module) -> float:
        if zero_fraction(m) > 0.9:
            raise RuntimeError("boom")
        return 1.0
    with pytest.raises(RuntimeError, match="boom"):
        prune_to_budget(model, boom, max_drop=0.1, progress=False)
    assert_same(state_of(model), dense)


def test_callable_method_and_recovery():
    model = mlp(5)
    seen = []

    def method(m: nn.Module, alloc) -> None:  # magnitude by hand: keep the largest |w| per layer
        seen.append(alloc)
        params = dict(m.named_parameters())
        with torch.no_grad():
            for name, count in zip(alloc.names, alloc.counts):
                w = params[name]
                order = w.abs().flatten().argsort()
                w.view(-1)[order[:count]] = 0

    recovered = []

    def recover(m: nn.Module) -> None:  # revives every weight: must be undone for pruned ones
        recovered.append(zero_fraction(m))
        with torch.no_grad():
            for w in weights(m):
                w.add_(0.01)
    reference = copy.deepcopy(model)
    r = prune_to_budget(model, kept_fraction, max_drop=0.3, method=method, recover=recover, tol=0.01,
                        progress=False)
    assert len(recovered) == len(r.trials) + 1 and len(seen) == len(r.trials) + 1
    assert 0.29 - 1e-3 <= r.sparsity <= 0.3 and r.metric == pytest.approx(1 - r.sparsity, abs=0)
    # identical to Pruner magnitude on the same allocation, then +0.01 on the kept weights
    pruner = Pruner.manual(reference, overrides=r.allocation)
    pruner.update_masks()
    masks = pruner.masks
    pruner.remove()
    for (name, keep), w, w0 in zip(masks.items(), weights(model), weights(reference)):
        assert torch.equal(w == 0, ~keep), name
        assert torch.equal(w[keep], w0[keep] + 0.01)


def test_bad_input():
    model = mlp(0)
    dense = state_of(model)
    with pytest.raises(ValueError, match="max_drop must be >= 0"):
        prune_to_budget(model, kept_fraction, max_drop=-0.1)
    with pytest.raises(ValueError, match="0 <= lo < hi < 1"):
        prune_to_budget(model, kept_fraction, max_drop=0.1, lo=0.5, hi=0.4)
    with pytest.raises(ValueError, match="0 <= lo < hi < 1"):
        prune_to_budget(model, kept_fraction, max_drop=0.1, hi=1.0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        prune_to_budget(model, kept_fraction, max_drop=0.1, tol=0)
    with pytest.raises(TypeError, match="evaluate must be a callable"):
        prune_to_budget(model, 0.9, max_drop=0.1)
    with pytest.raises(ValueError, match="unknown rule"):
        prune_to_budget(model, kept_fraction, max_drop=0.1, rule="nope")
    with pytest.raises(ValueError, match="method must be 'magnitude' or a callable"):
        prune_to_budget(model, kept_fraction, max_drop=0.1, method="wanda")
    with pytest.raises(ValueError, match="criterion= and granularity= apply to method='magnitude'"):
        prune_to_budget(model, kept_fraction, max_drop=0.1, method=lambda m, a: None,
                        criterion=prunekit.Magnitude())
    with pytest.raises(TypeError, match="evaluate must return a real number"):
        prune_to_budget(model, lambda m: "high", max_drop=0.1, progress=False)
    with pytest.raises(ValueError, match="evaluate returned nan"):
        prune_to_budget(model, lambda m: float("nan"), max_drop=0.1, progress=False)
    with pytest.raises(ValueError, match="relative=True needs a nonzero reference"):
        prune_to_budget(model, lambda m: 0.0, max_drop=0.1, relative=True, progress=False)
    with pytest.raises(ValueError, match="already at lo=0.5"):
        prune_to_budget(model, kept_fraction, max_drop=0.1, lo=0.5, progress=False)
    with pytest.raises(ValueError, match="no prunable parameter"):
        prune_to_budget(model, kept_fraction, max_drop=0.1, layers=["nothing*"], progress=False)
    assert_same(state_of(model), dense)  # every refusal left the model alone


def test_nothing_within_tolerance_leaves_dense():
    model = mlp(6)
    dense = state_of(model)
    r = prune_to_budget(model, kept_fraction, max_drop=0.0, tol=0.05, progress=False)
    assert not any(t.ok for t in r.trials) and r.sparsity == 0.0 and r.metric == 1.0 and r.allocation is None
    assert_same(state_of(model), dense) and "(returned)" in r.table() and r.to_dict()["allocation"] is None


def test_lo_above_zero_is_tried_first():
    model = mlp(1)
    r = prune_to_budget(model, kept_fraction, max_drop=0.5, lo=0.2, tol=0.01, progress=False)
    assert r.trials[0] == Trial(0.2, pytest.approx(0.8, abs=1e-3), True) and 0.49 - 1e-3 <= r.sparsity <= 0.5


# -- one-shot: real accuracy on digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model():
    X, y = load_digits("train", flat=True)
    Xt, yt = load_digits("test", flat=True)
    model = mlp(0, inputs=64, classes=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(model, X, y, epochs=5, batch_size=32, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
          progress=False)
    torch.set_num_threads(threads)
    return model, Xt, yt


def test_real_accuracy_on_digits(digits_model):
    model, Xt, yt = digits_model
    model = copy.deepcopy(model)
    dense_model = copy.deepcopy(model)
    accuracy = lambda m: evaluate_model(m, Xt, yt)["accuracy"]
    dense = accuracy(model)
    assert dense > 0.9
    r = prune_to_budget(model, accuracy, max_drop=0.01, rule="lamp", tol=0.01, progress=False)
    assert r.dense == dense and accuracy(model) == r.metric and dense - r.metric <= 0.01 + 1e-12
    assert r.sparsity > 0.3  # an MLP of 300-100 on 8x8 digits has plenty to spare
    # every trial's metric, recomputed on a copy pruned by hand (largest |w| kept per allocated count)
    for t in r.trials:
        copy_ = copy.deepcopy(dense_model)
        alloc = allocate(copy_, t.sparsity, "lamp")
        params = dict(copy_.named_parameters())
        with torch.no_grad():
            for name, count in zip(alloc.names, alloc.counts):
                w = params[name]
                w.view(-1)[w.abs().flatten().argsort()[:count]] = 0
        assert accuracy(copy_) == t.metric and t.ok == (dense - t.metric <= 0.01 + 1e-12)


# -- gradual: StopWhen ------------------------------------------------------------------------------------------------


SCHEDULE = PolynomialDecay(0.0, 0.9, begin_step=0, end_step=60, power=3, frequency=10)


def batches(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def sgd_step(model, opt, data, step):
    X, y = data[step % len(data)]
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()


def first_over(limit: float) -> tuple[int, int]:
    """(last good update step, first update step with schedule sparsity > limit) of SCHEDULE."""
    steps = list(range(0, 61, 10))
    bad = next(t for t in steps if SCHEDULE.sparsity(t) > limit + 1e-9)
    return bad - 10, bad


def small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 4))


def make_run(seed: int, hooks=()):
    model = small(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(model, SCHEDULE, optimizer=opt, hooks=hooks)
    return model, opt, pruner


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [0.5, 0.75])
def test_stop_at_first_violation_equals_run_stopped_by_hand(seed, limit):
    data = batches(seed)
    stop = StopWhen(kept_fraction, max_drop=limit)
    model, opt, pruner = make_run(seed, [stop])
    steps = 80
    for step in range(steps):
        sgd_step(model, opt, data, step)
    good_step, bad_step = first_over(limit)
    assert stop.stopped and stop.step == bad_step and stop.baseline == 1.0
    assert [c.step for c in stop.history] == list(range(0, bad_step + 1, 10))
    assert [c.ok for c in stop.history] == [True] * (len(stop.history) - 1) + [False]
    assert stop.good.step == good_step and stop.sparsity == stop.good.sparsity
    assert stop.sparsity == pytest.approx(SCHEDULE.sparsity(good_step), abs=1e-3)
    assert zero_fraction(model) <= limit  # held: later scheduled updates did nothing
    # by hand: the same run, its pruning replaced at the last good update by fixed masks (no StopWhen, no hold)
    model2, opt2, pruner2 = make_run(seed)
    for step in range(steps):
        sgd_step(model2, opt2, data, step)
        if step + 1 == good_step:
            masks = pruner2.masks
            pruner2.remove()
            pruner2 = Pruner.manual(model2, optimizer=opt2)
            pruner2.set_masks(masks)
    for (k, a), b in zip(pruner.masks.items(), pruner2.masks.values()):
        assert torch.equal(a, b), k
    assert_same(state_of(model), state_of(model2))
    for p, q in zip(model.parameters(), model2.parameters()):  # momentum too
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    # negative control: the unstopped run differs
    model3, opt3, _ = make_run(seed)
    for step in range(steps):
        sgd_step(model3, opt3, data, step)
    assert zero_fraction(model3) > limit + 0.05


def test_first_update_violating_keeps_dense_and_loss_metric():
    data = batches(3)
    stop = StopWhen(lambda m: 1.0 + zero_fraction(m), max_drop=0.0, higher_is_better=False)
    model = small(3)
    dense = state_of(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = Pruner(model, PolynomialDecay(0.3, 0.9, 0, 60, frequency=10), optimizer=opt, hooks=[stop])
    assert stop.stopped and stop.step == 0 and stop.sparsity == 0.0 and stop.good is None
    assert_same(state_of(model), dense) and all(bool(m.all()) for m in pruner.masks.values())
    for step in range(25):
        sgd_step(model, opt, data, step)
    assert zero_fraction(model) == 0.0 and len(stop.history) == 1 and stop.evaluations == 2
    assert "stopped at step 0" in stop.summary()


def test_evaluate_does_not_disturb_the_run():
    # an evaluate that draws random numbers and flips modes; the run draws random numbers too (noisy inputs)
    def noisy(m: nn.Module) -> float:
        m.eval()
        torch.rand(100)
        return 1.0

    def run(hooks):
        model, opt, _ = make_run(4, hooks)  # seeds the global RNG
        data = batches(4)
        for step in range(45):
            X, y = data[step % len(data)]
            data[step % len(data)] = (X + 0.01 * torch.randn_like(X), y)
            sgd_step(model, opt, data, step)
        return model, torch.rand(3)
    stop = StopWhen(noisy, max_drop=0.1)
    model, after = run([stop])
    reference, after_ref = run([])
    assert not stop.stopped and len(stop.history) == 5 and model.training
    assert torch.equal(after, after_ref)  # the RNG stream is where it would be without evaluations
    assert_same(state_of(model), state_of(reference))
    # negative control: the same evaluate without the protection changes the run
    model3, opt3, _ = make_run(4)
    data = batches(4)
    for step in range(45):
        X, y = data[step % len(data)]
        data[step % len(data)] = (X + 0.01 * torch.randn_like(X), y)
        sgd_step(model3, opt3, data, step)
        if step % 10 == 9:
            noisy(model3)
            model3.train()
    assert not torch.equal(weights(model3)[0], weights(model)[0])


def checkpoint(model, opt, pruner, stop):
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict(),
                          "stop": stop.state_dict()})


@pytest.mark.parametrize("cut", [25, 55])  # before the stop (at step 40) and after it
def test_resume_mid_search_is_bit_identical(cut):
    seed, limit, steps = 5, 0.75, 70
    data = batches(seed)
    stop = StopWhen(kept_fraction, max_drop=limit)
    model, opt, pruner = make_run(seed, [stop])
    saved = None
    for step in range(steps):
        if step == cut:
            saved = checkpoint(model, opt, pruner, stop)
        sgd_step(model, opt, data, step)
    assert stop.stopped and (stop.step < cut) == (cut == 55)
    # fresh objects, resumed from the checkpoint
    model2, opt2, pruner2 = make_run(seed + 100)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    pruner2.load_state_dict(saved["pruner"])
    stop2 = StopWhen(kept_fraction, max_drop=limit)
    stop2.load_state_dict(saved["stop"])
    stop2.attach(pruner2)
    for step in range(cut, steps):
        sgd_step(model2, opt2, data, step)
    assert_same(state_of(model), state_of(model2))
    assert stop2.state_dict() == stop.state_dict() and stop2.step == stop.step
    for a, b in zip(pruner.masks.values(), pruner2.masks.values()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


def test_with_allocation_ramps_on_lenet():
    torch.manual_seed(0)
    model = LeNet5(num_classes=4)
    X, y = torch.randn(8, 1, 28, 28), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    alloc = allocate(model, 0.9, "erk")
    stop = StopWhen(kept_fraction, max_drop=0.6)
    schedule = PolynomialDecay(0.0, 0.9, 0, 40, frequency=10)
    Pruner(model, schedule, overrides=alloc.schedules(schedule), optimizer=opt, hooks=[stop])
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    assert stop.stopped and stop.sparsity <= 0.6 < stop.history[-1].sparsity
    assert zero_fraction(model) == pytest.approx(stop.sparsity, abs=0)


def test_stopped_hook_in_a_fresh_pruner_holds_it():
    seed, data = 6, batches(6)
    stop = StopWhen(kept_fraction, max_drop=0.5)
    model, opt, _ = make_run(seed, [stop])
    for step in range(60):
        sgd_step(model, opt, data, step)
    assert stop.stopped
    again = StopWhen(kept_fraction, max_drop=0.5)
    again.load_state_dict(stop.state_dict())
    fresh = small(seed)
    dense = state_of(fresh)
    p2 = Pruner(fresh, SCHEDULE, hooks=[again])  # its step-0 update is undone at once, then it is held
    assert_same(state_of(fresh), dense) and all(bool(m.all()) for m in p2.masks.values())
    for _ in range(30):
        p2.step()
    assert zero_fraction(fresh) == 0.0 and again.history == stop.history


def test_stopwhen_bad_input():
    with pytest.raises(TypeError, match="evaluate must be a callable"):
        StopWhen(1.0, 0.1)
    with pytest.raises(ValueError, match="max_drop must be >= 0"):
        StopWhen(kept_fraction, -1)
    with pytest.raises(ValueError, match="nonzero reference"):
        StopWhen(kept_fraction, 0.1, relative=True, baseline=0.0)
    stop = StopWhen(lambda m: "x", 0.1)
    with pytest.raises(TypeError, match="StopWhen: evaluate must return a real number .* for the baseline"):
        Pruner(small(0), SCHEDULE, hooks=[stop])
    model, _, pruner = make_run(0)
    with pytest.raises(TypeError, match="expected a prunekit Pruner"):
        StopWhen(kept_fraction, 0.1).attach(model)
    s = StopWhen(kept_fraction, 0.1).attach(pruner)
    with pytest.raises(ValueError, match="hooked into that Pruner already"):
        s.attach(pruner)
    with pytest.raises(ValueError, match="not a prunekit StopWhen state"):
        StopWhen(kept_fraction, 0.1).load_state_dict({})
    state = StopWhen(kept_fraction, 0.1).state_dict()
    with pytest.raises(ValueError, match="saved max_drop 0.1 differs"):
        StopWhen(kept_fraction, 0.2).load_state_dict(state)
    with pytest.raises(ValueError, match="malformed state"):
        StopWhen(kept_fraction, 0.1).load_state_dict({**state, "history": [[1, 2]]})
    used = StopWhen(kept_fraction, 0.1)
    make_run(0, [used])
    with pytest.raises(ValueError, match="load into a fresh one"):
        used.load_state_dict(state)


def test_pruner_hold_and_hooks_are_general():
    calls = []

    class Spy:
        def before_update(self, pruner):
            calls.append(("before", pruner.current_step, zero_fraction(pruner.model)))

        def after_update(self, pruner):
            calls.append(("after", pruner.current_step, zero_fraction(pruner.model)))
    model = small(0)
    pruner = Pruner(model, PolynomialDecay(0.2, 0.8, 0, 20, frequency=10), hooks=[Spy()])
    for _ in range(15):
        pruner.step()
    pruner.update_masks(0.9)  # not a scheduled update: no hook call
    pruner.update_masks(0.725)
    assert [(a, b) for a, b, _ in calls] == [("before", 0), ("after", 0), ("before", 10), ("after", 10)]
    assert calls[0][2] == 0.0 and calls[1][2] == pytest.approx(0.2, abs=1e-3) == calls[2][2]
    pruner.hold()
    for _ in range(10):  # step 20 would update to 0.8
        pruner.step()
    assert len(calls) == 4 and zero_fraction(model) == pytest.approx(0.9, abs=1e-3)
    pruner.update_masks()  # keeps the held sparsity
    assert zero_fraction(model) == pytest.approx(0.9, abs=1e-3)
    # negative control: without hold, step 20 recomputes (to 0.8 on the schedule)
    other = Pruner(small(0), PolynomialDecay(0.2, 0.8, 0, 20, frequency=10), hooks=[Spy()])
    for _ in range(20):
        other.step()
    assert len(calls) == 10 and zero_fraction(other.model) == pytest.approx(0.8, abs=1e-3)


def test_public_exports():
    for name in ("StopWhen", "prune_to_budget", "BudgetResult"):
        assert name in prunekit.__all__ and getattr(prunekit, name) is not None
