"""N:M and block granularities: exact patterns against brute-force numpy references, and through the Pruner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_helpers import reference_keep
from torch import nn

import prunekit
from prunekit import NM, Blocks, ConstantSparsity, Pruner
from prunekit.core.granularity import rank_units

pytestmark = pytest.mark.usefixtures("single_thread")

SEEDS = [0, 1, 2]


# --------------------------------------------------------------------------------------
# References (numpy, float64, explicit loops; independent of the code under test)
# --------------------------------------------------------------------------------------


def matrix(t) -> np.ndarray:
    """The documented 2-D view: (shape[0], prod(shape[1:])) row-major; 1-D as one row."""
    a = np.asarray(torch.as_tensor(t).detach().cpu().numpy())
    return a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)


def ref_nm(scores: torch.Tensor, n: int, m: int, prior=None, columns: bool = False) -> np.ndarray:
    """Per group of m consecutive entries (of a row, or of a column): prune the m-n lowest by
    (dead first, score, index), and never revive an entry dead in the prior."""
    s = matrix(scores.double())
    alive = np.ones(s.shape, dtype=bool) if prior is None else matrix(prior).astype(bool)
    if columns:
        s, alive = s.T, alive.T
    keep = np.ones(s.shape, dtype=bool)
    for r in range(s.shape[0]):
        for g in range(0, s.shape[1], m):
            idx = np.arange(g, g + m)
            dead = ~alive[r, idx]
            order = np.lexsort((idx, np.where(dead, -np.inf, s[r, idx]), ~dead))
            keep[r, idx[order[: m - n]]] = False
            keep[r, idx[dead]] = False
    if columns:
        keep = keep.T
    return keep.reshape(tuple(scores.shape))


def block_grid(shape, block) -> tuple[int, int]:
    rows, cols = matrix(torch.zeros(shape)).shape
    return rows // block[0], cols // block[1]


def ref_block_scores(scores: torch.Tensor, block) -> torch.Tensor:
    """Block sums, row-major over the block grid, by explicit loops in float64."""
    s = matrix(scores.double())
    bh, bw = block
    br, bc = block_grid(scores.shape, block)
    out = np.array([[s[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].sum() for j in range(bc)] for i in range(br)])
    return torch.from_numpy(out.reshape(-1))


def ref_blocks(scores: list[torch.Tensor], block, sparsity: float, priors=None) -> list[np.ndarray]:
    """Rank block sums (dead blocks = no kept entry in the prior, first) and broadcast back."""
    units = [ref_block_scores(s, block) for s in scores]
    unit_priors = None
    if priors is not None:
        unit_priors = [None if p is None else torch.from_numpy(
            ref_block_scores(p.to(torch.float64), block).numpy() > 0) for p in priors]
    keeps = reference_keep(units, sparsity, unit_priors)
    out = []
    for k, s in zip(keeps, scores):
        br, bc = block_grid(s.shape, block)
        full = np.kron(k.reshape(br, bc).astype(int), np.ones(block, dtype=int)).astype(bool)
        out.append(full.reshape(tuple(s.shape)))
    return out


def assert_nm_rows(keep: torch.Tensor, n: int, m: int, exact: bool = True) -> None:
    """Every group of m consecutive entries of each row of the 2-D view keeps n (or at most n)."""
    per_group = matrix(keep).reshape(-1, m).sum(axis=1)
    if exact:
        assert (per_group == n).all(), per_group
    else:
        assert (per_group <= n).all(), per_group


# --------------------------------------------------------------------------------------
# N:M
# --------------------------------------------------------------------------------------

NM_SHAPES = [(8, 12), (5, 16), (3, 8), (6, 2, 2, 4), (4, 3, 4, 2), (24,)]
PATTERNS = [(2, 4), (4, 8), (1, 4), (1, 2), (3, 4)]


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("seed", SEEDS)
def test_nm_matches_reference_and_is_exact(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    for shape in NM_SHAPES:
        if matrix(torch.zeros(shape)).shape[1] % m:
            continue
        scores = torch.randn(shape, generator=gen)
        keep = NM(n, m).mask(scores, 1 - n / m)
        assert keep.dtype == torch.bool and keep.shape == scores.shape
        np.testing.assert_array_equal(keep.numpy(), ref_nm(scores, n, m), err_msg=str(shape))
        assert_nm_rows(keep, n, m)


@pytest.mark.parametrize("seed", SEEDS)
def test_nm_along_columns(seed):
    gen = torch.Generator().manual_seed(seed)
    for shape in [(8, 5), (4, 3, 3), (12, 7)]:
        scores = torch.randn(shape, generator=gen)
        for dim in (0, -2):
            keep = NM(2, 4, dim=dim).mask(scores, 0.5)
            expected = ref_nm(scores, 2, 4, columns=True)
            np.testing.assert_array_equal(keep.numpy(), expected)
            assert (matrix(keep).T.reshape(-1, 4).sum(axis=1) == 2).all()
    assert NM(2, 4, dim=1).mask(torch.arange(8.0).reshape(1, 8), 0.5).tolist() == \
        NM(2, 4).mask(torch.arange(8.0).reshape(1, 8), 0.5).tolist()


def test_nm_linear_groups_are_four_consecutive_inputs_of_a_row():
    # The 2:4 layout of sparse tensor cores / to_sparse_semi_structured: w[r, 4g:4g+4] keeps 2.
    w = torch.tensor([[9.0, 1.0, 8.0, 2.0, 0.1, 0.3, 0.2, 0.4],
                      [1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0]])
    keep = NM(2, 4).mask(w, 0.5)
    assert keep.tolist() == [[True, False, True, False, False, True, False, True],
                             [False, False, True, True, True, True, False, False]]


def test_nm_conv_groups_follow_the_flattened_row():
    # Conv (out=1, in=2, kh=1, kw=4): the row is in-major, kernel position fastest.
    w = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 1, 4)
    keep = NM(1, 4).mask(w, 0.75)
    assert keep.reshape(-1).tolist() == [True, False, False, False, False, False, False, True]


def test_nm_ties_prune_the_lower_index_first():
    keep = NM(2, 4).mask(torch.ones(3, 8), 0.5)
    assert keep.tolist() == [[False, False, True, True] * 2] * 3
    keep = NM(1, 4).mask(torch.tensor([[2.0, 1.0, 2.0, 1.0]]), 0.75)
    assert keep.tolist() == [[False, False, True, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("seed", SEEDS)
def test_nm_prior_pruned_entries_go_first_and_stay_pruned(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    for shape in [(8, 16), (4, 2, 2, 4)]:
        scores = torch.randn(shape, generator=gen)
        prior = torch.rand(shape, generator=gen) < 0.6
        keep = NM(n, m).mask(scores, 1 - n / m, prior)
        np.testing.assert_array_equal(keep.numpy(), ref_nm(scores, n, m, prior))
        assert not (keep & ~prior).any(), "a pruned entry was revived"
        # Each group keeps min(n, entries alive in the prior): exactly n unless the prior pruned more.
        alive = matrix(prior).reshape(-1, m).sum(axis=1)
        np.testing.assert_array_equal(matrix(keep).reshape(-1, m).sum(axis=1), np.minimum(n, alive))


def test_nm_prior_from_a_previous_nm_mask_is_a_fixed_point():
    scores = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    first = NM(2, 4).mask(scores, 0.5)
    again = NM(2, 4).mask(torch.randn(6, 16, generator=torch.Generator().manual_seed(4)), 0.5, first)
    assert torch.equal(first, again)


def test_nm_sparsity_is_fixed_by_the_pattern():
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert NM(2, 4).mask(scores, 0.0).all()
    assert NM(2, 4).mask(scores, 0.0, torch.zeros(4, 8, dtype=torch.bool)).all()
    assert torch.equal(NM(2, 4).mask(scores, 0.5 + 1e-12), NM(2, 4).mask(scores, 0.5))
    assert torch.equal(NM(1, 4).mask(scores, 1 - 1 / 4), NM(1, 4).mask(scores, 0.75))
    for bad in [0.25, 0.5 + 1e-6, 0.9, float("nan")]:
        with pytest.raises(ValueError, match=r"NM\(2, 4\).*1 - n/m = 0\.5"):
            NM(2, 4).mask(scores, bad)
    assert NM(2, 4).sparsity == 0.5 and NM(4, 8).sparsity == 0.5 and NM(1, 4).sparsity == 0.75


def test_nm_rejects_tensors_not_divisible_into_groups():
    with pytest.raises(ValueError, match=r"shape \(4, 6\).*multiple of m=4"):
        NM(2, 4).mask(torch.randn(4, 6), 0.5)
    with pytest.raises(ValueError, match=r"shape \(8, 3, 3, 3\).*27.*multiple of m=4"):
        NM(2, 4).mask(torch.randn(8, 3, 3, 3), 0.0)  # validated even when nothing is pruned
    with pytest.raises(ValueError, match=r"shape \(6, 8\).*per column"):
        NM(2, 4, dim=0).mask(torch.randn(6, 8), 0.5)


def test_nm_units_are_single_weights_and_no_global_ranking():
    g = NM(2, 4)
    assert g.supports_global is False
    s = torch.randn(3, 4)
    assert torch.equal(g.unit_scores(s), s.reshape(-1))
    keep = torch.rand(3, 4) < 0.5
    assert torch.equal(g.expand(keep.reshape(-1), s.shape), keep)
    assert torch.equal(g.unit_alive(keep), keep.reshape(-1))
    assert repr(g) == "NM(2, 4)" and repr(NM(1, 2, dim=0)) == "NM(1, 2, dim=0)"
    assert NM(2, 4) == NM(2, 4, dim=1) and NM(2, 4) != NM(2, 4, dim=0) and NM(2, 4) != NM(4, 8)


# --------------------------------------------------------------------------------------
# N:M through the Pruner
# --------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)  # (8, 4, 3, 3): rows of 36
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def test_pruner_nm_2_4_holds_through_adam_training():
    torch.manual_seed(0)
    model = ConvNet()
    weights = {"conv.weight", "fc1.weight", "fc2.weight"}
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = Pruner(model, ConstantSparsity(0.5, frequency=3), granularity=NM(2, 4), optimizer=opt)
    assert weights <= set(pruner.names)
    for name in weights:
        keep = pruner.masks[name]
        np.testing.assert_array_equal(keep.numpy(), ref_nm(initial[name].abs(), 2, 4), err_msg=name)
    first = pruner.masks
    x, y = torch.randn(16, 4, 4, 4), torch.randint(0, 4, (16,))
    for _ in range(7):  # crosses mask updates at steps 3 and 6
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        params = dict(model.named_parameters())
        for name in weights:
            w = params[name].detach()
            assert_nm_rows(w != 0, 2, 4, exact=True)  # nonzero exactly where kept
            assert_nm_rows(pruner.masks[name], 2, 4)
            assert torch.equal(pruner.masks[name], first[name])
    assert not torch.equal(model.fc1.weight, initial["fc1.weight"] * first["fc1.weight"])  # it did train


def test_pruner_nm_refuses_global_ranking_and_other_targets():
    with pytest.raises(ValueError, match="global"):
        Pruner(nn.Linear(8, 4), 0.5, granularity=NM(2, 4), ranking="global")
    with pytest.raises(ValueError, match=r"NM\(2, 4\).*ConstantSparsity\(0\.5\)"):
        Pruner(nn.Linear(8, 4), 0.3, granularity=NM(2, 4))
    with pytest.raises(ValueError, match=r"cannot prune 'weight' with NM\(2, 4\).*shape \(4, 6\)"):
        Pruner(nn.Linear(6, 4), 0.5, granularity=NM(2, 4))
    model = nn.Linear(8, 4)
    pruner = Pruner(model, 0.75, granularity=NM(1, 4))
    assert_nm_rows(model.weight != 0, 1, 4)
    pruner.update_masks(0.0)
    assert pruner.masks["weight"].all()


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------

BLOCK_CASES = [((1, 4), [(8, 12), (5, 16), (4, 2, 2, 2)]),
               ((4, 1), [(8, 12), (16, 3), (4, 2, 3, 1)]),
               ((2, 2), [(6, 8), (4, 2, 2, 1)]),
               ((16, 1), [(32, 5), (16, 2, 3, 3)])]
SPARSITIES = [0.0, 0.1, 0.25, 0.5, 0.7, 0.95]


@pytest.mark.parametrize("block,shapes", BLOCK_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("seed", SEEDS)
def test_blocks_layerwise_matches_reference(block, shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    g = Blocks(block)
    for shape in shapes:
        scores = torch.randn(shape, generator=gen)
        br, bc = block_grid(shape, block)
        torch.testing.assert_close(g.unit_scores(scores).double(), ref_block_scores(scores, block),
                                   rtol=1e-5, atol=1e-5)
        for s in SPARSITIES:
            keep = g.mask(scores, s)
            np.testing.assert_array_equal(keep.numpy(), ref_blocks([scores], block, s)[0], err_msg=f"{shape} {s}")
            per_block = ref_block_scores(keep.double(), block).numpy()
            assert set(per_block.tolist()) <= {0.0, float(block[0] * block[1])}, "a block was split"
            assert (per_block == 0).sum() == round(br * bc * s)


@pytest.mark.parametrize("block", [(1, 4), (4, 1), (2, 2)])
@pytest.mark.parametrize("seed", SEEDS)
def test_blocks_global_ranking_and_priors_match_reference(block, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 8), (4, 2, 2, 4), (12, 4)]
    scores = [torch.randn(sh, generator=gen) * (i + 1) for i, sh in enumerate(shapes)]
    g = Blocks(block)
    for s in [0.3, 0.5, 0.8]:
        got = rank_units(g, scores, [None] * 3, s)
        for k, r in zip(got, ref_blocks(scores, block, s)):
            np.testing.assert_array_equal(k.numpy(), r)
    # Priors: a block with any kept entry is alive; dead blocks are pruned first.
    priors = [g.expand(torch.rand(g.unit_scores(sc).numel(), generator=gen) < 0.7, sc.shape).clone() for sc in scores]
    priors[0].view(-1)[0] = True  # a partly kept block still counts as alive
    got = rank_units(g, scores, priors, 0.5)
    for k, r in zip(got, ref_blocks(scores, block, 0.5, priors)):
        np.testing.assert_array_equal(k.numpy(), r)


def test_blocks_unit_alive_is_any_entry_kept():
    g = Blocks((2, 2))
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[0, 1] = True   # block 0
    keep[3, 3] = True   # block 3
    keep[2:4, 0:2] = True  # block 2, fully
    assert g.unit_alive(keep).tolist() == [True, False, True, True]


def test_blocks_ties_prune_the_lower_block_first():
    keep = Blocks((1, 2)).mask(torch.ones(2, 4), 0.5)
    assert keep.tolist() == [[False, False, False, False], [True, True, True, True]]
    keep = Blocks((2, 1)).mask(torch.ones(4, 2), 0.25)
    assert keep.tolist() == [[False, True], [False, True], [True, True], [True, True]]


def test_blocks_rejects_shapes_not_divisible():
    with pytest.raises(ValueError, match=r"Blocks\(\(1, 4\)\).*shape \(4, 6\)"):
        Blocks((1, 4)).mask(torch.randn(4, 6), 0.5)
    with pytest.raises(ValueError, match=r"shape \(6, 3, 3, 3\).*\(6, 27\)"):
        Blocks((4, 1)).mask(torch.randn(6, 3, 3, 3), 0.5)


def test_pruner_blocks_layerwise_and_global():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    pruner = Pruner(model, 0.5, granularity=Blocks((4, 1)))
    assert set(pruner.names) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(pruner.masks[name].numpy(), ref_blocks([w.abs()], (4, 1), 0.5)[0])
    pruner.remove()

    model.load_state_dict({**model.state_dict(), **weights})
    pruner = Pruner(model, 0.6, granularity=Blocks((1, 4)), ranking="global")
    names = sorted(weights)
    ref = ref_blocks([weights[n].abs() for n in names], (1, 4), 0.6)
    for name, r in zip(names, ref):
        np.testing.assert_array_equal(pruner.masks[name].numpy(), r, err_msg=name)
        assert (dict(model.named_parameters())[name] == 0).numpy().tolist() == (~r).tolist()


# --------------------------------------------------------------------------------------
# Arguments and exports
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((4, 4), {}, ValueError, "n must be < m"),
    ((5, 4), {}, ValueError, "n must be < m"),
    ((0, 4), {}, ValueError, "NM: n must be >= 1"),
    ((1, 1), {}, ValueError, "NM: m must be >= 2"),
    ((2.0, 4), {}, TypeError, "NM: n must be an integer"),
    ((2, "4"), {}, TypeError, "NM: m must be an integer"),
    ((True, 4), {}, TypeError, "NM: n must be an integer"),
    ((2, 4), {"dim": 2}, ValueError, "NM: dim must be"),
    ((2, 4), {"dim": None}, TypeError, "NM: dim must be an integer"),
])
def test_nm_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NM(*args, **kwargs)


@pytest.mark.parametrize("shape,exc,match", [
    ((0, 4), ValueError, r"Blocks: shape\[0\] must be >= 1"),
    ((4, -1), ValueError, r"Blocks: shape\[1\] must be >= 1"),
    ((1.5, 2), TypeError, r"Blocks: shape\[0\] must be an integer"),
    ((1,), TypeError, "Blocks: shape must be a pair"),
    ((1, 2, 3), TypeError, "Blocks: shape must be a pair"),
    (4, TypeError, "Blocks: shape must be a pair"),
    ("ab", TypeError, "Blocks: shape must be a pair"),
])
def test_blocks_bad_arguments(shape, exc, match):
    with pytest.raises(exc, match=match):
        Blocks(shape)


def test_exports_and_repr():
    assert prunekit.NM is NM and prunekit.Blocks is Blocks
    assert {"NM", "Blocks"} <= set(prunekit.__all__)
    assert repr(Blocks([4, 1])) == "Blocks((4, 1))" and Blocks((4, 1)) == Blocks([4, 1]) != Blocks((1, 4))
    assert Blocks((1, 4)).supports_global


# --------------------------------------------------------------------------------------
# Channels
# --------------------------------------------------------------------------------------

def ref_channels(scores: list, sparsity: float, priors: list | None = None) -> list[np.ndarray]:
    """Channel masks by brute force: rank row means (dead rows first, ties by index) over all tensors."""
    means = [torch.as_tensor(s).double().reshape(s.shape[0] if s.dim() > 1 else 1, -1).mean(dim=1) for s in scores]
    row_priors = None if priors is None else [
        torch.as_tensor(p).reshape(p.shape[0] if p.dim() > 1 else 1, -1).any(dim=1) for p in priors]
    rows = reference_keep(means, sparsity, row_priors)
    return [np.broadcast_to(r.reshape(-1, 1), (r.size, s[0].numel() if s.dim() > 1 else s.numel())).reshape(s.shape)
            for r, s in zip(rows, scores)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(8, 12), (16, 3, 3, 3), (5,), (7, 1)])
def test_channels_layerwise_matches_reference(shape, seed):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    g = prunekit.Channels()
    for s in SPARSITIES:
        keep = g.mask(scores, s)
        np.testing.assert_array_equal(keep.numpy(), ref_channels([scores], s)[0], err_msg=f"{shape} {s}")
        rows = keep.reshape(keep.shape[0] if keep.dim() > 1 else 1, -1)
        assert (rows.all(dim=1) | ~rows.any(dim=1)).all(), "a channel was split"
        assert int((~rows.any(dim=1)).sum()) == round(rows.shape[0] * s)


@pytest.mark.parametrize("seed", SEEDS)
def test_channels_global_ranking_uses_means_and_priors(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(8, 4, generator=gen), torch.rand(6, 2, 3, 3, generator=gen) * 2, torch.rand(4, 50, generator=gen)]
    g = prunekit.Channels()
    for s in [0.25, 0.5, 0.75]:
        for got, ref in zip(rank_units(g, scores, [None] * 3, s), ref_channels(scores, s)):
            np.testing.assert_array_equal(got.numpy(), ref)
    priors = [g.expand(torch.rand(sc.shape[0], generator=gen) < 0.6, sc.shape).clone() for sc in scores]
    for got, ref in zip(rank_units(g, scores, priors, 0.5), ref_channels(scores, 0.5, priors)):
        np.testing.assert_array_equal(got.numpy(), ref)


def test_pruner_channels_gradual_keeps_whole_channels_through_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = prunekit.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=20, frequency=5)
    pruner = Pruner(model, schedule, granularity=prunekit.Channels(), optimizer=opt)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    for step in range(25):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                rows = (p.detach() != 0).reshape(p.shape[0], -1)
                assert (rows.all(dim=1) | ~rows.any(dim=1)).all(), (step, name)
    params = dict(model.named_parameters())
    for name, zero_rows in {"0.weight": 4, "3.weight": 8, "5.weight": 2}.items():  # round(rows * 0.5)
        w = params[name].detach()
        assert int((w.reshape(w.shape[0], -1) == 0).all(dim=1).sum()) == zero_rows, name
    assert pruner.report().to_dict()["sparsity"] == pytest.approx(0.5)
