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

import functools
import math
from typing import Any, Sequence

import torch

from .._validate import check_int

__all__ = ["Granularity", "Unstructured", "NM", "Blocks", "Channels", "prune_count", "lowest_k", "rank_units"]


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
    pruned first, exactly as a stable sort would order them. A selection
    (``kthvalue``) instead of a sort makes this linear in the size: a mask
    update on a 235k-weight layer takes ~2.5 ms rather than ~20 ms.

    Example:
        >>> lowest_k(torch.tensor([1.0, 0.0, 1.0, 0.0]), 3)
        tensor([False, False,  True, False])
    """
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep
    if k >= flat.numel():
        return keep.zero_()
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # exact widening; kthvalue is not implemented for every half type
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    keep[below] = False
    ties = torch.nonzero(flat == threshold).flatten()[: k - int(below.sum())]
    keep[ties] = False
    return keep


def _lowest_k_after_dead(flat: torch.Tensor, dead: torch.Tensor, k: int) -> torch.Tensor:
    # Dead units rank below every live one (ties by index). When they are all
    # pruned anyway, only the live ones need ranking: a smaller selection.
    n_dead = int(dead.sum())
    if k < n_dead:  # a falling target revives some: rank everything
        return lowest_k(flat.masked_fill(dead, float("-inf")), k)
    keep = ~dead
    live = torch.nonzero(keep).flatten()
    keep[live[~lowest_k(flat[live], k - n_dead)]] = False
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
    k = prune_count(flat.numel(), sparsity)
    if any(a is not None for a in alive):
        dead = torch.cat([~a if a is not None else torch.zeros(u.numel(), dtype=torch.bool, device=u.device)
                          for a, u in zip(alive, units)])
        keep = _lowest_k_after_dead(flat, dead, k)
    else:
        keep = lowest_k(flat, k)
    pieces = torch.split(keep, [u.numel() for u in units])
    return [granularity.expand(k, s.shape) for k, s in zip(pieces, scores)]


# --------------------------------------------------------------------------------------
# Structured granularities: N:M and blocks. Both see a tensor through the same 2-D view.
# --------------------------------------------------------------------------------------


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view every structured granularity works on: ``(shape[0], prod(shape[1:]))``.

    A Linear weight ``(out, in)`` is itself; a Conv weight ``(out, in, kh, kw)``
    becomes ``(out, in*kh*kw)`` in row-major order (the im2col / ``unfold``
    order, kernel position fastest); a 1-D tensor is one row ``(1, n)``.
    """
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


class NM(Granularity):
    """N:M semi-structured sparsity: in every group of ``m`` consecutive weights keep the ``n`` best.

    Grouping: the tensor is seen as the 2-D matrix ``(shape[0], prod(shape[1:]))``
    (a Linear weight ``(out, in)`` as is; a Conv weight ``(out, in, kh, kw)`` as
    ``(out, in*kh*kw)``, flattened row-major so the kernel position varies fastest;
    a 1-D tensor as one row). With ``dim=-1`` (or ``1``) a group is ``m``
    consecutive entries of one row, i.e. along the input dimension: for 2:4 on a
    Linear weight these are exactly the groups that sparse tensor cores and
    ``torch.sparse.to_sparse_semi_structured`` expect. With ``dim=0`` (or ``-2``)
    a group is ``m`` consecutive entries of one column (for layouts that
    multiply by the transposed weight). The grouped length must be a multiple of
    ``m``, otherwise :meth:`mask` raises ``ValueError`` naming the shape; leave
    such tensors out of the Pruner's scope (``exclude=``).

    Sparsity is fixed by the pattern at ``1 - n/m``: :meth:`mask` accepts a
    target of ``0`` (nothing pruned) or ``1 - n/m`` (within ``1e-9``) and raises
    ``ValueError`` for anything else, so a Pruner uses
    ``ConstantSparsity(1 - n/m)`` (a ramp would pass through other targets).
    Within a group the ``m - n`` lowest scores are pruned, ties pruning the
    lower index first. Entries already pruned in ``prior`` are pruned first and
    stay pruned: a group then keeps *at most* ``n`` (exactly ``n`` unless the
    prior had pruned more than ``m - n`` of it), which is still a valid N:M
    pattern for sparse kernels. N:M has no global ranking (``supports_global``
    is ``False``); its units for :meth:`unit_scores` / :meth:`expand` are single
    weights.

    Args:
        n: weights kept per group, ``1 <= n < m``.
        m: group size, ``>= 2``.
        dim: ``-1``/``1`` (groups along rows, the input dimension) or ``0``/``-2``
            (groups along columns) of the 2-D view.

    Raises:
        TypeError: an argument is not an integer.
        ValueError: ``n``, ``m`` or ``dim`` is out of range.

    Example:
        >>> NM(2, 4).mask(torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 0.0]]), 0.5)
        tensor([[ True, False,  True, False, False, False,  True,  True]])
    """

    supports_global = False

    def __init__(self, n: int, m: int, dim: int = -1) -> None:
        self.m = check_int("NM", "m", m, minimum=2)
        self.n = check_int("NM", "n", n, minimum=1)
        if self.n >= self.m:
            raise ValueError(f"NM: n must be < m (n:m keeps n of every m weights), got n={n}, m={m}")
        self.dim = check_int("NM", "dim", dim)
        if self.dim not in (-2, -1, 0, 1):
            raise ValueError(f"NM: dim must be -1 or 1 (groups along rows) or 0 or -2 (along columns), got {dim}")

    @property
    def sparsity(self) -> float:
        """The sparsity the pattern defines, ``1 - n/m``."""
        return 1.0 - self.n / self.m

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:  # noqa: D102 - units are single weights
        return scores.reshape(-1)

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:  # noqa: D102
        return unit_keep.reshape(shape)

    def mask(self, scores: torch.Tensor, sparsity: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean keep-mask of ``scores.shape`` with the N:M pattern (see the class docstring).

        Raises:
            ValueError: ``sparsity`` is neither 0 nor ``1 - n/m``, or the grouped
                length of ``scores`` is not a multiple of ``m``.
        """
        groups = self._groups(scores)  # validates the shape even when nothing is pruned
        if sparsity == 0:
            return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        if not abs(sparsity - self.sparsity) <= 1e-9:
            raise ValueError(f"{self!r}: the pattern fixes sparsity at 1 - n/m = {self.sparsity:g}, got a target of "
                             f"{sparsity!r}; use ConstantSparsity({self.sparsity:g}) (or 0 for no pruning)")
        key = groups.to(torch.promote_types(scores.dtype, torch.float32))
        dead = None if prior is None else ~self._groups(prior.to(torch.bool))
        if dead is not None:
            key = key.masked_fill(dead, float("-inf"))
        lowest = torch.sort(key, dim=1, stable=True).indices[:, : self.m - self.n]
        keep = torch.ones_like(key, dtype=torch.bool).scatter_(1, lowest, False)
        if dead is not None:
            keep &= ~dead
        return self._ungroup(keep, scores.shape)

    def _groups(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as ``(n_groups, m)``, one group per row."""
        rows, cols = _rows_cols(t.shape)
        mat = t.reshape(rows, cols)
        if self.dim in (0, -2):
            mat = mat.t()
        if mat.shape[1] % self.m:
            along = "per column" if self.dim in (0, -2) else "per row"
            raise ValueError(f"{self!r}: a tensor of shape {tuple(t.shape)} (2-D view {(rows, cols)}) has "
                             f"{mat.shape[1]} entries {along}, not a multiple of m={self.m}; exclude it from the "
                             "scope or pick an m that divides it")
        return mat.reshape(-1, self.m)

    def _ungroup(self, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        rows, cols = _rows_cols(shape)
        if self.dim in (0, -2):
            return keep.reshape(cols, rows).t().reshape(shape)
        return keep.reshape(shape)

    def __repr__(self) -> str:
        return f"NM({self.n}, {self.m})" if self.dim == -1 else f"NM({self.n}, {self.m}, dim={self.dim})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, NM) and (self.n, self.m, self._row_dim) == (other.n, other.m, other._row_dim)

    def __hash__(self) -> int:
        return hash((NM, self.n, self.m, self._row_dim))

    @property
    def _row_dim(self) -> bool:
        return self.dim in (-1, 1)


class Blocks(Granularity):
    """Rectangular blocks of the 2-D view, pruned whole; ranked by the sum of their scores.

    The tensor is seen as the matrix ``(shape[0], prod(shape[1:]))`` (a Conv
    weight ``(out, in, kh, kw)`` as ``(out, in*kh*kw)``, row-major; a 1-D tensor
    as one row) and tiled by ``shape`` blocks, ``(bh, bw)`` = (rows, columns):
    ``(1, 4)`` is 4 consecutive input weights of one output, ``(4, 1)`` the same
    input weight of 4 consecutive outputs. A block's score is the **sum** of its
    entries' scores (for additive saliencies such as Magnitude, OBD or Taylor,
    the block's total saliency); all blocks have the same size, so sums compare
    across layers and global ranking is supported. Blocks are numbered
    row-major, and ties prune the lower-numbered block first. Both dimensions of
    the view must be multiples of the block's, otherwise ``ValueError`` names
    the shape (no ragged edge blocks). A block is alive while any of its entries
    is kept.

    Args:
        shape: ``(bh, bw)``, two positive integers.

    Raises:
        TypeError: ``shape`` is not a pair of integers.
        ValueError: a block dimension is < 1.

    Example:
        >>> Blocks((1, 2)).mask(torch.tensor([[1.0, 2.0, 5.0, 0.0], [3.0, 3.0, 0.0, 1.0]]), 0.5)
        tensor([[False, False,  True,  True],
                [ True,  True, False, False]])
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 2:
            raise TypeError(f"Blocks: shape must be a pair (rows, cols) of positive integers, got {shape!r}")
        self.shape = (check_int("Blocks", "shape[0]", shape[0], minimum=1),
                      check_int("Blocks", "shape[1]", shape[1], minimum=1))

    def _tiles(self, shape: Sequence[int]) -> tuple[int, int]:
        """Number of block rows and block columns of a tensor of ``shape``."""
        rows, cols = _rows_cols(shape)
        bh, bw = self.shape
        if rows % bh or cols % bw:
            raise ValueError(f"{self!r}: a tensor of shape {tuple(shape)} (2-D view {(rows, cols)}) is not divisible "
                             f"into {bh}x{bw} blocks; exclude it from the scope or pick a block shape that divides it")
        return rows // bh, cols // bw

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Block sums, row-major over the grid of blocks, as a 1-D tensor."""
        br, bc = self._tiles(scores.shape)
        view = scores.reshape(br, self.shape[0], bc, self.shape[1])
        return view.to(torch.promote_types(scores.dtype, torch.float32)).sum(dim=(1, 3)).reshape(-1)

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Broadcast one keep flag per block over its entries."""
        br, bc = self._tiles(shape)
        grid = unit_keep.reshape(br, 1, bc, 1).expand(br, self.shape[0], bc, self.shape[1])
        return grid.reshape(shape)

    def __repr__(self) -> str:
        return f"Blocks({self.shape})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Blocks) and self.shape == other.shape

    def __hash__(self) -> int:
        return hash((Blocks, self.shape))


class Channels(Granularity):
    """Whole output channels: row ``i`` of the ``(shape[0], prod(shape[1:]))`` view is one unit.

    A Linear weight loses whole output rows, a Conv weight whole filters
    (``ln_structured`` in ``torch.nn.utils.prune``, tensor by tensor). A channel's
    score is the **mean** of its entries' scores, so channels of layers with
    different fan-in compare under global ranking. A 1-D tensor is one unit.
    This zeroes channels of each tensor on its own; to remove channels
    physically, with BatchNorm shifts, biases and the next layer's inputs pruned
    together, use :class:`prunekit.methods.structural.StructuredPruner` or
    :func:`prunekit.methods.structural.prune_channels`.

    Example:
        >>> Channels().mask(torch.tensor([[1.0, 1.0], [5.0, 0.0], [0.5, 0.0]]), 1 / 3)
        tensor([[ True,  True],
                [ True,  True],
                [False, False]])
    """

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Mean score of every channel, as a 1-D tensor of ``shape[0]`` entries."""
        rows, cols = _rows_cols(scores.shape)
        view = scores.reshape(rows, cols).to(torch.promote_types(scores.dtype, torch.float32))
        return view.mean(dim=1) if cols else view.sum(dim=1)

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Broadcast one keep flag per channel over its entries."""
        rows, cols = _rows_cols(shape)
        return unit_keep.reshape(rows, 1).expand(rows, cols).reshape(shape)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Channels)

    def __hash__(self) -> int:
        return hash(Channels)
