"""Structural pruning to a cost budget (MACs, latency, any cost) combined with a metric tolerance.

MACs are checked against counts by hand from the pruned layers' sizes (and from the
unit counts ``prune_channels`` keeps at a ratio); latency goes through :class:`Latency`
with an injected clock (nothing here is timed); the search logic runs on fake costs
and metrics whose thresholds are known.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit import prune_channels
from prunekit.methods.budget import Latency, StopAtBudget, prune_channels_to_budget

SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models: one intra-op thread (the machine is shared)."""


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 6 * 6, 24), nn.ReLU(), nn.Linear(24, 10))


def cnn_macs_by_hand(net: nn.Module, batch: int = 2) -> int:
    """6×6 images, 3×3 kernels with padding 1: every conv output pixel costs in·9."""
    c1, c2, h = net[0].out_channels, net[3].out_channels, net[7].out_features
    assert net[3].in_channels == c1 and net[7].in_features == c2 * 36 and net[9].in_features == h
    return batch * (36 * c1 * 3 * 9 + 36 * c2 * c1 * 9 + h * c2 * 36 + 10 * h)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def mlp_macs_at(ratio: float) -> int:
    """MACs of ``mlp`` for one sample once ``round(n·ratio)`` of each hidden layer's n units are gone."""
    k1, k2 = max(1, 64 - round(64 * ratio)), max(1, 32 - round(32 * ratio))
    return 16 * k1 + k1 * k2 + k2 * 4


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.shape == b[key].shape and torch.equal(value, b[key]), key


# -- MACs against hand counts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_cnn_macs_match_a_hand_count(seed):
    net, x = cnn(seed), torch.randn(2, 3, 6, 6)
    dense = cnn_macs_by_hand(net)
    r = prune_channels_to_budget(net, x, dense * 0.4, progress=False)
    assert r.dense_cost == dense and r.cost == cnn_macs_by_hand(net)  # counted in the really pruned network
    assert r.binding == "budget" and r.within_budget and r.cost <= 0.4 * dense
    assert net[0].out_channels < 12 and net[7].out_features < 24
    assert r.report.macs_after == r.cost and r.report.macs_before == dense


@pytest.mark.parametrize("seed", SEEDS)
def test_mlp_trials_cost_what_the_kept_units_cost(seed):
    net, x = mlp(seed), torch.randn(1, 16)
    budget = 0.5 * mlp_macs_at(0.0)
    r = prune_channels_to_budget(net, x, budget, tol=0.01, progress=False)
    assert r.trials and all(t.cost == mlp_macs_at(t.ratio) and t.within_budget == (t.cost <= budget)
                            and t.metric is None for t in r.trials)
    assert r.cost == mlp_macs_at(r.ratio) <= budget
    over = [t.ratio for t in r.trials if not t.within_budget]
    assert over and r.ratio - max(over) <= 0.01  # the lowest ratio within the budget, to the bisection's width
    assert mlp_macs_at(r.ratio - 0.011) > budget or r.ratio <= 0.011


# -- the search's logic on fake costs and metrics ---------------------------------------------------------------------


def kept_fraction(model: nn.Module) -> float:
    """A fake metric that falls as units go: the fraction of the first hidden layer kept."""
    return model[0].out_features / 64


@pytest.mark.parametrize("seed", SEEDS)
def test_the_metric_binds_first_and_the_result_stays_within(seed):
    net, x = mlp(seed), torch.randn(1, 16)
    original = state_of(net)
    seen = []

    def evaluate(m):
        seen.append(m is net)
        if m is not net:  # every trial runs on a copy: the model is untouched until the end
            assert_same(state_of(net), original)
        return kept_fraction(m)

    budget = mlp_macs_at(0.8)  # needs ~80% of the units gone; the metric allows at most 30%
    r = prune_channels_to_budget(net, x, budget, evaluate=evaluate, max_drop=0.3, tol=0.01, progress=False)
    assert r.binding == "accuracy" and not r.within_budget and r.cost > budget
    assert seen[-1] and not any(seen[:-1])  # only the final measure sees the model itself
    assert r.dense == 1.0 and 1.0 - r.metric <= 0.3 + 1e-12 and r.metric == kept_fraction(net)
    evaluated = [t for t in r.trials if t.metric is not None]
    for t in evaluated:  # flags re-derived from the recorded metric
        assert t.ok == (1.0 - t.metric <= 0.3 + 1e-12)
    assert not evaluated[0].ok and evaluated[0].ratio == pytest.approx(max(t.ratio for t in evaluated))
    good = [t.ratio for t in evaluated if t.ok]
    assert r.ratio == max(good) and min(t.ratio for t in evaluated if not t.ok) - r.ratio <= 0.01
    expected = copy.deepcopy(mlp(seed))
    prune_channels(expected, x, r.ratio)
    assert_same(state_of(net), state_of(expected))  # exactly prune_channels at the ratio found


@pytest.mark.parametrize("seed", SEEDS)
def test_the_budget_binds_when_the_metric_allows(seed):
    net, x = mlp(seed), torch.randn(1, 16)
    budget = mlp_macs_at(0.25)
    r = prune_channels_to_budget(net, x, budget, evaluate=kept_fraction, max_drop=0.5, tol=0.01, progress=False)
    assert r.binding == "budget" and r.within_budget and r.cost <= budget
    evaluated = [t for t in r.trials if t.metric is not None]
    assert len(evaluated) == 1 and evaluated[0].ok and evaluated[0].ratio == r.ratio  # no metric search needed
    assert r.evaluations == 3  # dense, the budget's ratio, the returned model


def test_within_budget_already_leaves_the_model_dense():
    net, x = mlp(0), torch.randn(1, 16)
    before = state_of(net)
    r = prune_channels_to_budget(net, x, mlp_macs_at(0.0), evaluate=kept_fraction, max_drop=0.0, progress=False)
    assert r.binding == "dense" and r.ratio == 0 and r.report is None and r.trials == []
    assert_same(state_of(net), before)


def test_a_fake_latency_through_latency():
    """Latency's median on an injected clock that each forward advances by the model's parameter count."""
    clock = [0.0]

    def tick(module, args, output):
        clock[0] += sum(p.numel() for p in module.parameters()) * 1e-9

    net, x = mlp(1), torch.randn(1, 16)
    net.register_forward_hook(tick)  # copied with every trial's copy of the model
    cost = Latency(x, runs=5, warmup=2, timer=lambda: clock[0])
    dense = cost(net)
    assert dense == pytest.approx(sum(p.numel() for p in net.parameters()) * 1e-9)
    r = prune_channels_to_budget(net, x, dense / 3, cost=cost, progress=False)
    params = sum(p.numel() for p in net.parameters())
    assert r.cost_name == "latency" and r.within_budget and r.cost <= dense / 3
    assert r.cost == pytest.approx(params * 1e-9)


def test_latency_takes_the_median_of_its_runs():
    readings = iter([0.0, 1.0, 1.0, 1.5, 1.5, 101.5, 200.0, 202.0])  # runs of 1, 0.5, 100, 2 s
    cost = Latency(torch.randn(1, 4), runs=4, warmup=1, timer=lambda: next(readings))
    assert cost(nn.Linear(4, 2)) == 1.5  # median of (1, 0.5, 100, 2)


def test_bad_arguments_are_refused():
    net, x = mlp(0), torch.randn(1, 16)
    before = state_of(net)
    with pytest.raises(ValueError, match="even at ratio hi=0.5 the cost"):
        prune_channels_to_budget(net, x, 10, hi=0.5, progress=False)
    with pytest.raises(ValueError, match="evaluate= and max_drop= go together"):
        prune_channels_to_budget(net, x, 100, evaluate=kept_fraction, progress=False)
    with pytest.raises(ValueError, match="cost must be 'macs', 'latency'"):
        prune_channels_to_budget(net, x, 100, cost="flops", progress=False)
    with pytest.raises(ValueError, match="need budget > 0"):
        prune_channels_to_budget(net, x, 0, progress=False)
    assert_same(state_of(net), before)


def test_a_metric_that_changes_on_reevaluation_is_reported():
    calls = [0]

    def flaky(m):
        calls[0] += 1
        return 1.0 if calls[0] < 3 else 0.0  # dense, the trial: fine; the returned model: not

    net = mlp(0)
    with pytest.raises(RuntimeError, match="evaluate is not reproducible"):
        prune_channels_to_budget(net, torch.randn(1, 16), mlp_macs_at(0.5), evaluate=flaky, max_drop=0.1,
                                 progress=False)


def test_public_export():
    import prunekit

    assert prunekit.prune_channels_to_budget is prune_channels_to_budget and "prune_channels_to_budget" in prunekit.__all__


# -- gradual: StopAtBudget on a StructuredPruner --------------------------------------------------------------------


def gradual_run(seed: int, stop: StopAtBudget | None, steps: int = 30, hold_after: int | None = None):
    """SGD with momentum on fixed random batches; the schedule removes up to 90% of the units by step 20."""
    from prunekit import PolynomialDecay, StructuredPruner

    net = mlp(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    batches = [torch.randn(8, 16, generator=gen) for _ in range(steps)]
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    schedule = PolynomialDecay(0.0, 0.9, begin_step=0, end_step=20, frequency=2, power=1)
    pruner = StructuredPruner(net, torch.randn(1, 16), schedule, optimizer=opt, hooks=[] if stop is None else [stop])
    keeps_at_stop = None
    for i, x in enumerate(batches, start=1):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        if hold_after is not None and i == hold_after:
            pruner.hold()
        if stop is not None and stop.stopped and keeps_at_stop is None:
            keeps_at_stop = {k: v.clone() for k, v in pruner.keeps.items()}
    return net, opt, pruner, keeps_at_stop


def rows_kept(model: nn.Module) -> float:
    """A fake metric of the masked model: the fraction of the first layer's rows not zeroed."""
    return float((model[0].weight != 0).any(1).float().mean())


@pytest.mark.parametrize("seed", SEEDS)
def test_gradual_stops_at_the_first_update_within_the_budget(seed):
    budget = mlp_macs_at(0.5)
    stop = StopAtBudget(budget)
    net, _, pruner, keeps_at_stop = gradual_run(seed, stop)
    assert stop.binding == "budget" and pruner.held
    costs = [c.cost for c in stop.history]
    assert costs[-1] <= budget and all(c > budget for c in costs[:-1])  # nothing checked after reaching it
    assert costs == sorted(costs, reverse=True) and stop.step == stop.history[-1].step
    for name, keep in pruner.keeps.items():  # held: no unit moved after the stop
        assert torch.equal(keep, keeps_at_stop[name]), name
    small, report = pruner.finalize()
    k1, k2 = small[0].out_features, small[2].out_features
    assert 16 * k1 + k1 * k2 + 4 * k2 == costs[-1] == report.macs_after <= budget  # the hand count


@pytest.mark.parametrize("seed", SEEDS)
def test_gradual_rolls_back_the_first_update_outside_the_tolerance(seed):
    stop = StopAtBudget(mlp_macs_at(0.85), evaluate=rows_kept, max_drop=0.2)
    net, opt, pruner, _ = gradual_run(seed, stop)
    assert stop.binding == "accuracy" and stop.baseline == 1.0
    assert [c.ok for c in stop.history] == [True] * (len(stop.history) - 1) + [False]
    assert all(c.cost > stop.budget for c in stop.history)
    assert 1.0 - rows_kept(net) <= 0.2  # the held masks are the last good ones
    # the same run with pruning stopped by hand after the last good update
    ref_net, ref_opt, ref_pruner, _ = gradual_run(seed, None, hold_after=stop.step - 1)
    assert_same(state_of(net), state_of(ref_net))
    for name, keep in pruner.keeps.items():
        assert torch.equal(keep, ref_pruner.keeps[name]), name
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])
    kept_net = gradual_run(seed, None, hold_after=stop.step)[0]  # negative control: the violating update kept
    assert any(not torch.equal(a, b) for a, b in zip(state_of(net).values(), state_of(kept_net).values()))


def test_gradual_without_a_stop_is_a_negative_control():
    """Without the hook the schedule goes on to 90%: the stop is what held the runs above."""
    net, _, pruner, _ = gradual_run(0, None)
    assert not pruner.held and 1.0 - rows_kept(net) == pytest.approx(round(64 * 0.9) / 64)


def test_held_travels_in_the_state_dict():
    from prunekit import StructuredPruner

    pruner = StructuredPruner(mlp(0), torch.randn(1, 16), 0.25)
    pruner.hold()
    fresh = StructuredPruner(mlp(0), torch.randn(1, 16), 0.25)
    fresh.load_state_dict(pruner.state_dict())
    assert fresh.held and not StructuredPruner(mlp(0), torch.randn(1, 16), 0.25).held
