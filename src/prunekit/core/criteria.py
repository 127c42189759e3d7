"""Saliency criteria: ``score(param, context) -> Tensor`` of the same shape; higher = keep.

A criterion never builds masks: granularity and ranking do that. Criteria that
need data (gradients, Hessians, activations) receive it through the context or
their own constructor arguments; the data-driven ones (OBD, Taylor) live with
the Hessian estimators in :mod:`prunekit.methods.obd`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .._validate import check_int

__all__ = ["Criterion", "ScoreContext", "Magnitude", "Random", "Precomputed"]


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion may know about the parameter it scores.

    Attributes:
        name: fully qualified parameter name, e.g. ``"features.0.weight"``.
        module: the module that owns the parameter.
        step: the pruner's current step.
    """

    name: str
    module: nn.Module
    step: int


class Criterion:
    """Base class for saliency criteria.

    Subclasses implement :meth:`score`. Scores must be finite and have the
    parameter's shape; they are compared within a layer and, under global
    ranking, across layers.
    """

    def score(self, param: torch.Tensor, context: ScoreContext) -> torch.Tensor:
        """Return the saliency of each entry of ``param`` (higher = keep)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Magnitude(Criterion):
    """``|w|``: the classic magnitude criterion.

    Example:
        >>> Magnitude().score(torch.tensor([-3.0, 1.0]), None)
        tensor([3., 1.])
    """

    def score(self, param: torch.Tensor, context: ScoreContext | None) -> torch.Tensor:  # noqa: D102
        return param.detach().abs()


class Random(Criterion):
    """Uniform random scores: the baseline every criterion must beat.

    Scores are a pure function of ``(seed, parameter name, step)``, so runs are
    reproducible and resumable without saving generator state.

    Args:
        seed: base seed (a non-negative integer).

    Example:
        >>> ctx = ScoreContext("fc.weight", nn.Identity(), 0)
        >>> torch.equal(Random(1).score(torch.zeros(3), ctx), Random(1).score(torch.zeros(3), ctx))
        True
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int("Random", "seed", seed, minimum=0)

    def score(self, param: torch.Tensor, context: ScoreContext) -> torch.Tensor:  # noqa: D102
        key = f"{self.seed}:{context.name}:{context.step}".encode()
        gen = torch.Generator().manual_seed((zlib.crc32(key) ^ (self.seed << 32)) & 0xFFFF_FFFF_FFFF_FFFF)
        return torch.rand(param.shape, generator=gen).to(param.device)

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"


# -- data-driven saliency (issue 4: Optimal Brain Damage) ---------------------------------


class Precomputed(Criterion):
    """Scores computed beforehand, looked up by parameter name.

    Useful to prune one trained model at several sparsities with the same
    saliencies (one-shot sweeps), or to plug in scores from elsewhere.

    Args:
        scores: ``{parameter name: tensor of that parameter's shape}``.

    Example:
        >>> crit = Precomputed({"w": torch.tensor([0.5, 2.0])})
        >>> crit.score(torch.zeros(2), ScoreContext("w", nn.Identity(), 0))
        tensor([0.5000, 2.0000])
    """

    def __init__(self, scores: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(scores, Mapping) or not all(isinstance(v, torch.Tensor) for v in scores.values()):
            raise TypeError("Precomputed: scores must be a dict {parameter name: tensor}")
        self.scores = {name: value.detach() for name, value in scores.items()}

    def score(self, param: torch.Tensor, context: ScoreContext) -> torch.Tensor:  # noqa: D102
        if context.name not in self.scores:
            raise KeyError(f"Precomputed: no scores for {context.name!r}; have {sorted(self.scores)}")
        return self.scores[context.name].to(param.device)

    def __repr__(self) -> str:
        return f"Precomputed({len(self.scores)} tensors)"
