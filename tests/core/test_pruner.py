"""The Pruner: exact sparsity, ranking, overrides, optimizers, state_dict keys, deepcopy, LSTMs, strip, bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from core_helpers import LAYER_CASES, reference_keep
from torch import nn

from prunekit import (
    ConstantSparsity,
    Granularity,
    Magnitude,
    PolynomialDecay,
    Pruner,
    Unstructured,
    register_prunable,
    strip,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning"),
    pytest.mark.usefixtures("single_thread"),
]

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def params_of(model):
    return dict(model.named_parameters())


def pruned_count(mask: torch.Tensor) -> int:
    return int((~mask).sum())


def mlp(seed=0, scales=(1.0, 5.0, 0.3)):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    with torch.no_grad():
        for layer, scale in zip((model[0], model[2], model[4]), scales):
            layer.weight.mul_(scale)
    return model


MLP_NAMES = ["0.weight", "2.weight", "4.weight"]


def has_grad_hooks(p: torch.Tensor) -> bool:
    return bool(getattr(p, "_post_accumulate_grad_hooks", None))


class Rows(Granularity):
    """Custom row granularity defined in the test: prune whole output rows by mean score."""

    def unit_scores(self, scores):
        return scores.reshape(scores.shape[0], -1).mean(dim=1)

    def expand(self, unit_keep, shape):
        return unit_keep.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


class OneOfTwo(Granularity):
    """A fixed-pattern granularity (1:2 along the last dim): sparsity is set by the pattern."""

    supports_global = False

    def mask(self, scores, sparsity, prior=None):
        pairs = scores.reshape(-1, 2)
        keep = torch.zeros_like(pairs, dtype=torch.bool)
        keep[torch.arange(pairs.shape[0]), pairs.argmax(dim=1)] = True
        return keep.reshape(scores.shape)


# --------------------------------------------------------------------------------------
# Exact sparsity per layer, for every layer type
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.95])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_layerwise_sparsity_every_layer_type(layer_case, sparsity, seed):
    torch.manual_seed(seed)
    model = layer_case.build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner = Pruner(model, sparsity)
    assert pruner.names == layer_case.expected
    masks = pruner.masks
    for name in layer_case.expected:
        w0, w = before[name], params_of(model)[name].detach()
        ref = reference_keep([w0.abs()], sparsity)[0]
        assert np.array_equal(masks[name].numpy(), ref), name
        assert pruned_count(masks[name]) == round(w0.numel() * sparsity)
        assert int((w == 0).sum()) == round(w0.numel() * sparsity)
        assert torch.equal(w[masks[name]], w0[masks[name]])  # survivors untouched
        assert pruner.target_sparsity(name) == sparsity
    # everything outside the scope is untouched (biases, out_proj bias, ...)
    for name, p in model.named_parameters():
        if name not in layer_case.expected:
            assert torch.equal(p.detach(), before[name]), name


def test_ties_pruned_lowest_flat_index_first():
    model = nn.Linear(5, 4, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.weight[3, 4] = -0.5  # same magnitude, last index
        model.weight[0, 0] = 2.0
    pruner = Pruner(model, 0.45)  # round(20 * 0.45) = round(9.0) = 9
    expected = torch.ones(20, dtype=torch.bool)
    expected[1:10] = False
    assert torch.equal(pruner.masks["weight"].reshape(-1), expected)
    torch.manual_seed(0)
    again = nn.Linear(5, 4, bias=False)
    with torch.no_grad():
        again.weight.copy_(model.weight)
    assert torch.equal(Pruner(again, 0.45).masks["weight"], pruner.masks["weight"])


def test_k_uses_python_round_half_to_even():
    # n = 10 entries: 0.25 -> round(2.5) = 2, 0.35 -> round(3.5000000000000004) = 4, 0.45 -> round(4.5) = 4
    for s, k in [(0.25, 2), (0.35, 4), (0.45, 4), (0.05, 0), (0.15, 2)]:
        assert round(10 * s) == k
        model = nn.Linear(5, 2, bias=False)
        assert pruned_count(Pruner(model, s).masks["weight"]) == k, s


# --------------------------------------------------------------------------------------
# Global vs layer-wise ranking
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.2, 0.6, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_ranking_matches_reference(sparsity, seed):
    model = mlp(seed)
    w0 = [params_of(model)[n].detach().clone() for n in MLP_NAMES]
    pruner = Pruner(model, sparsity, ranking="global")
    refs = reference_keep([w.abs() for w in w0], sparsity)
    total = sum(w.numel() for w in w0)
    assert sum(pruned_count(m) for m in pruner.masks.values()) == round(total * sparsity)
    for name, ref in zip(MLP_NAMES, refs):
        assert np.array_equal(pruner.masks[name].numpy(), ref), name
        assert pruner.target_sparsity(name) == sparsity
    # the scaled layer keeps more, the shrunk layer loses more than under layer-wise ranking
    counts = {n: pruned_count(m) for n, m in pruner.masks.items()}
    n = {name: w.numel() for name, w in zip(MLP_NAMES, w0)}
    assert counts["2.weight"] < round(n["2.weight"] * sparsity)
    assert counts["4.weight"] > round(n["4.weight"] * sparsity)


def test_global_ranking_across_layer_types():
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv": nn.Conv2d(2, 3, 3), "lstm": nn.LSTM(4, 5), "emb": nn.Embedding(6, 4),
                           "attn": nn.MultiheadAttention(4, 2)})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner = Pruner(model, 0.7, ranking="global")
    refs = reference_keep([before[n].abs() for n in pruner.names], 0.7)
    for name, ref in zip(pruner.names, refs):
        assert np.array_equal(pruner.masks[name].numpy(), ref), name


@pytest.mark.parametrize("override", [0.5, ConstantSparsity(0.5, 0, 0, 1)], ids=["float", "schedule"])
def test_global_ranking_with_override_ranks_the_overridden_layer_alone(override):
    model = mlp(3)
    w0 = {n: params_of(model)[n].detach().clone() for n in MLP_NAMES}
    pruner = Pruner(model, 0.7, ranking="global", overrides={"2": override})
    shared = reference_keep([w0["0.weight"].abs(), w0["4.weight"].abs()], 0.7)
    alone = reference_keep([w0["2.weight"].abs()], 0.5)[0]
    assert np.array_equal(pruner.masks["0.weight"].numpy(), shared[0])
    assert np.array_equal(pruner.masks["4.weight"].numpy(), shared[1])
    assert np.array_equal(pruner.masks["2.weight"].numpy(), alone)
    assert pruned_count(pruner.masks["2.weight"]) == round(w0["2.weight"].numel() * 0.5)
    assert pruned_count(pruner.masks["0.weight"]) + pruned_count(pruner.masks["4.weight"]) == round(
        (w0["0.weight"].numel() + w0["4.weight"].numel()) * 0.7)
    assert pruner.target_sparsity("2.weight") == 0.5 and pruner.target_sparsity("0.weight") == 0.7


def test_global_ranking_with_all_layers_overridden():
    model = mlp(0)
    pruner = Pruner(model, 0.5, ranking="global", overrides={"0": 0.1, "2": 0.2, "4": 0.3})
    for name, s in zip(MLP_NAMES, (0.1, 0.2, 0.3)):
        assert pruned_count(pruner.masks[name]) == round(pruner.masks[name].numel() * s)


# --------------------------------------------------------------------------------------
# Selection and overrides through the Pruner
# --------------------------------------------------------------------------------------


def test_layers_and_exclude_select_what_is_pruned():
    model = mlp(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner = Pruner(model, 0.5, layers=[nn.Linear], exclude=["4"])
    assert pruner.names == ["0.weight", "2.weight"]
    assert torch.equal(model[4].weight, before["4.weight"])
    for name in ("0.weight", "2.weight"):
        assert int((params_of(model)[name] == 0).sum()) == params_of(model)[name].numel() // 2


def test_predicate_selection():
    model = mlp(0)
    pruner = Pruner(model, 0.5, layers=[lambda name, m: isinstance(m, nn.Linear) and m.in_features > 10])
    assert pruner.names == ["2.weight", "4.weight"]
    assert torch.count_nonzero(model[0].weight) == model[0].weight.numel()


def test_overrides_follow_their_timing():
    model = mlp(0)
    main = PolynomialDecay(0.2, 0.6, 0, 10, power=1, frequency=2)
    late = ConstantSparsity(0.9, begin_step=4, end_step=4, frequency=1)
    pruner = Pruner(model, main, overrides={"2": late, "4.weight": 0.5})
    n = {name: params_of(model)[name].numel() for name in MLP_NAMES}
    for step in range(13):
        if step:
            pruner.step()
        assert pruner.current_step == step
        last_main = min(step - step % 2, 10)
        want = {"0.weight": main.sparsity(last_main), "2.weight": 0.9 if step >= 4 else 0.0, "4.weight": 0.5}
        for name in MLP_NAMES:
            assert pruner.target_sparsity(name) == pytest.approx(want[name]), (step, name)
            assert pruned_count(pruner.masks[name]) == round(n[name] * want[name]), (step, name)
            assert int((params_of(model)[name] == 0).sum()) == round(n[name] * want[name]), (step, name)


def test_float_override_uses_main_schedule_begin():
    model = mlp(0)
    pruner = Pruner(model, PolynomialDecay(0.1, 0.5, begin_step=3, end_step=9, frequency=3), overrides={"0": 0.8})
    for _ in range(2):
        pruner.step()
    assert all(pruned_count(m) == 0 for m in pruner.masks.values())
    pruner.step()
    assert pruned_count(pruner.masks["0.weight"]) == round(160 * 0.8)
    assert pruned_count(pruner.masks["2.weight"]) == round(192 * 0.1)


def test_masks_property_returns_copies():
    model = mlp(0)
    pruner = Pruner(model, 0.5)
    m = pruner.masks["0.weight"]
    m.fill_(True)
    assert pruned_count(pruner.masks["0.weight"]) == 80
    assert list(pruner.masks) == pruner.names
    assert all(v.dtype == torch.bool for v in pruner.masks.values())


def test_update_masks_forces_a_recompute():
    model = mlp(0)
    pruner = Pruner(model, ConstantSparsity(0.2, begin_step=100, frequency=100))
    assert all(pruned_count(m) == 0 for m in pruner.masks.values())
    pruner.update_masks(0.6)
    for name, mask in pruner.masks.items():
        assert pruned_count(mask) == round(mask.numel() * 0.6) and pruner.target_sparsity(name) == 0.6
    pruner.update_masks()  # schedule's own target (masks are recomputed, target falls to 0.2)
    for name, mask in pruner.masks.items():
        assert pruned_count(mask) == round(mask.numel() * 0.2)


# --------------------------------------------------------------------------------------
# Masks follow the schedule during training, equal the reference at every update
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranking", ["layerwise", "global"])
def test_masks_at_every_update_match_reference(ranking):
    model = mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = {}
    # registered before the Pruner attaches: sees post-step weights before masks are re-applied
    opt.register_step_post_hook(lambda o, a, k: seen.__setitem__("w", [model[i].weight.detach().clone()
                                                                         for i in (0, 2, 4)]))
    sched = PolynomialDecay(0.1, 0.85, begin_step=2, end_step=14, frequency=3)
    pruner = Pruner(model, sched, optimizer=opt, ranking=ranking)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 10, generator=g), torch.randn(32, 4, generator=g)
    updates = []
    for step in range(1, 20):
        prev = pruner.masks
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        assert pruner.current_step == step
        masks = pruner.masks
        for name in MLP_NAMES:
            assert not (masks[name] & ~prev[name]).any(), "a pruned weight came back"
        if sched.should_update(step):
            updates.append(step)
            s = sched.sparsity(step)
            scores = [w.abs() for w in seen["w"]]
            priors = [prev[n] for n in MLP_NAMES]
            if ranking == "layerwise":
                refs = [reference_keep([sc], s, [pr])[0] for sc, pr in zip(scores, priors)]
            else:
                refs = reference_keep(scores, s, priors)
            for name, ref in zip(MLP_NAMES, refs):
                assert np.array_equal(masks[name].numpy(), ref), (step, name)
        else:
            for name in MLP_NAMES:
                assert torch.equal(masks[name], prev[name]), (step, name)
    assert updates == [2, 5, 8, 11, 14]
    total = sum(m.numel() for m in pruner.masks.values())
    assert sum(pruned_count(m) for m in pruner.masks.values()) == (
        round(total * 0.85) if ranking == "global" else sum(round(m.numel() * 0.85) for m in pruner.masks.values()))


# --------------------------------------------------------------------------------------
# Zeros stay zero under every optimizer; grads and optimizer state are masked
# --------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_wd_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_single_tensor": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.1, weight_decay=1e-3),
}

# State that moves a weight by itself (momentum, first moments). Second moments only divide
# a first moment, so the Pruner may leave any positive value there.
FIRST_MOMENTS = {"momentum_buffer", "exp_avg", "grad_avg"}

TRAIN_CASES = [c for c in LAYER_CASES if c.id in ("linear", "conv2d", "conv3d", "convtranspose2d", "embedding",
                                                  "lstm_bi_2layer", "lstm_proj", "gru_2layer", "mha_separate")]


def _check_zero(model, pruner, where):
    params = params_of(model)
    for name, mask in pruner.masks.items():
        w = params[name].detach()[~mask]
        assert torch.equal(w, torch.zeros_like(w)), (where, name)
        assert not torch.signbit(w).any(), (where, name, "negative zero")


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c.id for c in TRAIN_CASES])
def test_zeros_stay_zero_under_optimizers(case, opt_name):
    torch.manual_seed(0)
    model = case.build()
    g = torch.Generator().manual_seed(1)
    inputs = case.inputs(g)
    target = torch.randn_like(case.forward(model, inputs).detach())
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = PolynomialDecay(0.3, 0.8, begin_step=2, end_step=14, frequency=4)  # dense optimizer state first
    pruner = Pruner(model, sched, optimizer=opt)
    slots = {s.target.name: s for s in pruner._slots}
    params = params_of(model)
    frozen, checked_state = {}, set()
    for step in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(case.forward(model, inputs), target)
        loss.backward()
        masks = pruner.masks
        for name, mask in masks.items():
            grad = params[name].grad
            if grad is not None and pruned_count(mask):
                assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), (step, name, "grad")
        opt.step()
        _check_zero(model, pruner, step)
        for name, mask in pruner.masks.items():
            for key, value in opt.state[params[name]].items():
                if not (isinstance(value, torch.Tensor) and value.shape == mask.shape):
                    continue
                assert torch.isfinite(value).all(), (step, name, key)
                if key in FIRST_MOMENTS:  # anything that would push a pruned weight is exactly zero
                    assert torch.equal(value[~mask], torch.zeros_like(value[~mask])), (step, name, key)
                    checked_state.add(key)
        if step == 14:
            frozen = {n: p.detach().clone() for n, p in params.items()}
    if opt_name != "adagrad":  # Adagrad keeps no first moment
        assert checked_state, "no optimizer state was checked"
    for name, mask in pruner.masks.items():
        assert pruned_count(mask) == round(mask.numel() * 0.8), name
        assert slots[name].param is params[name]  # identity preserved: optimizers keep working
    # training went on after the last update: some surviving weight moved
    assert any(not torch.equal(params[n].detach()[pruner.masks[n]], frozen[n][pruner.masks[n]]) for n in pruner.names)


def test_grad_of_pruned_weights_is_zero_right_after_backward_even_with_accumulation():
    model = nn.Linear(6, 3)
    pruner = Pruner(model, 0.5)
    x = torch.randn(8, 6)
    for _ in range(3):  # gradient accumulation: each accumulation is masked
        model(x).pow(2).sum().backward()
        assert torch.equal(model.weight.grad[~pruner.masks["weight"]], torch.zeros(9))
        assert torch.count_nonzero(model.weight.grad[pruner.masks["weight"]]) == 9
        assert torch.count_nonzero(model.bias.grad) == 3


def test_optimizer_state_is_cleared_when_masks_grow():
    model = nn.Linear(8, 8, bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 8)
    pruner = Pruner(model, ConstantSparsity(0.5, begin_step=3, end_step=3, frequency=1), optimizer=opt)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    mask = pruner.masks["weight"]
    assert pruned_count(mask) == 32
    state = opt.state[model.weight]
    assert torch.count_nonzero(state["exp_avg"][~mask]) == 0
    assert bool((state["exp_avg_sq"][~mask] > 0).all())  # no zero denominators left for revived weights
    assert torch.count_nonzero(state["exp_avg"][mask]) == 32  # survivors keep their moments
    kept_sq = state["exp_avg_sq"][mask].clone()
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    assert torch.count_nonzero(model.weight[~mask]) == 0
    assert not torch.equal(state["exp_avg_sq"][mask], kept_sq)


def test_attach_later_and_manual_step():
    model = mlp(0)
    pruner = Pruner(model, ConstantSparsity(0.5, begin_step=1, frequency=1))
    assert pruner.current_step == 0 and all(pruned_count(m) == 0 for m in pruner.masks.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert pruner.attach(opt) is pruner
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    assert pruner.current_step == 1
    _check_zero(model, pruner, "after attach")
    pruner.step()
    assert pruner.current_step == 2


def test_attach_twice_is_an_error_and_detach_stops_following():
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, ConstantSparsity(0.5, 0, -1, 1), optimizer=opt)
    with pytest.raises(ValueError, match="attach: this optimizer is already attached"):
        pruner.attach(opt)
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    assert pruner.current_step == 1
    pruner.detach(opt)
    opt.step()
    assert pruner.current_step == 1
    with pytest.raises(ValueError, match="detach: this optimizer is not attached"):
        pruner.detach(opt)


def test_manual_step_path_keeps_zeros_and_strip_writes_positive_zeros():
    # No optimizer attached: the user calls pruner.step() after opt.step(). Momentum is not
    # cleared (the pruner does not know the optimizer), but masks are re-applied every step.
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model, ConstantSparsity(0.5, begin_step=3, frequency=1000))
    x, t = torch.randn(4, 6), torch.randn(4, 5)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        opt.step()
        pruner.step()
        assert torch.count_nonzero(model.weight[~pruner.masks["weight"]]) == 0
    mask = pruner.masks["weight"]
    strip(model)
    assert not torch.signbit(model.weight.detach()[~mask]).any()


def test_update_masks_per_parameter():
    model = mlp(0)
    pruner = Pruner(model, 0.5, overrides={"4": 0.25})
    pruner.update_masks({"0.weight": 0.75})
    assert pruned_count(pruner.masks["0.weight"]) == 120 and pruner.target_sparsity("0.weight") == 0.75
    assert pruned_count(pruner.masks["2.weight"]) == 96 and pruned_count(pruner.masks["4.weight"]) == 12
    with pytest.raises(ValueError, match=r"update_masks: 'nope' is not pruned"):
        pruner.update_masks({"nope": 0.5})
    with pytest.raises(ValueError, match=r"update_masks: sparsity\['2.weight'\] must be in \[0, 1\)"):
        pruner.update_masks({"2.weight": 1.0})
    glob = Pruner(mlp(0), 0.5, ranking="global", overrides={"4": 0.25})
    with pytest.raises(ValueError, match=r"update_masks: '0.weight' is ranked globally"):
        glob.update_masks({"0.weight": 0.6})
    glob.update_masks({"4.weight": 0.5})
    assert pruned_count(glob.masks["4.weight"]) == 24


def test_pruner_without_a_reference_keeps_working_and_strip_finds_it():
    import gc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    Pruner(model, ConstantSparsity(0.5, 0, -1, 1), optimizer=opt)  # not kept by the user
    gc.collect()
    zeros = (model[0].weight == 0).clone()
    assert int(zeros.sum()) == 15
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        assert torch.count_nonzero(model[0].weight.grad[zeros]) == 0
        opt.step()
        assert torch.count_nonzero(model[0].weight[zeros]) == 0
    strip(model)
    assert not any(has_grad_hooks(p) for p in model.parameters())
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.count_nonzero(model[0].weight.grad[zeros]) == 15


def test_masks_follow_a_dtype_cast_of_the_model():
    model = mlp(0)
    pruner = Pruner(model, ConstantSparsity(0.5, 0, -1, 3))
    model.double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for name, mask in pruner.masks.items():
            assert torch.count_nonzero(params_of(model)[name].grad[~mask]) == 0
        opt.step()
        _check_zero(model, pruner, "double")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for name, mask in pruner.masks.items():
        assert pruned_count(mask) == round(mask.numel() * 0.5)


def test_diverging_run_is_reported_at_the_next_update():
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Pruner(model, ConstantSparsity(0.5, 0, -1, 2), optimizer=opt)
    x = torch.randn(4, 10)
    model(x).sum().backward()
    opt.step()  # step 1
    opt.zero_grad()
    x[0, 0] = float("inf")
    model(x).sum().backward()  # non-finite gradients everywhere in the first layer
    with pytest.raises(ValueError, match=r"parameter '0.weight' contains NaN or Inf at step 2"):
        opt.step()  # step 2 is an update


def test_frozen_parameters_can_be_pruned_one_shot():
    # one-shot pruning of a pretrained model whose parameters are frozen
    model = mlp(0)
    model.requires_grad_(False)
    pruner = Pruner(model, 0.5)
    for name, mask in pruner.masks.items():
        assert pruned_count(mask) == round(mask.numel() * 0.5)
        assert torch.count_nonzero(params_of(model)[name][~mask]) == 0
    strip(model)
    assert int((model[0].weight == 0).sum()) == 80


def test_partly_frozen_model_trains_and_unfrozen_layers_get_masked_grads():
    model = mlp(0)
    model[0].requires_grad_(False)  # e.g. frozen embeddings while fine-tuning
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    pruner = Pruner(model, 0.5, optimizer=opt)  # one-shot: no mask update after the unfreeze
    x, y = torch.randn(8, 10), torch.randn(8, 4)

    def train():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for name, mask in pruner.masks.items():
            grad = params_of(model)[name].grad
            if grad is not None:
                assert torch.count_nonzero(grad[~mask]) == 0, name
        opt.step()
        _check_zero(model, pruner, "frozen")

    for _ in range(3):
        train()
    assert model[0].weight.grad is None
    # unfreeze: the first layer joins training; its pruned weights stay zero, its grads get masked
    model[0].requires_grad_(True)
    opt.add_param_group({"params": [model[0].weight, model[0].bias]})
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()  # not masked yet: the hook comes with the next step
    opt.step()
    _check_zero(model, pruner, "unfrozen")
    pruned0 = ~pruner.masks["0.weight"]
    assert torch.count_nonzero(opt.state[model[0].weight]["momentum_buffer"][pruned0]) == 0
    for _ in range(4):
        train()
    assert model[0].weight.grad is not None and pruner.current_step == 8


def test_custom_registered_layer_trains_with_zeros():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            return x @ self.kernel

    register_prunable(Gate, ["kernel"])
    model = nn.Sequential(Gate(), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    pruner = Pruner(model, 0.5, optimizer=opt)
    assert pruner.names == ["0.kernel", "2.weight"]
    for _ in range(10):
        opt.zero_grad()
        model(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
        _check_zero(model, pruner, "gate")


# --------------------------------------------------------------------------------------
# The interface admits other granularities
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranking", ["layerwise", "global"])
def test_custom_row_granularity_in_the_pruner(ranking):
    model = mlp(2)
    before = {n: params_of(model)[n].detach().clone() for n in MLP_NAMES}
    pruner = Pruner(model, 0.5, granularity=Rows(), ranking=ranking)
    row_scores = [before[n].abs().double().mean(dim=1) for n in MLP_NAMES]
    if ranking == "layerwise":
        refs = [reference_keep([r], 0.5)[0] for r in row_scores]
    else:
        refs = reference_keep(row_scores, 0.5)
    for name, ref in zip(MLP_NAMES, refs):
        rows_kept = pruner.masks[name].all(dim=1)
        assert torch.equal(pruner.masks[name], rows_kept[:, None].expand_as(pruner.masks[name]))
        assert np.array_equal(rows_kept.numpy(), ref), name
        w = params_of(model)[name].detach()
        assert torch.count_nonzero(w[~rows_kept]) == 0
    if ranking == "global":
        assert sum(int((~pruner.masks[n].all(1)).sum()) for n in MLP_NAMES) == round(32 * 0.5)


def test_fixed_pattern_granularity_layerwise_only():
    model = mlp(0)
    pruner = Pruner(model, 0.5, granularity=OneOfTwo())
    for name, mask in pruner.masks.items():
        assert torch.equal(mask.reshape(-1, 2).sum(dim=1), torch.ones(mask.numel() // 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ranking='global' is not possible with OneOfTwo\(\)"):
        Pruner(mlp(0), 0.5, granularity=OneOfTwo(), ranking="global")


def test_granularity_returning_a_bad_mask_is_an_error():
    class Broken(Unstructured):
        def expand(self, unit_keep, shape):
            return unit_keep.reshape(-1)

    with pytest.raises(ValueError, match=r"Broken\(\) returned a mask of shape \(160,\).*for '0.weight'"):
        Pruner(mlp(0), 0.5, granularity=Broken())

    class FloatMask(Unstructured):
        def expand(self, unit_keep, shape):
            return unit_keep.reshape(shape).float()

    with pytest.raises(ValueError, match=r"FloatMask\(\) returned a mask.*torch.float32.*for '0.weight'"):
        Pruner(mlp(0), 0.5, granularity=FloatMask())


# --------------------------------------------------------------------------------------
# No wrappers: state_dict keys, module types, identity; deepcopy
# --------------------------------------------------------------------------------------


def test_state_dict_keys_and_module_structure_unchanged(layer_case):
    torch.manual_seed(0)
    model = layer_case.build()
    reference = layer_case.build()
    keys = list(model.state_dict())
    assert keys == list(reference.state_dict())
    ids = {n: id(p) for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = Pruner(model, ConstantSparsity(0.5, 0, -1, 2), optimizer=opt)
    inputs = layer_case.inputs(torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        layer_case.forward(model, inputs).pow(2).mean().backward()
        opt.step()
    assert list(model.state_dict()) == keys
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    sd = model.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values())
    reference.load_state_dict(sd, strict=True)  # a plain, unpruned model accepts it
    for name in pruner.names:
        assert torch.equal(params_of(reference)[name], params_of(model)[name])
    strip(model)
    assert list(model.state_dict()) == keys


def test_deepcopy_of_a_pruned_model_is_independent_and_hook_free():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))  # linear: every gradient entry is non-zero
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(model, ConstantSparsity(0.5, 0, -1, 2), optimizer=opt)
    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def train(m, o):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()

    for _ in range(3):
        train(model, opt)
    clone = copy.deepcopy(model)
    for (n, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n
    assert not any(has_grad_hooks(p) for p in clone.parameters())
    assert all(has_grad_hooks(params_of(model)[n]) for n in pruner.names)
    # the copy is a plain model: its gradients are not masked, its optimizer does not drive the pruner
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.05)
    clone_opt.zero_grad()
    nn.functional.mse_loss(clone(x), y).backward()
    mask = pruner.masks["0.weight"]
    assert torch.count_nonzero(clone[0].weight.grad[~mask]) == pruned_count(mask)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    clone_opt.step()
    assert pruner.current_step == 3
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    assert torch.count_nonzero(clone[0].weight[~mask]) > 0  # revived in the copy only
    # stripping the copy does not touch the original's pruner
    strip(clone)
    train(model, opt)
    assert pruner.current_step == 4
    _check_zero(model, pruner, "original after copy")


def test_deepcopy_before_training_then_both_train():
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = Pruner(model, 0.5, optimizer=opt)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone[0].weight.add_(1.0)
    assert int((model[0].weight == 0).sum()) == 80  # the original is unaffected
    model(torch.randn(3, 10)).sum().backward()
    opt.step()
    _check_zero(model, pruner, "original")


# --------------------------------------------------------------------------------------
# RNNs keep training after pruning
# --------------------------------------------------------------------------------------


class SeqModel(nn.Module):
    def __init__(self, rnn: nn.RNNBase, out_features: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(out_features, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


RNNS = {
    "lstm": (lambda: nn.LSTM(3, 12, batch_first=True), 12),
    "lstm_bi_proj_2layer": (
        lambda: nn.LSTM(3, 12, num_layers=2, proj_size=6, bidirectional=True, batch_first=True), 12),
    "gru": (lambda: nn.GRU(3, 12, batch_first=True), 12),
}


@pytest.mark.parametrize("kind", list(RNNS))
def test_rnn_keeps_training_after_pruning(kind):
    torch.manual_seed(0)
    build, width = RNNS[kind]
    model = SeqModel(build(), width)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, 3, generator=g)
    y = x[:, :, 0].mean(dim=1, keepdim=True) * 3
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    pruner = Pruner(model, PolynomialDecay(0.2, 0.7, begin_step=5, end_step=25, frequency=5), optimizer=opt,
                    layers=["rnn"])
    losses = []
    for _ in range(120):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    rnn = model.rnn
    assert not any(math.isnan(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[25:30]), "the pruned RNN did not keep learning"
    _check_zero(model, pruner, "rnn")
    for name, mask in pruner.masks.items():
        assert pruned_count(mask) == round(mask.numel() * 0.7)
    # the cuDNN-style flat weight list still aliases the parameters
    for name, flat in zip(rnn._flat_weights_names, rnn._flat_weights):
        assert flat is getattr(rnn, name)
    # and the forward uses the pruned weights: a fresh module loaded from the state_dict agrees
    fresh = SeqModel(build(), width)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------------------
# strip / remove
# --------------------------------------------------------------------------------------


def test_strip_leaves_a_plain_model_with_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model, ConstantSparsity(0.6, 0, -1, 1), optimizer=opt)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    masks = pruner.masks
    keys = list(model.state_dict())
    assert strip(model) is model
    assert list(model.state_dict()) == keys
    _check_zero(model, pruner, "strip")
    assert not any(has_grad_hooks(p) for p in model.parameters())
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.count_nonzero(model[0].weight.grad[~masks["0.weight"]]) == pruned_count(masks["0.weight"])
    opt.step()
    assert pruner.current_step == 2  # the optimizer no longer drives the pruner
    assert torch.count_nonzero(model[0].weight[~masks["0.weight"]]) > 0  # nothing re-applies masks anymore
    with pytest.raises(RuntimeError, match="removed"):
        pruner.step()
    with pytest.raises(RuntimeError, match="removed"):
        pruner.update_masks(0.5)
    with pytest.raises(RuntimeError, match="removed"):
        pruner.attach(opt)
    assert strip(model) is model  # idempotent
    assert pruner.remove() is model


def test_strip_on_unpruned_model_is_a_noop():
    model = mlp(0)
    before = copy.deepcopy(model.state_dict())
    assert strip(model) is model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_strip_only_touches_its_model():
    a, b = mlp(0), mlp(1)
    pa, pb = Pruner(a, ConstantSparsity(0.5, 0, -1, 1)), Pruner(b, ConstantSparsity(0.5, 0, -1, 1))
    strip(a)
    pb.step()
    assert pb.current_step == 1
    with pytest.raises(RuntimeError):
        pa.step()
    assert all(has_grad_hooks(params_of(b)[n]) for n in pb.names)


def test_strip_rejects_non_modules():
    with pytest.raises(TypeError, match="strip: model must be an nn.Module"):
        strip({"a": 1})


# --------------------------------------------------------------------------------------
# NaN / Inf at a mask update
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_at_construction(bad):
    model = mlp(0)
    with torch.no_grad():
        model[2].weight[3, 1] = bad
    with pytest.raises(ValueError, match=r"parameter '2.weight' contains NaN or Inf at step 0"):
        Pruner(model, 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_at_a_scheduled_update(bad):
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, ConstantSparsity(0.5, 0, -1, 2), optimizer=opt)
    model(torch.randn(2, 10)).sum().backward()
    opt.step()  # step 1: no update
    with torch.no_grad():
        model[4].weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"parameter '4.weight' contains NaN or Inf at step 2"):
        opt.step()  # step 2: update
    with pytest.raises(ValueError, match=r"'4.weight' contains NaN or Inf"):
        pruner.update_masks()


# --------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------

PRUNER_BAD = [
    (dict(schedule="0.5"), TypeError, r"Pruner: schedule must be a Schedule.*or a sparsity in \[0, 1\)"),
    (dict(schedule=None), TypeError, r"Pruner: schedule must be a Schedule"),
    (dict(schedule=True), TypeError, r"Pruner: schedule must be a Schedule"),
    (dict(schedule=[0.5]), TypeError, r"Pruner: schedule must be a Schedule"),
    (dict(schedule=1.0), ValueError, r"Pruner: schedule must be in \[0, 1\), got 1.0"),
    (dict(schedule=1), ValueError, r"Pruner: schedule must be in \[0, 1\)"),
    (dict(schedule=-0.1), ValueError, r"Pruner: schedule must be in \[0, 1\)"),
    (dict(schedule=float("nan")), ValueError, r"Pruner: schedule must be finite"),
    (dict(schedule=float("inf")), ValueError, r"Pruner: schedule must be finite"),
    (dict(schedule={"type": "Nope"}), ValueError, r"'type' must be one of"),
    (dict(schedule={"type": "ConstantSparsity", "target_sparsity": 2.0}), ValueError, r"target_sparsity"),
    (dict(criterion=Magnitude), TypeError, r"Pruner: criterion must be a prunekit Criterion instance, got type"),
    (dict(criterion=lambda p, c: p.abs()), TypeError, r"Pruner: criterion must be a prunekit Criterion"),
    (dict(criterion="magnitude"), TypeError, r"Pruner: criterion must be a prunekit Criterion"),
    (dict(granularity="unstructured"), TypeError, r"Pruner: granularity must be a prunekit Granularity"),
    (dict(granularity=Unstructured), TypeError, r"Pruner: granularity must be a prunekit Granularity"),
    (dict(ranking="Global"), ValueError, r"Pruner: ranking must be one of 'layerwise', 'global', got 'Global'"),
    (dict(ranking="per-layer"), ValueError, r"Pruner: ranking must be one of"),
    (dict(ranking=None), (ValueError, TypeError), r"Pruner: ranking must be one of"),
    (dict(layers=[1]), TypeError, r"layers: each entry must be"),
    (dict(layers=1.5), TypeError, r"layers must be a list"),
    (dict(layers=["0", None]), TypeError, r"layers: each entry must be"),
    (dict(layers=["missing"]), ValueError, r"layers: 'missing' matched no prunable parameter"),
    (dict(layers=[nn.Conv2d]), ValueError, r"layers: .*Conv2d.* matched no prunable parameter"),
    (dict(layers=[]), ValueError, r"no prunable parameter in scope"),
    (dict(exclude=[nn.Linear]), ValueError, r"no prunable parameter in scope"),
    (dict(exclude=[2]), TypeError, r"exclude: each entry must be"),
    (dict(exclude=["7"]), ValueError, r"exclude: '7' matched no prunable parameter"),
    (dict(overrides={"0": 1.0}), ValueError, r"overrides\['0.weight'\] must be in \[0, 1\)"),
    (dict(overrides={"0": -0.5}), ValueError, r"overrides\['0.weight'\] must be in \[0, 1\)"),
    (dict(overrides={"0": float("nan")}), ValueError, r"overrides\['0.weight'\] must be finite"),
    (dict(overrides={"0": "0.5"}), TypeError, r"overrides\['0.weight'\] must be a real number"),
    (dict(overrides={"0": True}), TypeError, r"overrides\['0.weight'\] must be a real number"),
    (dict(overrides={"0": {"type": "ConstantSparsity"}}), TypeError, r"overrides\['0.weight'\]"),
    (dict(overrides={0: 0.5}), TypeError, r"overrides: keys must be name patterns"),
    (dict(overrides=[("0", 0.5)]), TypeError, r"overrides must be a dict"),
    (dict(overrides={"9": 0.5}), ValueError, r"overrides: '9' matched no prunable parameter"),
    (dict(overrides={"0": 0.5, "0.*": 0.3}), ValueError, r"overrides: parameter '0.weight' is matched by several"),
    (dict(optimizer="adam"), TypeError, r"attach: optimizer must be a torch.optim.Optimizer, got str"),
    (dict(optimizer=torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)), ValueError,
     r"attach: the optimizer updates none of the pruned parameters"),
]


@pytest.mark.parametrize("kwargs,exc,match", PRUNER_BAD, ids=[repr(c[0])[:60] for c in PRUNER_BAD])
def test_pruner_rejects(kwargs, exc, match):
    model = mlp(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = {"schedule": 0.5, **kwargs}
    schedule = args.pop("schedule")
    with pytest.raises(exc, match=match):
        Pruner(model, schedule, **args)
    if "optimizer" not in kwargs:  # validation happens before anything is pruned
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_pruner_rejects_non_module_and_model_without_prunable_layers():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        Pruner([nn.Linear(2, 2)], 0.5)
    with pytest.raises(ValueError, match="no prunable parameter in scope"):
        Pruner(nn.Sequential(nn.LayerNorm(4), nn.ReLU()), 0.5)


def test_method_arguments_are_validated():
    model = mlp(0)
    pruner = Pruner(model, 0.5)
    with pytest.raises(ValueError, match=r"update_masks: sparsity must be in \[0, 1\)"):
        pruner.update_masks(1.0)
    with pytest.raises(TypeError, match=r"update_masks: sparsity must be a real number"):
        pruner.update_masks("0.5")
    with pytest.raises(KeyError, match=r"'nope' is not pruned by this pruner"):
        pruner.target_sparsity("nope")
    with pytest.raises(TypeError, match=r"attach: optimizer must be a torch.optim.Optimizer"):
        pruner.attach(None)
    assert all(pruned_count(m) == round(m.numel() * 0.5) for m in pruner.masks.values())


def test_schedule_may_be_given_as_dict_and_int_zero():
    model = mlp(0)
    pruner = Pruner(model, {"type": "ConstantSparsity", "target_sparsity": 0.25, "frequency": 1})
    assert pruner.schedule == ConstantSparsity(0.25, 0, -1, 1)
    assert pruned_count(pruner.masks["0.weight"]) == 40
    assert Pruner(mlp(0), 0).schedule == ConstantSparsity(0.0, 0, 0, 1)


def test_repr_mentions_the_parts():
    text = repr(Pruner(mlp(0), 0.5, ranking="global"))
    assert "3 tensors" in text and "ConstantSparsity" in text and "Magnitude()" in text and "'global'" in text
