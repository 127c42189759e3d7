"""Diagonal curvature estimators (prunekit.methods.hessian) against independent references.

References are built from scratch here: the full Hessian of a flattened
parameter vector from ``torch.autograd.functional.hessian``, Gauss-Newton
matrices from explicit Jacobians, per-sample gradients from one
``torch.func.grad`` call per sample. Everything runs in float64 so that
agreement can be checked to ~1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from prunekit.methods import hessian as H

SEEDS = [0, 1, 2]


# -- helpers ----------------------------------------------------------------------------------


def mlp(seed: int, act: type = nn.Tanh, sizes=(5, 4, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def classification_data(seed: int, n=(7, 9, 4), d=5, k=3):
    """Batches of unequal size (the estimators must weight them by size)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, d, generator=g, dtype=torch.float64), torch.randint(0, k, (m,), generator=g)) for m in n]


def regression_data(seed: int, n=(6, 10), d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(m, k, generator=g, dtype=torch.float64))
            for m in n]


def flat_of(model: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n, _ in model.named_parameters()])


def unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def full_hessian(model: nn.Module, batches, loss_fn) -> torch.Tensor:
    """Full Hessian of the mean loss over all samples, on the flattened parameter vector."""
    X = torch.cat([x for x, _ in batches])
    Y = torch.cat([y for _, y in batches])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(lambda t: loss_fn(functional_call(model, unflatten(model, t), (X,)), Y),
                                             theta)


def reference_ggn_diag(model: nn.Module, batches, loss_fn) -> torch.Tensor:
    """diag of mean_i J_i^T H_i J_i with explicit Jacobians and output Hessians."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    total, count = torch.zeros(len(theta), len(theta), dtype=torch.float64), 0
    for X, Y in batches:
        for x, y in zip(X, Y):
            f = lambda t: functional_call(model, unflatten(model, t), (x[None],))[0]  # noqa: E731
            J = torch.autograd.functional.jacobian(f, theta)
            out = f(theta).detach()
            Ho = torch.autograd.functional.hessian(lambda o: loss_fn(o[None], y[None]), out)
            total += J.T @ Ho @ J
            count += 1
    return torch.diag(total) / count


def reference_fisher_diag(model: nn.Module, batches, loss_fn) -> torch.Tensor:
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    acc, count = torch.zeros_like(theta), 0
    for X, Y in batches:
        for x, y in zip(X, Y):
            g = torch.func.grad(lambda t: loss_fn(functional_call(model, unflatten(model, t), (x[None],)), y[None]))(theta)
            acc += g**2
            count += 1
    return acc / count


# -- exact ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
def test_exact_equals_full_hessian_diagonal(seed, act):
    model = mlp(seed, act)
    batches = classification_data(seed)
    got = H.exact_diagonal(model, batches, nn.functional.cross_entropy, chunk=7)
    ref = torch.diag(full_hessian(model, batches, nn.functional.cross_entropy))
    assert all(v.dtype == torch.float64 for v in got.values())
    torch.testing.assert_close(flat_of(model, got), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_regression_mse_and_parameter_subset(seed):
    model = mlp(seed, nn.Tanh)
    batches = regression_data(seed)
    ref = torch.diag(full_hessian(model, batches, nn.functional.mse_loss))
    params = dict(model.named_parameters())
    subset = {"2.weight": params["2.weight"], "0.bias": params["0.bias"]}
    got = H.exact_diagonal(model, batches, nn.functional.mse_loss, subset)
    full = unflatten(model, ref)
    assert set(got) == set(subset)
    for name in subset:
        torch.testing.assert_close(got[name], full[name], rtol=1e-9, atol=1e-12)


def test_exact_entries_match_full_diagonal():
    model = mlp(3, nn.Tanh)
    batches = classification_data(3)
    full = unflatten(model, torch.diag(full_hessian(model, batches, nn.functional.cross_entropy)))
    entries = {"0.weight": torch.tensor([19, 0, 7]), "2.bias": torch.tensor([2])}
    got = H.exact_diagonal_entries(model, batches, nn.functional.cross_entropy, entries)
    torch.testing.assert_close(got["0.weight"], full["0.weight"].reshape(-1)[[19, 0, 7]], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got["2.bias"], full["2.bias"][[2]], rtol=1e-9, atol=1e-12)


def test_exact_refuses_large_models_clearly():
    model = nn.Linear(200, 200)  # 40,200 parameters
    with pytest.raises(ValueError, match="40,200.*hutchinson"):
        H.exact_diagonal(model, [(torch.randn(2, 200), torch.randn(2, 200))], nn.functional.mse_loss)


def test_max_batches_bounds_the_data_used():
    model = mlp(0)
    batches = classification_data(0)
    first = H.exact_diagonal(model, batches, nn.functional.cross_entropy, max_batches=1)
    only = H.exact_diagonal(model, batches[:1], nn.functional.cross_entropy)
    for name in first:
        torch.testing.assert_close(first[name], only[name])


# -- Hutchinson ---------------------------------------------------------------------------------


def test_hutchinson_error_shrinks_as_probes_grow():
    errors = {10: [], 1000: []}
    for seed in range(4):
        model = mlp(seed, nn.Tanh)
        batches = classification_data(seed)
        exact = flat_of(model, H.exact_diagonal(model, batches, nn.functional.cross_entropy))
        for probes in errors:
            est = H.hutchinson_diagonal(model, batches, nn.functional.cross_entropy, probes=probes, seed=seed)
            errors[probes].append(float((flat_of(model, est) - exact).abs().mean() / exact.abs().mean()))
    small, large = sum(errors[10]) / 4, sum(errors[1000]) / 4
    # Error ~ 1/sqrt(probes): 100x the probes should cut it ~10x; demand at least 4x.
    assert large < small / 4, errors


def test_hutchinson_is_reproducible_and_seeded():
    model = mlp(1)
    batches = classification_data(1)
    a = H.hutchinson_diagonal(model, batches, nn.functional.cross_entropy, probes=5, seed=7)
    b = H.hutchinson_diagonal(model, batches, nn.functional.cross_entropy, probes=5, seed=7)
    c = H.hutchinson_diagonal(model, batches, nn.functional.cross_entropy, probes=5, seed=8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_hutchinson_exact_for_a_diagonal_hessian():
    # Each weight sees its own input only (orthogonal one-hot inputs): H is diagonal, so z*Hz = diag exactly.
    model = nn.Linear(4, 1, bias=False).double()
    X = torch.eye(4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    batches = [(X, torch.zeros(4, 1, dtype=torch.float64))]
    est = H.hutchinson_diagonal(model, batches, nn.functional.mse_loss, probes=1, seed=0)
    torch.testing.assert_close(est["weight"], (2 * X.diag() ** 2 / 4).reshape(1, 4))


# -- Gauss-Newton and empirical Fisher ----------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_gauss_newton_equals_exact_for_linear_least_squares(seed):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3).double()
    batches = regression_data(seed)
    gn = H.gauss_newton_diagonal(model, batches, nn.functional.mse_loss)
    ref = torch.diag(full_hessian(model, batches, nn.functional.mse_loss))
    torch.testing.assert_close(flat_of(model, gn), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_gauss_newton_matches_explicit_jacobian_reference(seed):
    model = mlp(seed, nn.Tanh)
    batches = classification_data(seed)
    gn = flat_of(model, H.gauss_newton_diagonal(model, batches, nn.functional.cross_entropy))
    torch.testing.assert_close(gn, reference_ggn_diag(model, batches, nn.functional.cross_entropy),
                               rtol=1e-9, atol=1e-12)
    assert bool((gn >= 0).all())
    # tanh has curvature of its own: the Gauss-Newton diagonal is not the Hessian's.
    exact = torch.diag(full_hessian(model, batches, nn.functional.cross_entropy))
    assert not torch.allclose(gn, exact, rtol=1e-3)


@pytest.mark.parametrize("seed", SEEDS)
def test_gauss_newton_diagonal_is_exact_for_relu_networks(seed):
    # A ReLU network is linear in each single weight (almost everywhere), so d2f/dw_k2 = 0 and the
    # Hessian's diagonal equals the Gauss-Newton diagonal (the off-diagonal entries differ).
    model = mlp(seed, nn.ReLU)
    batches = classification_data(seed)
    gn = flat_of(model, H.gauss_newton_diagonal(model, batches, nn.functional.cross_entropy))
    exact = flat_of(model, H.exact_diagonal(model, batches, nn.functional.cross_entropy))
    torch.testing.assert_close(gn, exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_fn", [nn.functional.cross_entropy, nn.functional.mse_loss], ids=["ce", "mse"])
def test_empirical_fisher_matches_per_sample_reference_and_is_nonnegative(seed, loss_fn):
    model = mlp(seed, nn.Tanh)
    batches = classification_data(seed) if loss_fn is nn.functional.cross_entropy else regression_data(seed)
    fisher = flat_of(model, H.empirical_fisher_diagonal(model, batches, loss_fn))
    torch.testing.assert_close(fisher, reference_fisher_diag(model, batches, loss_fn), rtol=1e-9, atol=1e-12)
    assert bool((fisher >= 0).all())


class _Reused(nn.Module):
    """Defeats the nn.Linear outer-product shortcut in every way we guard against."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)  # called twice per forward
        self.side = nn.Linear(4, 3)  # its weight is also used outside the module call
        self.act = nn.ReLU(inplace=True)  # modifies fc's output in place
        self.head = nn.Linear(3, 3)
        self.tied = nn.Linear(3, 3, bias=False)
        self.tied.weight = self.head.weight  # one tensor, two modules

    def forward(self, x):
        h = self.act(self.fc(x))
        h = torch.tanh(self.fc(h))
        s = self.side(h) + nn.functional.linear(h * h, self.side.weight)
        return self.tied(torch.tanh(self.head(s)))


@pytest.mark.parametrize("estimator", ["gauss_newton_diagonal", "empirical_fisher_diagonal"])
def test_per_sample_shortcut_falls_back_when_it_would_be_wrong(estimator):
    torch.manual_seed(0)
    model = _Reused().double()
    batches = classification_data(0, d=4)
    ref_fn = reference_ggn_diag if estimator == "gauss_newton_diagonal" else reference_fisher_diag
    got = getattr(H, estimator)(model, batches, nn.functional.cross_entropy)
    torch.testing.assert_close(flat_of(model, got), ref_fn(model, batches, nn.functional.cross_entropy),
                               rtol=1e-9, atol=1e-12)


def test_per_sample_estimators_on_a_conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))]
    for got, ref in ((H.gauss_newton_diagonal, reference_ggn_diag), (H.empirical_fisher_diagonal, reference_fisher_diag)):
        torch.testing.assert_close(flat_of(model, got(model, batches, nn.functional.cross_entropy)),
                                   ref(model, batches, nn.functional.cross_entropy), rtol=1e-9, atol=1e-12)


def test_fast_path_agrees_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    got = H.empirical_fisher_diagonal(model, [(x, y)], nn.functional.cross_entropy)
    ref = reference_fisher_diag(model.double(), [(x.double(), y)], nn.functional.cross_entropy)
    torch.testing.assert_close(flat_of(model, got), ref, rtol=1e-4, atol=1e-8)


# -- gradient, plumbing -------------------------------------------------------------------------


def test_mean_gradient_matches_autograd_on_all_samples():
    model = mlp(2)
    batches = classification_data(2)
    X, Y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    ref = torch.autograd.grad(nn.functional.cross_entropy(model(X), Y), list(model.parameters()))
    got = H.mean_gradient(model, batches, nn.functional.cross_entropy)
    for (name, _), r in zip(model.named_parameters(), ref):
        torch.testing.assert_close(got[name], r)


def test_estimators_leave_grads_and_training_mode_alone():
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 3)).double()
    model.train()
    batches = classification_data(0)
    results = [H.exact_diagonal(model, batches, nn.functional.cross_entropy),
               H.hutchinson_diagonal(model, batches, nn.functional.cross_entropy, probes=3),
               H.gauss_newton_diagonal(model, batches, nn.functional.cross_entropy),
               H.empirical_fisher_diagonal(model, batches, nn.functional.cross_entropy),
               H.mean_gradient(model, batches, nn.functional.cross_entropy)]
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    # Dropout was off while estimating: the exact diagonal is deterministic.
    again = H.exact_diagonal(model, batches, nn.functional.cross_entropy)
    assert all(torch.equal(again[n], results[0][n]) for n in again)


def test_bad_inputs_are_rejected():
    model = mlp(0)
    with pytest.raises(ValueError, match="no batch"):
        H.gauss_newton_diagonal(model, [], nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        H.mean_gradient(model, classification_data(0), nn.functional.cross_entropy, {"w": nn.Parameter(torch.ones(1))})
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        H.mean_gradient(model, [torch.ones(2, 5)], nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="probes"):
        H.hutchinson_diagonal(model, classification_data(0), nn.functional.cross_entropy, probes=0)
    with pytest.raises(ValueError, match="max_batches"):
        H.exact_diagonal(model, classification_data(0), nn.functional.cross_entropy, max_batches=0)


def test_unused_parameter_gets_zero_curvature():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    model.forward = lambda x: model["used"](x)  # type: ignore[method-assign]
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    for est in (H.exact_diagonal, H.gauss_newton_diagonal, H.empirical_fisher_diagonal):
        got = est(model, batches, nn.functional.cross_entropy)
        assert float(got["unused.weight"].abs().sum()) == 0.0
        assert not math.isnan(float(got["used.weight"].sum()))
