"""Per-layer solvers: SparseGPT against brute-force OBS and least squares, exact N:M/sparsity, method ordering."""

from __future__ import annotations

import pytest
import torch

from prunekit.core.granularity import NM, prune_count
from prunekit.methods.oneshot.solvers import Target, magnitude_prune, relative_error, sparsegpt_prune, wanda_prune

SEEDS = [0, 1, 2, 3]


def correlated_inputs(cols: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """``(cols, tokens)`` inputs: strongly correlated features (rank-``cols/8`` structure plus noise) at
    log-normally spread scales, as transformer activations tend to be."""
    rank = max(1, cols // 8)
    mixing = torch.randn(cols, rank, generator=gen, dtype=torch.float64)
    scales = torch.exp(0.8 * torch.randn(cols, 1, generator=gen, dtype=torch.float64))
    return scales * (mixing @ torch.randn(rank, tokens, generator=gen, dtype=torch.float64)
                     + 0.5 * torch.randn(cols, tokens, generator=gen, dtype=torch.float64))


def layer_problem(seed: int, rows: int = 16, cols: int = 32, tokens: int = 256):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    X = correlated_inputs(cols, tokens, gen)
    return W, X, X @ X.T / tokens


def solve(method: str, W: torch.Tensor, H: torch.Tensor, target: Target, **kw):
    if method == "magnitude":
        return magnitude_prune(W, target)
    if method == "wanda":
        return wanda_prune(W, H, target)
    return sparsegpt_prune(W, H, target, **kw)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return torch.linalg.norm(W @ X - W_hat.double() @ X).item()


# -- quality ordering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparsity", [0.5, 0.7, "2:4", "4:8"])
@pytest.mark.parametrize("blocksize", [8, 128])
def test_sparsegpt_beats_wanda_beats_magnitude(seed, sparsity, blocksize):
    W, X, H = layer_problem(seed)
    target = Target.parse(sparsity)
    err = {m: output_error(W, solve(m, W, H, target, blocksize=blocksize)[0], X)
           for m in ("magnitude", "wanda", "sparsegpt")}
    assert err["sparsegpt"] <= err["wanda"] <= err["magnitude"], err


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_relative_error_matches_outputs(seed, method):
    W, X, H = layer_problem(seed)
    W_hat, _ = solve(method, W, H, Target.parse(0.5))
    expected = output_error(W, W_hat, X) ** 2 / torch.linalg.norm(W @ X).item() ** 2
    assert relative_error(W, W_hat, H) == pytest.approx(expected, rel=1e-6)


# -- exact structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, "2:4", "4:8", "1:4"])
def test_masks_are_exact(seed, method, sparsity):
    W, _, H = layer_problem(seed, rows=12, cols=40)
    target = Target.parse(sparsity)
    W_hat, keep = solve(method, W, H, target, blocksize=16 if target.nm is None else 8)
    assert torch.equal(W_hat == 0, ~keep)  # pruned entries are exact zeros; survivors are not
    if target.nm is None:
        assert int((~keep).sum()) == prune_count(W.numel(), target.fraction)
    else:
        n, m = target.nm.n, target.nm.m
        assert torch.all(keep.reshape(W.shape[0], -1, m).sum(-1) == n)
        # the same grouping as prunekit.NM: its mask of our keep-mask is our keep-mask
        assert torch.equal(NM(n, m).mask(keep.double(), 1 - n / m), keep)
    if method == "wanda" and target.nm is None:  # Wanda compares within rows: counts differ by at most 1
        per_row = (~keep).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparsity", [0.25, 0.5, "2:4"])
def test_wanda_matches_loop_reference(seed, sparsity):
    W, X, H = layer_problem(seed, rows=6, cols=16)
    target = Target.parse(sparsity)
    _, keep = wanda_prune(W, H, target)
    norms = [torch.linalg.norm(X[j]).item() for j in range(W.shape[1])]
    expected = torch.ones_like(keep)
    group = target.nm.m if target.nm else W.shape[1]
    drop = group - target.nm.n if target.nm else round(W.shape[1] * target.fraction)
    for r in range(W.shape[0]):
        for g in range(0, W.shape[1], group):
            scores = [(abs(W[r, j].item()) * norms[j], j) for j in range(g, g + group)]
            for _, j in sorted(scores)[:drop]:
                expected[r, j] = False
    assert torch.equal(keep, expected)


# -- SparseGPT against independent references ---------------------------------------------------------


def damped(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    return H + percdamp * torch.diagonal(H).mean() * torch.eye(len(H), dtype=H.dtype)


def obs_reference(W, H, target, blocksize, percdamp, keep=None):
    """Sequential OBS with explicit inverses: column j is pruned with ``H⁻¹`` of the columns ``j:``."""
    Hd, W = damped(H, percdamp), W.clone()
    rows, cols = W.shape
    inverses = [torch.linalg.inv(Hd[j:, j:]) for j in range(cols)]
    diag = torch.tensor([inv[0, 0].item() for inv in inverses], dtype=W.dtype)
    pruned = torch.zeros_like(W, dtype=torch.bool) if keep is None else ~keep
    for j in range(cols):
        if keep is None and target.nm is None and j % blocksize == 0:
            end = min(j + blocksize, cols)
            k = prune_count(rows * end, target.fraction) - prune_count(rows * j, target.fraction)
            saliency = (W[:, j:end] ** 2 / diag[j:end]).reshape(-1)
            for flat in sorted(range(saliency.numel()), key=lambda i: saliency[i].item())[:k]:
                pruned[flat // (end - j), j + flat % (end - j)] = True
        if keep is None and target.nm is not None and j % target.nm.m == 0:
            m = target.nm.m
            for r in range(rows):
                saliency = [(W[r, c].item() ** 2 / diag[c].item(), c) for c in range(j, j + m)]
                for _, c in sorted(saliency)[: m - target.nm.n]:
                    pruned[r, c] = True
        for r in torch.nonzero(pruned[:, j]).flatten().tolist():
            # OBS: remove w_q and move the remaining weights by -w_q/[H⁻¹]_qq · H⁻¹_{q,:}
            W[r, j:] -= W[r, j] / inverses[j][0, 0] * inverses[j][0, :]
    return W, ~pruned


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparsity,blocksize", [(0.5, 8), (0.5, 4), (0.375, 3), ("2:4", 8), ("2:4", 4), ("1:2", 2)])
def test_sparsegpt_matches_brute_force_obs(seed, sparsity, blocksize):
    W, _, H = layer_problem(seed, rows=2, cols=8, tokens=40)
    target = Target.parse(sparsity)
    W_hat, keep = sparsegpt_prune(W, H, target, blocksize=blocksize, percdamp=0.01)
    W_ref, keep_ref = obs_reference(W, H, target, blocksize, 0.01)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(W_hat.double(), W_ref.masked_fill(~keep_ref, 0.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("blocksize", [8, 3])
def test_sparsegpt_fixed_mask_matches_brute_force_obs(seed, blocksize):
    W, _, H = layer_problem(seed, rows=2, cols=8, tokens=40)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed + 100)) > 0.5
    W_hat, keep_out = sparsegpt_prune(W, H, Target.parse(0.5), blocksize=blocksize, keep=keep)
    W_ref, _ = obs_reference(W, H, Target.parse(0.5), blocksize, 0.01, keep=keep)
    assert torch.equal(keep_out, keep)
    torch.testing.assert_close(W_hat.double(), W_ref.masked_fill(~keep, 0.0), rtol=0, atol=1e-6)


def least_squares(W: torch.Tensor, X: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """min ‖(w − ŵ)X̃‖, ŵ zero where pruned, X̃ = [X, √λ·I] (the damped layer-wise problem), per row."""
    X_aug = torch.cat([X, lam ** 0.5 * torch.eye(X.shape[0], dtype=X.dtype)], dim=1)
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        free = keep[r]
        sol = torch.linalg.lstsq(X_aug[free].T, (W[r] @ X_aug)[:, None]).solution
        out[r, free] = sol[:, 0]
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_sparsegpt_fixed_mask_is_least_squares_optimal(seed):
    # Columns are frozen once passed, so the sequential solution is the joint least-squares optimum
    # exactly when each row's pruned columns precede its kept ones; here rows prune prefixes of 2..5.
    W, X, _ = layer_problem(seed, rows=4, cols=8, tokens=40)
    X = X / 40 ** 0.5  # H = X Xᵀ as passed to the solver
    H = X @ X.T
    keep = torch.arange(8)[None, :] >= torch.tensor([2, 3, 4, 5])[:, None]
    W_hat, _ = sparsegpt_prune(W, H, Target.parse(0.5), blocksize=8, percdamp=0.01, keep=keep)
    lam = 0.01 * torch.diagonal(H).mean().item()
    torch.testing.assert_close(W_hat.double(), least_squares(W, X, keep, lam), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_least_squares_bounds_sparsegpt_for_any_mask(seed):
    W, X, H = layer_problem(seed, rows=4, cols=8, tokens=40)
    W_hat, keep = sparsegpt_prune(W, H, Target.parse(0.5), blocksize=8, percdamp=0.0)
    best = least_squares(W, X, keep, 0.0)
    assert output_error(W, best, X) <= output_error(W, W_hat, X) * (1 + 1e-9)
    assert output_error(W, W_hat, X) < output_error(W, W.masked_fill(~keep, 0.0), X)  # the update helps


# -- arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,error", [("2-4", ValueError), ("4:2", ValueError), (1.0, ValueError),
                                         (-0.1, ValueError), (True, TypeError), (None, TypeError),
                                         (NM(2, 4, dim=0), ValueError)])
def test_bad_targets(value, error):
    with pytest.raises(error):
        Target.parse(value)


def test_bad_solver_arguments():
    W, _, H = layer_problem(0, rows=2, cols=8)
    with pytest.raises(ValueError, match="blocksize must be a multiple"):
        sparsegpt_prune(W, H, Target.parse("2:4"), blocksize=6)
    with pytest.raises(ValueError, match="percdamp"):
        sparsegpt_prune(W, H, Target.parse(0.5), percdamp=-1)
    with pytest.raises(ValueError, match="H must be"):
        wanda_prune(W, H[:4, :4], Target.parse(0.5))
    with pytest.raises(ValueError, match="multiple of 8"):
        magnitude_prune(W[:, :6], Target.parse("4:8"))
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(W, -torch.eye(8, dtype=torch.float64) - 1, Target.parse(0.5), percdamp=0.0)
