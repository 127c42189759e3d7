"""OBD, Taylor and Precomputed criteria: values, the Pruner integration, ranking, caching."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import prunekit
from prunekit import OBD, Magnitude, Precomputed, Pruner, Random, ScoreContext, Taylor

ESTIMATORS = ["exact", "hutchinson", "gauss-newton", "fisher"]


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_data(seed: int = 0, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))]


def ref_keep(scores: list[torch.Tensor], sparsity: float) -> list[np.ndarray]:
    """Brute-force keep-masks: prune round(n * sparsity) entries over the concatenation, lowest score first,
    ties by lowest flat index (one tensor = layer-wise ranking, several = global)."""
    arrays = [s.detach().double().numpy() for s in scores]
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    order = np.lexsort((np.arange(flat.size), flat))
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:round(flat.size * sparsity)]] = False
    out, start = [], 0
    for a in arrays:
        out.append(keep[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


def all_criteria(data, seed: int = 0):
    loss = nn.functional.cross_entropy
    crits = {"magnitude": Magnitude(), "random": Random(seed), "taylor": Taylor(data, loss)}
    for est in ESTIMATORS:
        crits[f"obd-{est}"] = OBD(data, loss, estimator=est, probes=20, seed=seed)
    return crits


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obd_exact_is_half_h_w_squared_with_an_independent_hessian(seed):
    model, data = tiny_mlp(seed), tiny_data(seed)
    X, Y = data[0]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(t):
        parts, i = {}, 0
        for n, p in model.named_parameters():
            parts[n] = t[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return nn.functional.cross_entropy(functional_call(model, parts, (X,)), Y)

    hdiag = torch.diag(torch.autograd.functional.hessian(loss, theta))
    saliency = OBD(data, nn.functional.cross_entropy, estimator="exact", model=model).saliency()
    assert set(saliency) == {"0.weight", "2.weight"}  # the default scope: weights, not biases
    i = 0
    for n, p in model.named_parameters():
        if n in saliency:
            expected = 0.5 * hdiag[i:i + p.numel()].reshape(p.shape) * p.detach() ** 2
            torch.testing.assert_close(saliency[n], expected, rtol=1e-9, atol=1e-14)
        i += p.numel()


def test_taylor_matches_a_hand_computation():
    model = nn.Linear(3, 1, bias=False).double()
    w = np.array([0.5, -1.0, 2.0])
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w[None]))
    X = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = np.array([1.0, 0.0, -1.0, 2.0])
    # Two batches of different sizes: the gradient is of the mean over all four samples.
    data = [(torch.tensor(X[:1]), torch.tensor(y[:1, None])), (torch.tensor(X[1:]), torch.tensor(y[1:, None]))]
    residual = X @ w - y
    grad = 2 * (residual[:, None] * X).mean(axis=0)  # d/dw mean((Xw - y)^2)
    expected = np.abs(w * grad)
    got = Taylor(data, nn.functional.mse_loss, model=model).saliency()["weight"]
    np.testing.assert_allclose(got.numpy().reshape(-1), expected, rtol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obd_prunes_the_weight_whose_removal_hurts_least_where_magnitude_fails(estimator, seed):
    """Least squares at its optimum: removing w_k raises the loss by exactly 1/2 H_kk w_k^2.

    The small weight sits on a high-variance input (removing it is costly); the
    large weight on a nearly constant-zero input (removing it is almost free).
    """
    g = torch.Generator().manual_seed(seed)
    n = 256
    X = torch.stack([10.0 * torch.randn(n, generator=g, dtype=torch.float64),
                     0.1 * torch.randn(n, generator=g, dtype=torch.float64)], dim=1)
    y = X @ torch.tensor([0.5, 2.0], dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():  # the least-squares solution: gradient zero, as OBD assumes
        model.weight.copy_(torch.linalg.lstsq(X, y[:, None]).solution.T)
    data = [(X, y[:, None])]

    def loss_without(index: int) -> float:
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.weight[0, index] = 0.0
            return float(nn.functional.mse_loss(m(X), y[:, None]))

    increase = [loss_without(0), loss_without(1)]
    truly_cheapest = int(np.argmin(increase))
    w = model.weight.detach()[0]
    assert int(torch.argmin(w.abs())) != truly_cheapest  # magnitude would pick wrong ...

    obd_model = copy.deepcopy(model)
    Pruner(obd_model, 0.5, criterion=OBD(data, nn.functional.mse_loss, estimator=estimator, probes=50, seed=seed,
                                         model=obd_model))
    mag_model = copy.deepcopy(model)
    Pruner(mag_model, 0.5, criterion=Magnitude())
    assert obd_model.weight[0, truly_cheapest] == 0 and obd_model.weight[0, 1 - truly_cheapest] != 0
    assert mag_model.weight[0, truly_cheapest] != 0  # ... and does
    # With an exact diagonal, OBD's estimate of each increase is exact here (quadratic loss at its optimum).
    if estimator in ("exact", "gauss-newton"):
        s = OBD(data, nn.functional.mse_loss, estimator=estimator, model=model).saliency()
        with torch.no_grad():
            base = float(nn.functional.mse_loss(model(X), y[:, None]))
        np.testing.assert_allclose(s["weight"][0].numpy(), np.array(increase) - base, rtol=1e-6)


# -- Pruner integration: every criterion, both rankings -------------------------------------------


@pytest.mark.parametrize("ranking", ["layerwise", "global"])
@pytest.mark.parametrize("name", ["magnitude", "random", "taylor"] + [f"obd-{e}" for e in ESTIMATORS])
def test_every_criterion_ranks_layerwise_and_globally_through_the_pruner(name, ranking):
    model, data = tiny_mlp(3), tiny_data(3)
    crit = all_criteria(data, seed=3)[name]
    if hasattr(crit, "bind"):
        crit.bind(model)
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    scores = [crit.score(p.detach(), ScoreContext(n, model, 0)) for n, p in weights.items()]
    pruner = Pruner(model, 0.6, criterion=crit, ranking=ranking)
    masks = pruner.masks
    if ranking == "global":
        expected = ref_keep(scores, 0.6)
    else:
        expected = [ref_keep([s], 0.6)[0] for s in scores]
    for (n, _), keep in zip(weights.items(), expected):
        np.testing.assert_array_equal(masks[n].numpy(), keep)
    if hasattr(crit, "estimates"):
        assert crit.estimates == 1  # one estimate served every layer (and the scores above)


def test_data_criteria_reestimate_only_when_weights_change():
    model, data = tiny_mlp(), tiny_data()
    obd = OBD(data, nn.functional.cross_entropy, estimator="gauss-newton", model=model)
    first = obd.saliency()
    assert obd.saliency() is first and obd.estimates == 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
    opt.step()
    second = obd.saliency()
    assert obd.estimates == 2 and not torch.equal(second["0.weight"], first["0.weight"])


def test_pruner_with_obd_recomputes_after_pruning():
    model, data = tiny_mlp(), tiny_data()
    obd = OBD(data, nn.functional.cross_entropy, estimator="gauss-newton", model=model)
    pruner = Pruner(model, 0.3, criterion=obd, ranking="global")
    assert obd.estimates == 1
    pruner.update_masks(0.6)  # the weights changed (zeros written): a fresh estimate at the new point
    assert obd.estimates == 2
    assert abs(pruner.report().sparsity - 0.6) < 0.02


def test_hutchinson_probes_follow_the_step():
    model, data = tiny_mlp(), tiny_data()
    obd = OBD(data, nn.functional.cross_entropy, estimator="hutchinson", probes=3, seed=1, model=model)
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    a = obd.hessian_diagonal(model, params, step=0)
    b = obd.hessian_diagonal(model, params, step=0)
    c = obd.hessian_diagonal(model, params, step=5)
    assert torch.equal(a["0.weight"], b["0.weight"]) and not torch.equal(a["0.weight"], c["0.weight"])


# -- errors -------------------------------------------------------------------------------------


def test_unbound_or_wrongly_bound_criteria_fail_clearly():
    model, other, data = tiny_mlp(), tiny_mlp(1), tiny_data()
    with pytest.raises(RuntimeError, match=r"bind\(model\)"):
        Taylor(data, nn.functional.cross_entropy).saliency()
    # The Pruner binds an unbound criterion to the model it prunes...
    crit = Taylor(data, nn.functional.cross_entropy)
    Pruner(model, 0.5, criterion=crit)
    assert crit.model is model
    # ...but never silently replaces a model the user bound explicitly.
    with pytest.raises(ValueError, match="different model"):
        Pruner(model, 0.5, criterion=OBD(data, nn.functional.cross_entropy, model=other))


def test_argument_validation():
    data = tiny_data()
    with pytest.raises(ValueError, match="estimator"):
        OBD(data, nn.functional.cross_entropy, estimator="newton")
    with pytest.raises(ValueError, match="probes"):
        OBD(data, nn.functional.cross_entropy, estimator="hutchinson", probes=0)
    with pytest.raises(TypeError, match="loss_fn"):
        Taylor(data, "mse")
    with pytest.raises(ValueError, match="max_batches"):
        Taylor(data, nn.functional.mse_loss, max_batches=0)
    with pytest.raises(KeyError, match="no scores"):
        Precomputed({"a": torch.ones(2)}).score(torch.ones(2), ScoreContext("b", nn.Identity(), 0))


def test_exact_obd_refuses_a_large_model():
    model = nn.Sequential(nn.Linear(200, 200))
    data = [(torch.randn(2, 200), torch.randint(0, 200, (2,)))]
    with pytest.raises(ValueError, match="hutchinson"):
        Pruner(model, 0.5, criterion=OBD(data, nn.functional.cross_entropy, estimator="exact", model=model))


def test_exports():
    assert prunekit.OBD is OBD and prunekit.Taylor is Taylor and prunekit.Precomputed is Precomputed
    assert "OBD(estimator='hutchinson', probes=7, seed=0, max_batches=None)" == repr(
        OBD([], nn.functional.mse_loss, estimator="hutchinson", probes=7))
