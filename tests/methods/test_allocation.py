"""Per-layer sparsity allocation: rules against hand computations and direct references, exact overall counts.

References are independent of the code under test: ERK by hand and by a literal port
of the RigL loop, LAMP scores by an O(n²) double loop, OWL outlier ratios from inputs
captured by hand (F.unfold for convolutions), equal loss on linear curves with a
closed-form answer. Every rule on every model: the Pruner (and prune_oneshot) prune
exactly round(N·S) weights with the allocation as overrides.
"""

from __future__ import annotations

import glob
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import Pruner
from prunekit.apps.models import LeNet5
from prunekit.core.scope import resolve_scope
from prunekit.methods.allocation import (
    ERK,
    OWL,
    RULES,
    AllocationRule,
    EqualLoss,
    Problem,
    Uniform,
    allocate,
    exact_counts,
    lamp_scores,
)
from prunekit.methods.oneshot import prune_oneshot

pytestmark = pytest.mark.usefixtures("single_thread")

SEEDS = (0, 1, 2)


# -- models ---------------------------------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 5))


def _gpt2() -> nn.Module:
    tf = pytest.importorskip("transformers")
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                            bos_token_id=0, eos_token_id=0))


# name -> (builder, layers selector for allocate/Pruner, calibration builder)
MODELS = {
    "mlp": (_mlp, None, lambda: [torch.randn(16, 20) for _ in range(2)]),
    "lenet5": (LeNet5, None, lambda: [torch.randn(4, 1, 28, 28)]),
    "gpt2": (_gpt2, ["transformer.h"], lambda: [{"input_ids": torch.randint(0, 100, (2, 12))}]),
}


def _table(model: nn.Module, layers, seed: int) -> dict[str, list[tuple[float, float]]]:
    """Synthetic sensitivity curves, metric = 1 − a·s², one per parameter in scope."""
    rng = random.Random(seed)
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99]
    out = {}
    for t in resolve_scope(model, layers).targets:
        a = rng.uniform(0.2, 3.0)
        out[t.name] = [(s, 1.0 - a * s * s) for s in grid]
    return out


def _rule(name: str, model: nn.Module, layers, calibration, seed: int):
    if name == "owl":
        return OWL(calibration(), m=3.0)
    if name == "equal-loss":
        return EqualLoss(_table(model, layers, seed), dense=1.0)
    return RULES[name]()


def _pruned(pruner: Pruner) -> int:
    return sum(int((~m).sum()) for m in pruner.masks.values())


# -- exact rounding -------------------------------------------------------------------------------------------------


def test_exact_counts_hand_example_and_naive_rounding_fails():
    # round(30 · 0.25) = round(7.5) = 8, but rounding each layer gives 3 × round(2.5) = 3 × 2 = 6.
    assert sum(prune_count_naive(10, 0.25) for _ in range(3)) == 6  # negative control
    assert exact_counts([10, 10, 10], [0.25] * 3, total=8) == [3, 3, 2]
    assert exact_counts([4, 6], [0.5, 0.5]) == [2, 3]


def prune_count_naive(n: int, s: float) -> int:
    return round(n * s)


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_counts_random(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        numels = (torch.randint(1, 500, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)).tolist()
        s = torch.rand(len(numels), generator=g, dtype=torch.float64).mul(0.99).tolist()
        x = [n * v for n, v in zip(numels, s)]
        total = round(sum(min(v, n - 1) for v, n in zip(x, numels)))
        counts = exact_counts(numels, s, total)
        assert sum(counts) == total
        assert all(0 <= k <= n - 1 for k, n in zip(counts, numels))
        assert all(abs(k - min(v, n - 1)) < 1 + 1e-9 for k, v, n in zip(counts, x, numels))
        # k/n prunes exactly k weights under the Pruner's / prune_oneshot's round(n·s).
        assert all(round(n * (k / n)) == k for k, n in zip(counts, numels))


def test_exact_counts_errors():
    with pytest.raises(ValueError, match="cannot prune 10 weights"):
        exact_counts([5, 5], [0.9, 0.9], total=10)  # each layer keeps one: at most 8
    with pytest.raises(ValueError, match="2 numels but 1 sparsities"):
        exact_counts([5, 5], [0.5])


# -- uniform --------------------------------------------------------------------------------------------------------


def test_uniform_and_fixed():
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 3))
    alloc = allocate(net, 0.5)
    assert dict(alloc) == {"0.weight": 0.5, "1.weight": 0.5, "2.weight": 0.5}
    alloc = allocate(net, 0.5, "uniform", fixed={"2.weight": 0.0})
    assert alloc.counts == (58, 57, 0) and alloc.pruned == 115 == round(230 * 0.5)
    alloc = allocate(net, 0.4, Uniform(), mean="layer", fixed={"2.weight": 0.1})
    assert alloc.raw == pytest.approx((0.55, 0.55, 0.1))


# -- ERK ------------------------------------------------------------------------------------------------------------


def _three_layer() -> nn.Module:
    return nn.ModuleDict({"conv": nn.Conv2d(1, 4, 3), "fc1": nn.Linear(100, 50), "fc2": nn.Linear(50, 10)})


def test_erk_hand_computation_with_dense_fix():
    net = _three_layer()
    # Ratios (Σ dims)/(Π dims): conv (4+1+3+3)/36, fc1 (100+50)/5000, fc2 (50+10)/500; N = 5536.
    r = {"conv.weight": 11 / 36, "fc1.weight": 150 / 5000, "fc2.weight": 60 / 500}
    # S = 0.5: keep 2768. ε = 2768/221 = 12.52 → conv density 3.83 > 1: dense. ε = (2768-36)/210 = 13.01
    # → fc2 density 1.56 > 1: dense. ε = (2768-36-500)/150 = 14.88 → fc1 density 0.4464.
    naive_eps = 2768 / (11 + 150 + 60)
    assert naive_eps * r["conv.weight"] > 1  # without the fix the conv would need a density above 1
    alloc = allocate(net, 0.5, "erk")
    assert alloc.info["dense"] == ["conv.weight", "fc2.weight"]
    assert alloc.info["epsilon"] == pytest.approx(2232 / 150, rel=1e-12)
    assert alloc.raw == pytest.approx((0.0, 1 - 2232 / 5000, 0.0), abs=1e-12)
    assert alloc.counts == (0, 2768, 0)
    # S = 0.95: keep 276.8, ε = 276.8/221, no layer dense.
    alloc = allocate(net, 0.95, "erk")
    eps = 276.8 / 221
    assert alloc.info["dense"] == [] and alloc.info["epsilon"] == pytest.approx(eps, rel=1e-12)
    assert alloc.raw == pytest.approx(tuple(1 - eps * r[n] for n in alloc.names), abs=1e-12)
    assert alloc.pruned == round(5536 * 0.95)


def _rigl_erk(shapes: list[tuple[int, ...]], sparsity: float) -> list[float]:
    """A literal port of RigL's sparse_utils.get_sparsities_erdos_renyi (erk_power_scale = 1)."""
    dense_layers: set[int] = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for i, shape in enumerate(shapes):
            n = math.prod(shape)
            if i in dense_layers:
                rhs -= n * sparsity
            else:
                rhs += n * (1 - sparsity)
                raw[i] = sum(shape) / n
                divisor += raw[i] * n
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps > 1:
            dense_layers.update(i for i, p in raw.items() if p == top)
        else:
            return [0.0 if i in dense_layers else 1 - eps * raw[i] for i in range(len(shapes))]


@pytest.mark.parametrize("seed", SEEDS)
def test_erk_matches_rigl_loop(seed):
    rng = random.Random(seed)
    layers = {}
    for i in range(5):
        if rng.random() < 0.5:
            layers[f"c{i}"] = nn.Conv2d(rng.randint(1, 16), rng.randint(1, 16), rng.choice([1, 3, 5]))
        else:
            layers[f"l{i}"] = nn.Linear(rng.randint(2, 80), rng.randint(2, 80))
    net = nn.ModuleDict(layers)
    shapes = [tuple(t.param.shape) for t in resolve_scope(net).targets]
    for s in (0.3, 0.7, 0.9):
        alloc = allocate(net, s, "erk")
        assert alloc.raw == pytest.approx(tuple(_rigl_erk(shapes, s)), abs=1e-9)
        assert alloc.pruned == round(alloc.total * s)


# -- LAMP -----------------------------------------------------------------------------------------------------------


def _lamp_direct(w: torch.Tensor) -> torch.Tensor:
    """O(n²): sort by w² (stable), score_u = w_u² / Σ_{v at or after u} w_v²; 0/0 is 0."""
    flat = [float(v) ** 2 for v in w.reshape(-1).double()]
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    out = [0.0] * len(flat)
    for p, i in enumerate(order):
        tail = sum(flat[j] for j in order[p:])
        out[i] = flat[i] / tail if tail > 0 else 0.0
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


@pytest.mark.parametrize("seed", SEEDS)
def test_lamp_scores_against_direct(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 9, generator=g)
    w[0, :3] = 0.0  # zeros
    w[1, 1] = w[2, 2] = 0.5  # ties
    assert torch.allclose(lamp_scores(w), _lamp_direct(w), rtol=1e-12, atol=0)
    assert torch.equal(lamp_scores(torch.zeros(4)), torch.zeros(4, dtype=torch.float64))
    assert float(lamp_scores(w).max()) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("build", [_mlp, LeNet5], ids=["mlp", "lenet5"])
def test_lamp_masks_equal_global_lamp_ranking(seed, build):
    for s in (0.5, 0.9):
        torch.manual_seed(seed)
        model = build()
        targets = resolve_scope(model).targets
        mags = torch.cat([t.param.detach().abs().reshape(-1) for t in targets])
        alloc = allocate(model, s, "lamp")
        # Reference: one global ranking of the direct LAMP scores, the round(N·S) lowest pruned.
        scores = torch.cat([_lamp_direct(t.param.detach()).reshape(-1) if t.param.numel() <= 2000
                            else lamp_scores(t.param).reshape(-1) for t in targets])
        k = round(scores.numel() * s)
        pruned = torch.zeros(scores.numel(), dtype=torch.bool)
        pruned[torch.sort(scores, stable=True).indices[:k]] = True
        want = dict(zip((t.name for t in targets), pruned.split([t.param.numel() for t in targets])))
        pruner = Pruner.manual(model, overrides=dict(alloc))
        pruner.update_masks()
        for name, keep in pruner.masks.items():
            assert torch.equal(~keep.reshape(-1), want[name]), name
        # Negative control: a global magnitude ranking (on the dense weights) allocates differently.
        by_mag = torch.zeros(mags.numel(), dtype=torch.bool)
        by_mag[torch.sort(mags, stable=True).indices[:k]] = True
        assert not torch.equal(by_mag, pruned)
        pruner.remove()
        assert alloc.info["threshold"] < 1.0


# -- OWL ------------------------------------------------------------------------------------------------------------


def _ratio(A: torch.Tensor, m: float) -> float:
    return float((A > m * A.mean()).double().mean())


@pytest.mark.parametrize("seed", SEEDS)
def test_owl_outlier_ratios_against_direct(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    xs = [torch.randn(20, 12) for _ in range(3)]
    for x in xs:
        x[:, :2] *= 8.0  # two outlier features
    # Direct: capture inputs by hand, ‖X_j‖₂ over all tokens, A = |W|·‖X‖, D = mean(A > M·mean A).
    x0 = torch.cat(xs).double()
    x2 = torch.relu(net[0](torch.cat(xs))).double().detach()
    direct = {"0.weight": _ratio(net[0].weight.double().abs() * x0.norm(dim=0), 3.0),
              "2.weight": _ratio(net[2].weight.double().abs() * x2.norm(dim=0), 3.0)}
    assert direct["0.weight"] > 0 and direct["0.weight"] != direct["2.weight"]
    for calibration in (xs, lambda m: [m(x) for x in xs], {"0.weight": x0.norm(dim=0), "2.weight": x2.norm(dim=0)}):
        alloc = allocate(net, 0.5, OWL(calibration, m=3.0), mean="layer")
        assert alloc.info["outlier_ratios"] == pytest.approx(direct, abs=1e-12)


def test_owl_conv_ratios_against_unfold():
    torch.manual_seed(0)
    model = LeNet5()
    x = torch.randn(3, 1, 28, 28)
    x[:, :, 10:14, 10:14] *= 10
    with torch.no_grad():
        h = F.max_pool2d(torch.relu(model.conv1(x)), 2)
    cols1 = F.unfold(x, 5, padding=2).transpose(1, 2).reshape(-1, 25).double()
    cols2 = F.unfold(h, 5).transpose(1, 2).reshape(-1, 150).double()
    direct = {"conv1.weight": _ratio(model.conv1.weight.reshape(6, -1).double().abs() * cols1.norm(dim=0), 3.0),
              "conv2.weight": _ratio(model.conv2.weight.reshape(16, -1).double().abs() * cols2.norm(dim=0), 3.0)}
    alloc = allocate(model, 0.6, OWL([x], m=3.0), layers=["conv1", "conv2"])
    assert alloc.info["outlier_ratios"] == pytest.approx(direct, abs=1e-12)


def _owl_code(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """The authors' mapping (OWL repo, lib/prune_all.py): ratios → [0, 2λ], mean moved to 1 − S = density."""
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) * (1 / (hi - lo) * lam * 2) for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [1 - (v - mean + (1 - sparsity)) for v in scaled]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("depth", [2, 5])
def test_owl_targets_follow_the_published_mapping(seed, depth):
    torch.manual_seed(seed)
    net = nn.Sequential(*[nn.Linear(16, 16) for _ in range(depth)])
    g = torch.Generator().manual_seed(seed)
    norms = {f"{i}.weight": torch.rand(16, generator=g, dtype=torch.float64) ** (1 + 3 * i) for i in range(depth)}
    for lam in (0.02, 0.08):
        alloc = allocate(net, 0.6, OWL(norms, m=2.0, lam=lam), mean="layer")
        ratios = [alloc.info["outlier_ratios"][n] for n in alloc.names]
        assert len(set(ratios)) > 1
        raw = list(alloc.raw)
        assert sum(raw) / len(raw) == pytest.approx(0.6, abs=1e-12)  # unweighted mean = S
        assert all(0.6 - lam - 1e-12 <= s <= 0.6 + lam + 1e-12 for s in raw)
        # More outliers, lower sparsity.
        order = sorted(range(depth), key=lambda i: ratios[i])
        assert all(raw[a] >= raw[b] - 1e-12 for a, b in itertools.pairwise(order))
        code = _owl_code(ratios, 0.6, lam)
        # Two layers: the code's targets are S ± λ exactly; five skewed ratios: the code leaves the range.
        assert all(abs(c - 0.6) <= lam + 1e-12 for c in code) == (depth == 2)
        if depth == 2:  # the code's targets are in the paper's range: identical
            assert raw == pytest.approx(code, abs=1e-12)
            assert max(raw) - min(raw) == pytest.approx(2 * lam, abs=1e-12)
        else:  # narrowed to fit [S − λ, S + λ]: the code's deviations from S, scaled down by one factor
            assert max(abs(s - 0.6) for s in raw) == pytest.approx(lam, abs=1e-12)
            alpha = alloc.info["lam_used"] / lam
            assert 0 < alpha < 1
            assert [s - 0.6 for s in raw] == pytest.approx([alpha * (c - 0.6) for c in code], abs=1e-12)
        weighted = allocate(net, 0.6, OWL(norms, m=2.0, lam=lam))  # same sizes: the same targets
        assert weighted.raw == pytest.approx(raw, abs=1e-12) and weighted.pruned == round(weighted.total * 0.6)


def test_owl_weighted_vs_layer_mean_differ_on_unequal_sizes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    xs = [torch.randn(32, 64)]
    xs[0][:, :3] *= 10
    layer = allocate(net, 0.5, OWL(xs, m=3.0), mean="layer")
    weighted = allocate(net, 0.5, OWL(xs, m=3.0))
    assert sum(layer.raw) / 2 == pytest.approx(0.5)
    assert weighted.pruned == round(weighted.total * 0.5) != layer.pruned
    assert layer.info["outlier_ratios"] == weighted.info["outlier_ratios"]


def test_owl_block_groups_on_gpt2():
    model = _gpt2()
    calib = [{"input_ids": torch.randint(0, 100, (2, 12))}]
    alloc = allocate(model, 0.5, OWL(calib, m=3.0, groups="block"), layers=["transformer.h"], mean="layer")
    groups = alloc.info["groups"]
    assert list(groups) == ["transformer.h.0", "transformer.h.1"]
    assert all(len(v) == 4 for v in groups.values())
    per_param = allocate(model, 0.5, OWL(calib, m=3.0), layers=["transformer.h"], mean="layer")
    assert len(per_param.info["outlier_ratios"]) == 8
    for names in groups.values():
        assert len({alloc.raw[alloc.names.index(n)] for n in names}) == 1  # one target per block


# -- equal loss -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_equal_loss_linear_curves_known_answer(seed):
    rng = random.Random(seed)
    net = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20), nn.Linear(20, 10))
    names = [t.name for t in resolve_scope(net).targets]
    numels = [1200, 600, 200]
    slopes = [rng.uniform(0.5, 2.0) for _ in names]
    grid = [0.0, 0.2, 0.4, 0.6, 0.8, 0.95]
    S = 0.3
    # Weighted: n_u·δ/a_u summed = K, δ = K / Σ n_u/a_u; loss-type metric (lower is better) the same.
    K = round(2000 * S)
    delta = K / sum(n / a for n, a in zip(numels, slopes))
    for dense, sign, hib in ((0.9, -1, True), (2.5, 1, False)):
        table = {n: [(s, dense + sign * a * s) for s in grid] for n, a in zip(names, slopes)}
        alloc = allocate(net, S, EqualLoss(table, dense=dense, higher_is_better=hib))
        assert max(delta / a for a in slopes) < 0.95  # inside every grid
        assert alloc.raw == pytest.approx([delta / a for a in slopes], abs=1e-9)
        assert alloc.info["level"] == pytest.approx(delta, abs=1e-9)
        assert alloc.pruned == K
    # Layer mean: Σ δ/a_u = 3·S.
    table = {n: [(s, 1.0 - a * s) for s in grid] for n, a in zip(names, slopes)}
    alloc = allocate(net, S, EqualLoss(table, dense=1.0), mean="layer")
    delta = 3 * S / sum(1 / a for a in slopes)
    assert alloc.raw == pytest.approx([delta / a for a in slopes], abs=1e-9)


def test_equal_loss_noisy_curve_uses_running_max_and_caps():
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    # Row 0 improves at 0.5 (noise): its loss stays at the 0.25 value; row 1 is flat until its grid ends at 0.6.
    table = {"0.weight": [(0.25, 0.8), (0.5, 0.9), (0.75, 0.5)], "1.weight": [(0.3, 1.0), (0.6, 1.0)]}
    alloc = allocate(net, 0.6, EqualLoss(table, dense=1.0))
    assert alloc.raw[1] == pytest.approx(0.6) and alloc.raw[0] == pytest.approx(0.6)
    assert alloc.info["level"] == pytest.approx(0.2 + (0.6 - 0.5) / 0.25 * 0.3, abs=1e-9)
    with pytest.raises(ValueError, match="grid ends at 0.75"):
        allocate(net, 0.7, EqualLoss(table, dense=1.0))


def test_equal_loss_accepts_a_sensitivity_result():
    sens = pytest.importorskip("prunekit.methods.sensitivity")
    torch.manual_seed(0)
    net = _mlp()
    X = torch.randn(64, 20)
    y = net(X).detach()

    def mse(m: nn.Module) -> float:
        with torch.no_grad():
            return float(F.mse_loss(m(X), y))

    result = sens.sensitivity(net, mse, sparsities=(0.25, 0.5, 0.75, 0.95), higher_is_better=False, progress=False)
    alloc = allocate(net, 0.6, "equal-loss", table=result)
    assert alloc.pruned == round(alloc.total * 0.6)
    losses = list(alloc.info["loss"].values())
    assert max(losses) - min(losses) < 1e-6 * max(1.0, max(losses))  # equal predicted loss where not capped
    groups = sens.sensitivity(net, mse, sparsities=(0.5, 0.95), groups={"hidden": ["0", "2"], "out": ["4"]},
                              higher_is_better=False, progress=False)
    alloc = allocate(net, 0.6, EqualLoss(groups))
    assert alloc.raw[0] == alloc.raw[1] and alloc.pruned == round(alloc.total * 0.6)


# -- every rule on every model: exact overall counts through the Pruner ---------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_rule_every_model_exact_count(rule, model_name):
    build, layers, calibration = MODELS[model_name]
    for seed, s in ((0, 0.3), (1, 0.7), (2, 0.95)):
        torch.manual_seed(seed)
        model = build()
        alloc = allocate(model, s, _rule(rule, model, layers, calibration, seed), layers=layers)
        n = sum(t.param.numel() for t in resolve_scope(model, layers).targets)
        assert alloc.total == n and alloc.pruned == round(n * s)
        pruner = Pruner(model, s, overrides=alloc, layers=layers)
        assert _pruned(pruner) == round(n * s), (rule, model_name, s)
        assert {name: int((~m).sum()) for name, m in pruner.masks.items()} == dict(zip(alloc.names, alloc.counts))
        pruner.remove()
        alloc.verify(model)
        if rule not in ("uniform",) and s == 0.7:
            assert len(set(alloc.values())) > 1  # a non-uniform rule really is non-uniform


@pytest.mark.parametrize("rule", ["uniform", "erk", "lamp", "owl"])
def test_prune_oneshot_takes_allocation_as_sparsity(rule):
    for model_name, method in (("mlp", "wanda"), ("gpt2", "sparsegpt"), ("lenet5", "magnitude")):
        build, layers, calibration = MODELS[model_name]
        torch.manual_seed(0)
        model = build()
        alloc = allocate(model, 0.6, _rule(rule, model, layers, calibration, 0), layers=layers)
        data = calibration()
        report = prune_oneshot(model, None if method == "magnitude" else data, method=method, sparsity=alloc,
                               blocks=False if model_name != "gpt2" else None)
        alloc.verify(model)
        assert sum(round(r.sparsity * math.prod(r.shape)) for r in report.layers) == round(alloc.total * 0.6)


def test_gradual_schedule_with_allocation():
    from prunekit import PolynomialDecay

    torch.manual_seed(0)
    model = _mlp()
    alloc = allocate(model, 0.8, "erk")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    schedule = PolynomialDecay(0.2, 0.8, 0, 4, frequency=1)
    pruner = Pruner(model, schedule, overrides=alloc.schedules(schedule), optimizer=opt)
    ratios = []
    for step in range(1, 6):
        opt.zero_grad()
        model(torch.randn(4, 20)).sum().backward()
        opt.step()
        # Every layer ramps with the main schedule: overall within one weight per layer of N·s(t).
        assert abs(_pruned(pruner) - alloc.total * schedule.sparsity(step)) <= len(alloc)
        ratios.append([int((~m).sum()) / max(c, 1) for m, c in zip(pruner.masks.values(), alloc.counts)])
    assert _pruned(pruner) == alloc.pruned == round(alloc.total * 0.8)
    assert all(abs(r - ratios[1][0]) < 0.05 for r in ratios[1])  # mid-ramp, each layer at the same fraction
    # Negative control: float overrides jump to the final targets at the first step.
    fresh = _mlp()
    jump = Pruner(fresh, schedule, overrides=allocate(fresh, 0.8, "erk"))
    assert _pruned(jump) == round(alloc.total * 0.8)
    with pytest.raises(TypeError, match="must be a PolynomialDecay"):
        alloc.schedules(0.5)


# -- names, and negative controls -----------------------------------------------------------------------------------


def test_glob_characters_in_names_are_escaped():
    net = nn.ModuleDict({"a[0]": nn.Linear(8, 8), "a*": nn.Linear(8, 4)})
    alloc = allocate(net, 0.5, "erk")
    assert list(alloc) == [glob.escape("a[0].weight"), glob.escape("a*.weight")]
    assert alloc["a*.weight"] == alloc[glob.escape("a*.weight")]
    pruner = Pruner(net, 0.5, overrides=alloc)
    assert _pruned(pruner) == alloc.pruned == 48
    pruner.remove()
    # Negative control: raw names as globs ("a[0].weight" matches "a0.weight", "a*.weight" matches both) fail.
    with pytest.raises(ValueError, match="matched no prunable parameter"):
        Pruner(nn.ModuleDict({"a[0]": nn.Linear(8, 8), "a*": nn.Linear(8, 4)}), 0.5, overrides=alloc.by_name())


def test_tied_weights_counted_once():
    model = _gpt2()  # lm_head.weight is transformer.wte.weight
    alloc = allocate(model, 0.5, "erk")
    assert "lm_head.weight" not in alloc.names and "transformer.wte.weight" in alloc.names
    assert alloc.total == sum(t.param.numel() for t in resolve_scope(model).targets)
    pruner = Pruner(model, 0.5, overrides=alloc)
    assert _pruned(pruner) == round(alloc.total * 0.5)
    pruner.remove()


def test_errors():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="unknown rule 'magic'"):
        allocate(net, 0.5, "magic")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            allocate(net, bad, "erk")
    with pytest.raises(ValueError, match="every parameter in scope is fixed"):
        allocate(net, 0.5, "erk", fixed={"0.weight": 0.0, "2.weight": 0.0})  # ERK with every layer forced dense
    with pytest.raises(ValueError, match="cannot be reached"):
        allocate(net, 0.9, "erk", fixed={"0.weight": 0.0})  # 86 of 96 from a 32-weight layer
    with pytest.raises(ValueError, match=r"fixed\['fc.weight'\] is not a parameter in scope"):
        allocate(net, 0.5, "uniform", fixed={"fc.weight": 0.0})
    with pytest.raises(ValueError, match="matched no prunable parameter"):
        allocate(net, 0.5, "uniform", layers=["nothing*"])
    with pytest.raises(ValueError, match="supports mean='weighted' only"):
        allocate(net, 0.5, "lamp", mean="layer")
    with pytest.raises(ValueError, match="mean must be one of"):
        allocate(net, 0.5, "uniform", mean="median")
    with pytest.raises(TypeError, match="rule 'owl'"):
        allocate(net, 0.5, "owl")  # needs calibration
    with pytest.raises(TypeError, match="go to the rule's constructor"):
        allocate(net, 0.5, ERK(), power=2.0)
    with pytest.raises(ValueError, match="dense= .* is required"):
        EqualLoss({"0.weight": [(0.5, 0.9)]})
    with pytest.raises(ValueError, match="'fc.weight', which is not a parameter in scope"):
        allocate(net, 0.5, EqualLoss({"fc.weight": [(0.5, 0.9)], "0.weight": [(0.5, 0.9)]}, dense=1.0))
    with pytest.raises(ValueError, match=r"no row for \['2.weight'\]"):
        allocate(net, 0.5, EqualLoss({"0.weight": [(0.9, 0.9)]}, dense=1.0))
    with pytest.raises(ValueError, match="not free parameters in scope"):
        allocate(net, 0.5, OWL({"x.weight": torch.ones(8)}))
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"OWL needs input activations of '0.weight' \(Embedding\)"):
        allocate(emb, 0.5, OWL([torch.arange(10)[None]]))
    with pytest.raises(ValueError, match="never reached"):
        allocate(net, 0.5, OWL(lambda m: None))
    with pytest.raises(KeyError, match="no parameter 'zz'"):
        allocate(net, 0.5)["zz"]


def test_verify_detects_a_wrong_count():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    alloc = allocate(net, 0.5, "erk")
    Pruner(net, 0.5).remove()  # uniform, not the allocation
    with pytest.raises(ValueError, match="zeros, the allocation prunes"):
        alloc.verify(net)


def test_zero_sparsity_and_allocation_dict():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    for rule in ("uniform", "erk", "lamp"):
        alloc = allocate(net, 0.0, rule)
        assert alloc.pruned == 0 and set(alloc.values()) == {0.0}
    alloc = allocate(net, 0.5, "lamp")
    d = alloc.to_dict()
    assert d["pruned"] == 48 and [row["name"] for row in d["layers"]] == ["0.weight", "1.weight"]
    assert "| (overall, lamp) | 96 | 0.5000 |" in alloc.table()


class _BySize(AllocationRule):
    """A custom rule: sparsity proportional to size (scaled to the goal)."""

    name = "by-size"

    def solve(self, problem: Problem):
        total = sum(n * n for n in problem.numels)
        return [min(problem.goal * n / total, 0.99) for n in problem.numels], {}


class _Broken(AllocationRule):
    name = "broken"

    def __init__(self, out):
        self.out = out

    def solve(self, problem: Problem):
        return self.out, {}


def test_custom_rule_and_its_checks():
    import prunekit

    assert prunekit.allocate is allocate
    torch.manual_seed(0)
    model = _mlp()
    alloc = prunekit.allocate(model, 0.6, _BySize())
    assert alloc.rule == "by-size" and alloc.pruned == round(alloc.total * 0.6)
    assert alloc["2.weight"] > alloc["0.weight"] > alloc["4.weight"]
    pruner = Pruner(model, 0.6, overrides=alloc)
    assert _pruned(pruner) == alloc.pruned
    pruner.remove()
    with pytest.raises(ValueError, match="returned list of 1 targets for 3 free parameters"):
        allocate(_mlp(), 0.5, _Broken([0.5]))
    with pytest.raises(ValueError, match="gave '2.weight' the target 1.5"):
        allocate(_mlp(), 0.5, _Broken([0.5, 1.5, 0.5]))


def test_owl_block_groups_need_blocks():
    with pytest.raises(ValueError, match="OWL groups='block': .*no repeated blocks"):
        allocate(_mlp(), 0.5, OWL([torch.randn(4, 20)], groups="block"))
