"""Criteria: Magnitude, Random, and the interface admitting a criterion defined by the user."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_helpers import reference_keep
from torch import nn

from prunekit import ConstantSparsity, Criterion, Magnitude, Pruner, Random, ScoreContext

pytestmark = pytest.mark.usefixtures("single_thread")


def _ctx(name="fc.weight", step=0):
    return ScoreContext(name, nn.Identity(), step)


class NegMagnitude(Criterion):
    """Defined in the test: keep the *smallest* weights (prune the largest)."""

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def score(self, param, context):
        self.seen.append((context.name, context.step))
        return -param.abs()


# --------------------------------------------------------------------------------------
# Magnitude / Random
# --------------------------------------------------------------------------------------


def test_magnitude_is_abs_detached_and_leaves_param_alone():
    p = nn.Parameter(torch.tensor([[-3.0, 1.0], [0.0, -0.5]]))
    before = p.detach().clone()
    s = Magnitude().score(p, _ctx())
    assert torch.equal(s, torch.tensor([[3.0, 1.0], [0.0, 0.5]]))
    assert not s.requires_grad and s.shape == p.shape
    assert torch.equal(p.detach(), before)
    assert not torch.signbit(Magnitude().score(torch.tensor([-0.0]), _ctx())).any()


def test_random_is_a_pure_function_of_seed_name_step():
    x = torch.zeros(50)
    a = Random(3).score(x, _ctx("a.weight", 5))
    assert torch.equal(a, Random(3).score(torch.ones(50), _ctx("a.weight", 5)))  # values of param do not matter
    assert not torch.equal(a, Random(4).score(x, _ctx("a.weight", 5)))
    assert not torch.equal(a, Random(3).score(x, _ctx("b.weight", 5)))
    assert not torch.equal(a, Random(3).score(x, _ctx("a.weight", 6)))
    assert a.shape == x.shape and a.is_floating_point()
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    # does not touch the global RNG
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    Random(1).score(torch.zeros(4, 4), _ctx())
    assert torch.equal(torch.rand(3), expected)


def test_random_seeds_differ_in_high_bits():
    x = torch.zeros(20)
    assert not torch.equal(Random(1).score(x, _ctx()), Random(1 + 2**32).score(x, _ctx()))


@pytest.mark.parametrize("seed,exc,match", [
    (-1, ValueError, "Random: seed must be >= 0"),
    (True, TypeError, "Random: seed must be an integer"),
    (1.0, TypeError, "Random: seed must be an integer"),
    ("1", TypeError, "Random: seed must be an integer"),
    (None, TypeError, "Random: seed must be an integer"),
])
def test_random_rejects_bad_seed(seed, exc, match):
    with pytest.raises(exc, match=match):
        Random(seed)


def test_reprs():
    assert repr(Magnitude()) == "Magnitude()" and repr(Random(7)) == "Random(seed=7)"


def test_base_criterion_is_abstract():
    with pytest.raises(NotImplementedError):
        Criterion().score(torch.ones(2), _ctx())


def test_pruner_with_random_criterion_is_reproducible_and_exact():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 3))
        pruner = Pruner(model, 0.6, criterion=Random(5))
        return pruner.masks
    m1, m2 = run(), run()
    for name in m1:
        assert torch.equal(m1[name], m2[name])
        assert int((~m1[name]).sum()) == round(m1[name].numel() * 0.6)
    # not magnitude: the random mask differs from the magnitude mask
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 3))
    mag = Pruner(model, 0.6).masks
    assert not torch.equal(mag["0.weight"], m1["0.weight"])


# --------------------------------------------------------------------------------------
# A user-defined criterion drives the Pruner (layer-wise and global)
# --------------------------------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 2))
    with torch.no_grad():
        model[2].weight.mul_(4.0)  # different scales so that global differs from layer-wise
    return model


@pytest.mark.parametrize("ranking", ["layerwise", "global"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_custom_criterion_drives_the_pruner(ranking, sparsity):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    crit = NegMagnitude()
    pruner = Pruner(model, sparsity, criterion=crit, ranking=ranking)
    names = ["0.weight", "2.weight", "4.weight"]
    assert pruner.names == names
    assert sorted(crit.seen) == sorted((n, 0) for n in names)
    scores = [-before[n].abs() for n in names]
    if ranking == "layerwise":
        refs = [reference_keep([s], sparsity)[0] for s in scores]
    else:
        refs = reference_keep(scores, sparsity)
    for name, ref in zip(names, refs):
        assert np.array_equal(pruner.masks[name].numpy(), ref), name
        w = dict(model.named_parameters())[name].detach()
        assert torch.equal(w[~pruner.masks[name]], torch.zeros(int((~pruner.masks[name]).sum())))
        assert torch.equal(w[pruner.masks[name]], before[name][pruner.masks[name]])
    # the largest weight of each layer is gone (it is the least salient under this criterion)
    for name in names:
        flat_max = before[name].abs().reshape(-1).argmax()
        if ranking == "layerwise":
            assert not pruner.masks[name].reshape(-1)[flat_max]


def test_custom_criterion_repeated_updates_keep_the_mask():
    # After pruning, the pruned weights are 0 -> the *highest* NegMagnitude score. Without
    # the prior (dead units first), a second update at the same target would revive them.
    model = _model(1)
    pruner = Pruner(model, ConstantSparsity(0.5, 0, -1, 1), criterion=NegMagnitude())
    first = pruner.masks
    for _ in range(3):
        pruner.step()
        for name, m in pruner.masks.items():
            assert torch.equal(m, first[name])


def test_criterion_sees_context_step():
    model = _model()
    crit = NegMagnitude()
    pruner = Pruner(model, ConstantSparsity(0.2, begin_step=2, end_step=6, frequency=2), criterion=crit)
    for _ in range(8):
        pruner.step()
    assert sorted({s for _, s in crit.seen}) == [2, 4, 6]


class _Bad(Criterion):
    def __init__(self, fn):
        self.fn = fn

    def score(self, param, context):
        return self.fn(param)


@pytest.mark.parametrize("fn,match", [
    (lambda p: p.abs().reshape(-1), r"must return floating scores of shape \(12, 8\) for '0.weight'"),
    (lambda p: p.abs()[:, :4], r"must return floating scores of shape .* for '0.weight'"),
    (lambda p: (p.abs() * 100).long(), r"must return floating scores .* for '0.weight'"),
    (lambda p: p.abs().numpy(), r"must return floating scores .* for '0.weight'"),
    (lambda p: None, r"must return floating scores .* for '0.weight'"),
    (lambda p: p.abs() / 0.0, r"returned NaN or Inf scores for parameter '0.weight'"),
    (lambda p: torch.full_like(p, float("nan")), r"returned NaN or Inf scores for parameter '0.weight'"),
])
def test_bad_scores_are_reported_with_the_parameter_name(fn, match):
    with pytest.raises(ValueError, match=match):
        Pruner(_model(), 0.5, criterion=_Bad(fn))
