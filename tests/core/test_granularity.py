"""Granularity: exact counts, deterministic ties, global ranking and priors against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_helpers import reference_keep
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.core.granularity import Granularity, Unstructured, lowest_k, prune_count, rank_units

pytestmark = pytest.mark.usefixtures("single_thread")


class Rows(Granularity):
    """A custom granularity defined here (not in prunekit): whole output rows, scored by mean score."""

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.reshape(scores.shape[0], -1).mean(dim=1)

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return unit_keep.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


def ref_rows(scores: list[torch.Tensor], sparsity: float, priors=None):
    """Reference for Rows: rank row means (float64 numpy) with dead rows first, then score, then index."""
    row_scores = [torch.from_numpy(s.double().numpy().reshape(s.shape[0], -1).mean(axis=1)) for s in scores]
    row_priors = None
    if priors is not None:
        row_priors = [None if p is None else p.reshape(p.shape[0], -1).any(dim=1) for p in priors]
    keeps = reference_keep(row_scores, sparsity, row_priors)
    return [np.broadcast_to(k.reshape(-1, *([1] * (s.dim() - 1))), tuple(s.shape)) for k, s in zip(keeps, scores)]


# --------------------------------------------------------------------------------------
# prune_count / lowest_k
# --------------------------------------------------------------------------------------


def test_prune_count_is_python_round_of_n_times_s():
    for n in [0, 1, 2, 3, 7, 10, 11, 99, 100, 1000, 12345]:
        for s in np.linspace(0.0, 0.999, 113).tolist() + [0.05, 0.15, 0.25, 0.35, 0.45, 0.5, 0.55, 0.75, 0.85, 0.95]:
            assert prune_count(n, s) == round(n * s), (n, s)


def test_prune_count_half_to_even_examples():
    # round() is half-to-even: these are the cases where it differs from floor(x + 0.5)
    assert prune_count(10, 0.25) == 2   # 2.5 -> 2
    assert prune_count(2, 0.75) == 2    # 1.5 -> 2
    assert prune_count(10, 0.45) == 4   # 4.5 -> 4
    assert prune_count(4, 0.625) == 2   # 2.5 -> 2
    assert prune_count(7, 0.5) == 4     # 3.5 -> 4


def test_lowest_k_breaks_ties_by_lowest_index():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    assert lowest_k(scores, 0).tolist() == [True] * 6
    assert lowest_k(scores, 2).tolist() == [True, False, True, False, True, True]
    assert lowest_k(scores, 4).tolist() == [False, False, True, False, False, True]
    assert lowest_k(scores, 6).tolist() == [False] * 6


@pytest.mark.parametrize("n", [1, 5, 64, 1000, 4097])
def test_all_equal_scores_prune_lowest_flat_indices_first(n):
    for s in (0.1, 0.5, 0.9):
        k = round(n * s)
        keep = Unstructured().mask(torch.full((n,), 0.25), s)
        assert keep.tolist() == [False] * k + [True] * (n - k)
    # 2-D: flat (row-major) order
    keep = Unstructured().mask(torch.ones(3, 4), 0.5)
    assert keep.tolist() == [[False] * 4, [False, False, True, True], [True] * 4]


def test_ties_are_deterministic_across_repeats_and_large_tensors():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (50_000,), generator=g).float()  # massive ties
    first = Unstructured().mask(scores, 0.37)
    for _ in range(3):
        assert torch.equal(Unstructured().mask(scores.clone(), 0.37), first)
    assert np.array_equal(first.numpy(), reference_keep([scores], 0.37)[0])


# --------------------------------------------------------------------------------------
# Unstructured: layer-wise and global against the reference
# --------------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (4, 5), (3, 4, 5), (2, 3, 2, 2), (2, 1, 3, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.66, 0.9, 0.99])
def test_unstructured_mask_matches_reference(shape, seed, sparsity):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g).abs()
    scores[tuple(0 for _ in shape)] = scores.reshape(-1)[-1]  # at least one tie
    keep = Unstructured().mask(scores, sparsity)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    n = scores.numel()
    assert int((~keep).sum()) == round(n * sparsity)
    assert np.array_equal(keep.numpy(), reference_keep([scores], sparsity)[0])


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 0.999),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_global_ranking_matches_reference(sizes, sparsity, levels, seed):
    g = torch.Generator().manual_seed(seed)
    # few distinct levels so that ties across tensors are common
    scores = [torch.randint(0, levels, (n,), generator=g).float() * 0.5 for n in sizes]
    keeps = rank_units(Unstructured(), scores, [None] * len(scores), sparsity)
    ref = reference_keep(scores, sparsity)
    total = sum(sizes)
    assert sum(int((~k).sum()) for k in keeps) == round(total * sparsity)
    for k, r in zip(keeps, ref):
        assert np.array_equal(k.numpy(), r)


def test_global_ranking_differs_from_layerwise_when_scales_differ():
    small = torch.linspace(0.01, 0.1, 10)
    large = torch.linspace(1.0, 10.0, 10)
    keep_small, keep_large = rank_units(Unstructured(), [small, large], [None, None], 0.5)
    assert int((~keep_small).sum()) == 10 and int((~keep_large).sum()) == 0
    assert int((~Unstructured().mask(small, 0.5)).sum()) == 5
    assert int((~Unstructured().mask(large, 0.5)).sum()) == 5


def test_global_ranking_promotes_mixed_dtypes():
    a = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float16)
    b = torch.tensor([1.0, 0.25, 4.0], dtype=torch.float32)
    ka, kb = rank_units(Unstructured(), [a, b], [None, None], 0.5)
    assert ka.tolist() == [False, True, True] and kb.tolist() == [False, False, True]


# --------------------------------------------------------------------------------------
# Priors: dead units go first; masks only grow when the target does not fall
# --------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(n=st.integers(2, 80), s1=st.floats(0.0, 0.95), s2=st.floats(0.0, 0.95), seed=st.integers(0, 10**6))
def test_priors_match_reference_and_masks_only_grow(n, s1, s2, seed):
    g = torch.Generator().manual_seed(seed)
    first = Unstructured().mask(torch.rand(n, generator=g), s1)
    new_scores = torch.rand(n, generator=g)  # unrelated scores: dead units must still go first
    second = Unstructured().mask(new_scores, s2, prior=first)
    assert np.array_equal(second.numpy(), reference_keep([new_scores], s2, [first])[0])
    assert int((~second).sum()) == round(n * s2)
    if round(n * s2) >= round(n * s1):
        assert not (second & ~first).any(), "a pruned unit came back although the target did not fall"


def test_prior_dead_units_pruned_even_if_their_scores_are_highest():
    prior = torch.tensor([True, False, True, False])
    scores = torch.tensor([1.0, 9.0, 2.0, 8.0])
    assert Unstructured().mask(scores, 0.5, prior=prior).tolist() == [True, False, True, False]
    assert Unstructured().mask(scores, 0.75, prior=prior).tolist() == [False, False, True, False]


def test_global_priors_mixed_with_none():
    a, b = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    prior_a = torch.tensor([True, False, True])
    ka, kb = rank_units(Unstructured(), [a, b], [prior_a, None], 3 / 7)
    assert ka.tolist() == [True, False, True] and kb.tolist() == [False, False, True, True]
    ra, rb = reference_keep([a, b], 3 / 7, [prior_a, None])
    assert np.array_equal(ka.numpy(), ra) and np.array_equal(kb.numpy(), rb)


# --------------------------------------------------------------------------------------
# The interface admits other granularities (a row granularity defined in this file)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4), (5, 2, 3), (8, 1)], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.8])
def test_custom_row_granularity_layerwise(shape, sparsity):
    g = torch.Generator().manual_seed(sum(shape))
    scores = torch.rand(shape, generator=g)
    keep = Rows().mask(scores, sparsity)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    rows_pruned = int((~keep.reshape(shape[0], -1)).all(dim=1).sum())
    assert rows_pruned == round(shape[0] * sparsity)
    # whole rows only
    flat = keep.reshape(shape[0], -1)
    assert bool(((flat.all(dim=1)) | (~flat).all(dim=1)).all())
    assert np.array_equal(keep.numpy(), ref_rows([scores], sparsity)[0])


def test_custom_row_granularity_global_and_priors():
    g = torch.Generator().manual_seed(11)
    scores = [torch.rand(4, 3, generator=g), torch.rand(6, 5, generator=g) * 0.5, torch.rand(3, 2, 2, generator=g)]
    keeps = rank_units(Rows(), scores, [None] * 3, 0.4)
    assert sum(int((~k.reshape(k.shape[0], -1)).all(1).sum()) for k in keeps) == round(13 * 0.4)
    for k, r in zip(keeps, ref_rows(scores, 0.4)):
        assert np.array_equal(k.numpy(), r)
    # second round, new scores, priors: dead rows first, masks only grow
    new = [torch.rand(s.shape, generator=g) for s in scores]
    keeps2 = rank_units(Rows(), new, keeps, 0.6)
    for k2, k1, r in zip(keeps2, keeps, ref_rows(new, 0.6, keeps)):
        assert np.array_equal(k2.numpy(), r)
        assert not (k2 & ~k1).any()


def test_default_unit_alive_uses_unit_scores():
    keep = torch.tensor([[True, False], [False, False], [False, True]])
    assert Rows().unit_alive(keep).tolist() == [True, False, True]
    assert Unstructured().unit_alive(keep).tolist() == keep.reshape(-1).tolist()


def test_base_granularity_is_abstract():
    with pytest.raises(NotImplementedError):
        Granularity().unit_scores(torch.ones(2))
    with pytest.raises(NotImplementedError):
        Granularity().expand(torch.ones(2, dtype=torch.bool), torch.Size([2]))
    assert Granularity.supports_global is True and repr(Unstructured()) == "Unstructured()"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_lowest_k_selection_equals_a_stable_sort_with_ties_and_minus_inf(dtype):
    # lowest_k selects with kthvalue; the order it must reproduce is numpy's stable argsort.
    rng = np.random.default_rng(7)
    for _ in range(400):
        n = int(rng.integers(1, 50))
        k = int(rng.integers(0, n + 1))
        values = rng.integers(0, 4, n).astype(np.float64)  # few distinct values: many ties
        values[rng.random(n) < 0.2] = -np.inf  # units already dead rank below every live one
        scores = torch.tensor(values, dtype=dtype)
        expected = np.ones(n, dtype=bool)
        expected[np.argsort(scores.double().numpy(), kind="stable")[:k]] = False
        assert lowest_k(scores, k).tolist() == expected.tolist()
