"""Granularity: turn scores into a boolean keep-mask at a target sparsity.

A granularity groups the entries of a tensor into *units* that are pruned
together (single weights, rows, blocks, N:M groups). The contract:

* :meth:`Granularity.unit_scores` reduces a score tensor to one score per unit;
* :meth:`Granularity.expand` maps a per-unit keep vector back to the tensor's shape;
* :meth:`Granularity.mask` ranks units and prunes ``k = round(n_units * sparsity)``.

Global ranking across layers concatenates unit scores, so any granularity with
comparable unit scores supports it; a granularity whose sparsity is fixed by
its pattern (N:M) overrides :meth:`mask` and sets ``supports_global = False``.
"""

from __future__ import annotations

import torch

import functools

__all__ = ["Granularity", "Unstructured", "prune_count", "lowest_k", "rank_units"]


def prune_count(n: int, sparsity: float) -> int:
    """How many of ``n`` units to prune at ``sparsity``: ``round(n * sparsity)``.

    Python's ``round`` (half to even) is used, so the count is exact and
    platform independent.

    Example:
        >>> prune_count(10, 0.25), prune_count(10, 0.35), prune_count(7, 0.5)
        (2, 4, 4)
    """
    return min(n, max(0, round(n * sparsity)))


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-vector over a 1-D ``scores`` that drops the ``k`` lowest.

    Ties are broken deterministically: among equal scores the lower index is
    pruned first (a stable sort).

    Example:
        >>> lowest_k(torch.tensor([1.0, 0.0, 1.0, 0.0]), 3)
        tensor([False, False,  True, False])
    """
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.reshape(-1), stable=True).indices
        keep[order[:k]] = False
    return keep


class Granularity:
    """Base class; the default methods implement unit ranking for any unit shape."""

    supports_global: bool = True

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """One score per unit, as a 1-D tensor."""
        raise NotImplementedError

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Map a 1-D boolean keep-vector over units to a boolean mask of ``shape``."""
        raise NotImplementedError

    def unit_alive(self, keep: torch.Tensor) -> torch.Tensor:
        """1-D boolean: which units still have a kept entry under the current mask ``keep``."""
        return self.unit_scores(keep.to(torch.float32)) != 0

    def mask(self, scores: torch.Tensor, sparsity: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean keep-mask of ``scores.shape`` pruning ``round(n_units * sparsity)`` units.

        Units already pruned in ``prior`` (a keep-mask) are pruned first, so masks
        only grow while the target sparsity does not fall.
        """
        return rank_units(self, [scores], [prior], sparsity)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Unstructured(Granularity):
    """Every weight is its own unit.

    Example:
        >>> Unstructured().mask(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.5)
        tensor([[ True, False],
                [False,  True]])
    """

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return scores.reshape(-1)

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:  # noqa: D102
        return unit_keep.reshape(shape)


def rank_units(
    granularity: Granularity,
    scores: list[torch.Tensor],
    priors: list[torch.Tensor | None],
    sparsity: float,
) -> list[torch.Tensor]:
    """Rank the units of several tensors together and return one keep-mask per tensor.

    With one tensor this is layer-wise pruning; with several it is global
    ranking: ``round(total_units * sparsity)`` units are pruned across all of
    them. Units already dead in their prior keep-mask rank below every live one.

    Example:
        >>> a, b = torch.tensor([1.0, 5.0]), torch.tensor([2.0, 3.0])
        >>> rank_units(Unstructured(), [a, b], [None, None], 0.5)
        [tensor([False,  True]), tensor([False,  True])]
    """
    units = [granularity.unit_scores(s) for s in scores]
    dtype = functools.reduce(torch.promote_types, [u.dtype for u in units])
    flat = torch.cat([u.to(dtype) for u in units])
    alive = [granularity.unit_alive(p) if p is not None else None for p in priors]
    if any(a is not None for a in alive):
        dead = torch.cat([~a if a is not None else torch.zeros(u.numel(), dtype=torch.bool, device=u.device)
                          for a, u in zip(alive, units)])
        flat = flat.masked_fill(dead, float("-inf"))
    keep = lowest_k(flat, prune_count(flat.numel(), sparsity))
    pieces = torch.split(keep, [u.numel() for u in units])
    return [granularity.expand(k, s.shape) for k, s in zip(pieces, scores)]
