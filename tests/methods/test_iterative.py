"""iterative_prune: OBD's train -> score -> prune -> retrain loop around a user's training function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit import OBD, Magnitude, Random, iterative_prune, round_sparsities


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def make_data(seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


class Trainer:
    """A user's training function: SGD with momentum and weight decay (both would revive pruned weights)."""

    def __init__(self, X, y, *, steps: int = 5) -> None:
        self.X, self.y, self.steps = X, y, steps
        self.calls: list[bool] = []  # whether a pruner was passed
        self.snapshots: list[dict[str, torch.Tensor]] = []  # weights after each call

    def __call__(self, model: nn.Module, pruner) -> None:
        self.calls.append(pruner is not None)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        if pruner is not None:
            pruner.attach(opt)
        for _ in range(self.steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(self.X), self.y).backward()
            opt.step()
        self.snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})


def test_round_sparsities_prune_a_fraction_of_the_survivors():
    assert round_sparsities(0.5, 3) == [0.5, 0.75, 0.875]
    with pytest.raises(ValueError, match="fraction_per_round"):
        round_sparsities(1.0, 2)


@pytest.mark.parametrize("ranking", ["layerwise", "global"])
def test_sparsity_per_round_and_frozen_zeros(ranking):
    model = make_model()
    X, y = make_data()
    trainer = Trainer(X, y)
    masks_per_round = []

    def callback(m, pruner, index, phase):
        if phase == "pruned":
            masks_per_round.append(pruner.masks)
        return {"phase_seen": phase, "round_seen": index}

    records = iterative_prune(model, criterion=Magnitude(), train_fn=trainer, sparsities=[0.3, 0.6, 0.8],
                              ranking=ranking, callback=callback)
    assert trainer.calls == [False, True, True, True]  # dense training first, then one retraining per round
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["target_sparsity"] for r in records] == [0.3, 0.6, 0.8]
    total = 8 * 16 + 16 * 4
    for rec, target in zip(records, [0.3, 0.6, 0.8]):
        if ranking == "layerwise":  # each tensor reaches round(n * s) on its own
            expected = (round(128 * target) + round(64 * target)) / total
        else:
            expected = round(total * target) / total
        assert rec["sparsity"] == pytest.approx(expected)
        assert rec["moved"] == 0
        assert rec["pruned"] == {"phase_seen": "pruned", "round_seen": rec["round"]}
        assert rec["retrained"]["phase_seen"] == "retrained"
    for earlier, later in zip(masks_per_round, masks_per_round[1:]):  # masks only grow
        for name in earlier:
            assert bool((later[name] <= earlier[name]).all())
    # After each retraining, every pruned weight is still exactly zero, and the survivors did train.
    for snapshot, masks, before in zip(trainer.snapshots[1:], masks_per_round, trainer.snapshots):
        for name, keep in masks.items():
            assert bool((snapshot[name][~keep] == 0).all())
            assert not torch.equal(snapshot[name][keep], before[name][keep])


def test_fraction_per_round_and_a_plain_model_at_the_end():
    model = make_model(1)
    X, y = make_data(1)
    records = iterative_prune(model, criterion=Random(3), train_fn=Trainer(X, y), rounds=2, fraction_per_round=0.5,
                              train_first=False)
    assert [r["target_sparsity"] for r in records] == [0.5, 0.75]
    zeros = {n: p.detach() == 0 for n, p in model.named_parameters() if n.endswith("weight")}
    assert sum(int(z.sum()) for z in zeros.values()) == round(128 * 0.75) + round(64 * 0.75)
    # The pruner is gone: training now moves the formerly pruned weights (no hooks left behind).
    Trainer(X, y, steps=1)(model, None)
    assert any(bool((p.detach()[zeros[n]] != 0).any()) for n, p in model.named_parameters() if n in zeros)


def test_a_train_fn_that_forgets_to_attach_is_caught_and_repaired():
    model = make_model(2)
    X, y = make_data(2)
    # One optimizer for the whole run, never attached: its momentum from dense training revives
    # pruned weights (the Pruner's gradient hooks alone cannot stop that).
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_fn(m, pruner):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(m(X), y).backward()
            opt.step()

    with pytest.warns(UserWarning, match="pruner.attach"):
        records = iterative_prune(model, criterion=Magnitude(), train_fn=train_fn, sparsities=[0.5])
    assert records[0]["moved"] > 0
    assert records[0]["sparsity"] == pytest.approx(0.5)
    zeros = sum(int((p.detach() == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
    assert zeros == 64 + 32


def test_obd_is_bound_and_rescored_every_round():
    model = make_model(3)
    X, y = make_data(3)
    obd = OBD([(X, y)], nn.functional.cross_entropy, estimator="gauss-newton")
    iterative_prune(model, criterion=obd, train_fn=Trainer(X, y), sparsities=[0.2, 0.4, 0.6], ranking="global")
    assert obd.model is model
    assert obd.estimates == 3  # the weights changed between rounds, never within one


def test_optimizers_attached_during_a_round_are_released():
    model = make_model(4)
    X, y = make_data(4)
    seen = []

    def callback(m, pruner, index, phase):
        if phase == "retrained":
            seen.append(len(pruner._optimizers))

    iterative_prune(model, criterion=Magnitude(), train_fn=Trainer(X, y), sparsities=[0.2, 0.4], callback=callback)
    assert seen == [0, 0]


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "sparsities"),
    ({"sparsities": [0.5, 0.3]}, ValueError, "must not decrease"),
    ({"sparsities": [0.5], "fraction_per_round": 0.2}, ValueError, "not both"),
    ({"sparsities": [1.0]}, ValueError, r"\[0, 1\)"),
    ({"sparsities": [0.2, 0.4], "rounds": 3}, ValueError, "rounds=3"),
    ({"rounds": 2}, ValueError, "fraction_per_round"),
    ({"sparsities": "0.5"}, TypeError, "list"),
])
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        iterative_prune(make_model(), criterion=Magnitude(), train_fn=lambda m, p: None, **kwargs)


def test_train_fn_must_be_callable():
    with pytest.raises(TypeError, match="train_fn"):
        iterative_prune(make_model(), criterion=Magnitude(), train_fn=None, sparsities=[0.5])
