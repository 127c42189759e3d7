"""Per-layer one-shot solvers for a ``Linear`` weight ``(out, in)``: magnitude, Wanda and SparseGPT.

Every solver takes the weight and a :class:`Target` and returns ``(pruned_weight, keep)``:
a new float tensor whose pruned entries are exact zeros, and the boolean keep-mask.
The data-driven ones also take ``H``, the Gram matrix ``X Xᵀ`` of the layer's
calibration inputs (``(in, in)``, one column of ``X`` per token; any positive
scale, e.g. the mean over tokens).

Sparsity targets are either unstructured (a fraction) or N:M with the
semantics of :class:`prunekit.core.granularity.NM` (``n`` kept of every ``m``
consecutive inputs of a row). Unstructured targets prune exactly
``round(out * in * fraction)`` weights per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..._validate import check_real, check_sparsity
from ...core.granularity import NM, Unstructured, lowest_k, prune_count

__all__ = ["Target", "magnitude_prune", "wanda_prune", "sparsegpt_prune", "relative_error"]


@dataclass(frozen=True)
class Target:
    """What one layer is pruned to: a fraction of its weights, or an N:M pattern.

    Attributes:
        fraction: the sparsity (for N:M, ``1 - n/m``).
        nm: the N:M pattern, or ``None`` for unstructured sparsity.

    Example:
        >>> Target.parse("2:4")
        Target(fraction=0.5, nm=NM(2, 4))
        >>> Target.parse(0.7).nm is None
        True
    """

    fraction: float
    nm: NM | None = None

    @classmethod
    def parse(cls, value: Any, name: str = "sparsity") -> "Target":
        """A target from a fraction in ``[0, 1)``, an ``"n:m"`` string or an :class:`NM` (dim ``-1``).

        Raises:
            TypeError: ``value`` is none of those.
            ValueError: the fraction is out of range, the string is malformed, or the
                NM groups along columns.
        """
        if isinstance(value, Target):
            return value
        if isinstance(value, NM):
            if value.dim not in (-1, 1):
                raise ValueError(f"prune_oneshot: {name} {value!r} groups along columns; one-shot N:M groups "
                                 "along the input dimension (dim=-1)")
            return cls(value.sparsity, value)
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if not match:
                raise ValueError(f"prune_oneshot: {name} string must look like 'n:m' (e.g. '2:4'), got {value!r}")
            return cls.parse(NM(int(match[1]), int(match[2])), name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"prune_oneshot: {name} must be a fraction in [0, 1), an 'n:m' string or an NM, "
                            f"got {type(value).__name__} {value!r}")
        return cls(check_sparsity("prune_oneshot", name, value))

    def __str__(self) -> str:
        return f"{self.nm.n}:{self.nm.m}" if self.nm else f"{self.fraction:g}"


def _check_weight(weight: torch.Tensor, target: Target) -> None:
    if weight.dim() != 2:
        raise ValueError(f"one-shot solvers take a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    if target.nm is not None and weight.shape[1] % target.nm.m:
        raise ValueError(f"{target.nm!r} needs the input dimension to be a multiple of {target.nm.m}, "
                         f"got a weight of shape {tuple(weight.shape)}")


def _check_gram(H: torch.Tensor, weight: torch.Tensor) -> None:
    rows, cols = weight.shape
    grouped = H.dim() == 3 and H.shape[1:] == (cols, cols) and H.shape[0] >= 1 and rows % H.shape[0] == 0
    if H.shape != (cols, cols) and not grouped:
        raise ValueError(f"H must be ({cols}, {cols}) (or (groups, {cols}, {cols}) with groups dividing {rows}) "
                         f"for a weight of shape {tuple(weight.shape)}, got {tuple(H.shape)}")


def _grouped(H: torch.Tensor) -> torch.Tensor:
    """``H`` as ``(groups, in, in)``: a grouped layer's rows ``g·out/groups …`` see only group ``g``'s inputs."""
    return H if H.dim() == 3 else H[None]


def _row_counts(rows: int, cols: int, fraction: float) -> torch.Tensor:
    """Per-row prune counts summing to ``round(rows*cols*fraction)``, as even as possible."""
    base, extra = divmod(prune_count(rows * cols, fraction), rows)
    return base + (torch.arange(rows) < extra).long()


def _per_row_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep-mask pruning the lowest scores of each row (ties: lower index first)."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order))
    return ranks >= _row_counts(*scores.shape, fraction)[:, None]


def magnitude_prune(weight: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the smallest ``|w|`` of the whole layer (N:M: of each group); no calibration data.

    Example:
        >>> w = torch.tensor([[4.0, -1.0, 3.0, 2.0]])
        >>> magnitude_prune(w, Target.parse("2:4"))[0]
        tensor([[4., 0., 3., 0.]])
    """
    _check_weight(weight, target)
    scores = weight.detach().abs()
    keep = (target.nm.mask(scores, target.fraction) if target.nm
            else Unstructured().mask(scores, target.fraction))
    return weight.detach().float().masked_fill(~keep, 0.0), keep


def wanda_prune(weight: torch.Tensor, H: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda (Sun et al. 2023): score ``|W_ij|·‖X_j‖₂``, pruned within each output row (N:M: each group).

    Only the diagonal of ``H`` (the squared input norms) is used. Unstructured
    counts are spread over rows as evenly as possible so the layer's total is exact.
    A grouped ``H`` ``(groups, in, in)`` gives each block of ``out/groups`` rows its
    own group's norms (grouped convolutions).

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
        >>> wanda_prune(w, torch.diag(torch.tensor([9.0, 1.0, 0.1, 1.0])), Target.parse(0.5))[0]
        tensor([[1., 0., 0., 2.]])
    """
    _check_weight(weight, target)
    _check_gram(H, weight)
    Hg = _grouped(H)
    norms = torch.diagonal(Hg, dim1=1, dim2=2).double().clamp_min(0).sqrt()  # (groups, in)
    norms = norms.repeat_interleave(weight.shape[0] // len(Hg), dim=0)
    scores = weight.detach().double().abs() * norms.to(weight.device)
    keep = target.nm.mask(scores, target.fraction) if target.nm else _per_row_mask(scores, target.fraction)
    return weight.detach().float().masked_fill(~keep, 0.0), keep


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹ = UᵀU``, ``λ = percdamp·mean(diag H)``, in float64.

    With ``J`` the reversal permutation and ``JHJ = L'L'ᵀ``, ``U = J L'⁻¹ J``: one
    Cholesky and one triangular solve instead of factoring, inverting and factoring again.
    """
    H = H.detach().double().clone()
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0  # inputs never seen: keep H positive definite, their weights decouple
    H += percdamp * torch.diagonal(H).mean() * torch.eye(len(H), dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info.item() != 0:
        raise ValueError(f"sparsegpt: H + λI is not positive definite with percdamp={percdamp}; use a larger percdamp")
    eye = torch.eye(len(H), dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, target: Target, *, blocksize: int = 128,
                    percdamp: float = 0.01, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with updates of the surviving weights.

    Columns are processed left to right in blocks of ``blocksize`` with lazy
    batch updates, using the upper Cholesky factor ``U`` of ``(H + λI)⁻¹``. The
    adaptive mask is chosen per block by the OBS saliency ``w²/U_jj²`` from the
    block's weights as they stand when the block starts (unstructured: the
    block's share of the layer's exact count, lowest saliencies over all its
    rows; N:M: per group of ``m`` columns, when the group starts). Pruning a
    column sets its pruned entries to zero and corrects the columns to its right:
    ``W[:, j:] -= (w_j - q_j)/U_jj · U[j, j:]``. Computed in float64. Inputs never
    seen in calibration (zero diagonal of ``H``) get a unit diagonal so ``H`` stays
    invertible; their weights are ranked like any other rather than zeroed.

    Args:
        weight: ``(out, in)`` weight (not modified).
        H: ``(in, in)`` Gram matrix of the calibration inputs.
        target: the sparsity target.
        blocksize: columns per block (a multiple of ``m`` for N:M).
        percdamp: damping ``λ = percdamp·mean(diag H)``.
        keep: a fixed keep-mask instead of the adaptive one (for analysis).

    Example:
        >>> w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> q, keep = sparsegpt_prune(w, torch.eye(4), Target.parse("2:4"))
        >>> keep
        tensor([[False, False,  True,  True]])
    """
    _check_weight(weight, target)
    _check_gram(H, weight)
    blocksize, percdamp = check_sparsegpt_args(blocksize, percdamp, target)
    if keep is not None and keep.shape != weight.shape:
        raise ValueError(f"keep must have the weight's shape {tuple(weight.shape)}, got {tuple(keep.shape)}")
    if H.dim() == 3:
        return _sparsegpt_grouped(weight, H, target, blocksize, percdamp, keep)
    U = _inverse_cholesky(H, percdamp)
    W = weight.detach().double().clone()
    pruned = torch.zeros_like(W, dtype=torch.bool) if keep is None else ~keep.to(W.device, torch.bool)
    rows, cols = W.shape
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if keep is None and target.nm is None:
            k = prune_count(rows * i2, target.fraction) - prune_count(rows * i1, target.fraction)
            saliency = W[:, i1:i2] ** 2 / torch.diagonal(U)[i1:i2] ** 2
            pruned[:, i1:i2] = ~lowest_k(saliency.reshape(-1), k).reshape(rows, i2 - i1)
        _prune_block(W, U, pruned, i1, i2, target if keep is None else None)
    return W.float(), ~pruned


def _sparsegpt_grouped(weight: torch.Tensor, H: torch.Tensor, target: Target, blocksize: int, percdamp: float,
                       keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on each group's rows with its own ``H``; unstructured counts split so the layer total is exact."""
    groups, (rows, cols) = len(H), weight.shape
    per = rows // groups
    base, extra = divmod(prune_count(rows * cols, target.fraction), groups)
    outs, keeps = [], []
    for g in range(groups):
        sl = slice(g * per, (g + 1) * per)
        share = base + (g < extra)
        sub = target if target.nm is not None else Target(share / (per * cols))
        w, k = sparsegpt_prune(weight[sl], H[g], sub, blocksize=blocksize, percdamp=percdamp,
                               keep=None if keep is None else keep[sl])
        outs.append(w)
        keeps.append(k)
    return torch.cat(outs), torch.cat(keeps)


def _prune_block(W: torch.Tensor, U: torch.Tensor, pruned: torch.Tensor, i1: int, i2: int,
                 nm_target: Target | None) -> None:
    """Prune columns ``i1:i2`` one by one (choosing N:M groups on the way), then update the rest lazily."""
    W1, U1, P1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], pruned[:, i1:i2]
    diag = torch.diagonal(U1)
    Err1 = torch.empty_like(W1)
    scale = P1 / diag  # err_j = (w_j - q_j)/U_jj = w_j·[pruned]/U_jj: one multiplication per column
    nm = nm_target.nm if nm_target is not None else None
    for i in range(i2 - i1):
        if nm is not None and i % nm.m == 0:
            saliency = W1[:, i:i + nm.m] ** 2 / diag[i:i + nm.m] ** 2
            lowest = torch.topk(saliency, nm.m - nm.n, dim=1, largest=False).indices
            P1[:, i:i + nm.m].scatter_(1, lowest, True)
            scale[:, i:i + nm.m] = P1[:, i:i + nm.m] / diag[i:i + nm.m]
        torch.mul(W1[:, i], scale[:, i], out=Err1[:, i])
        W1[:, i:].addr_(Err1[:, i], U1[i, i:], alpha=-1)
    W[:, i1:i2] = W1.masked_fill_(P1, 0.0)
    W[:, i2:] -= Err1 @ U[i1:i2, i2:]


def check_sparsegpt_args(blocksize: Any, percdamp: Any, target: Target) -> tuple[int, float]:
    """Validate SparseGPT's ``blocksize`` (a multiple of ``m`` for N:M) and ``percdamp`` (>= 0)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"sparsegpt: blocksize must be a positive integer, got {blocksize!r}")
    if target.nm is not None and blocksize % target.nm.m:
        raise ValueError(f"sparsegpt: blocksize must be a multiple of m={target.nm.m} for {target.nm!r}, "
                         f"got {blocksize}")
    percdamp = check_real("sparsegpt", "percdamp", percdamp)
    if percdamp < 0:
        raise ValueError(f"sparsegpt: percdamp must be >= 0, got {percdamp}")
    return blocksize, percdamp


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
    """``‖(W − Ŵ)X‖²_F / ‖WX‖²_F`` on the calibration inputs, from their Gram matrix ``H = XXᵀ``.

    Example:
        >>> relative_error(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.eye(2))
        0.5
    """
    Hg = _grouped(H.double().to(weight.device))
    W = weight.detach().double().reshape(len(Hg), -1, weight.shape[1])
    D = W - pruned.detach().double().to(weight.device).reshape(W.shape)
    total = ((W @ Hg) * W).sum().item()
    return ((D @ Hg) * D).sum().item() / total if total > 0 else 0.0
