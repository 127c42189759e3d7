"""Saliency criteria: ``score(param, context) -> Tensor`` of the same shape; higher = keep.

A criterion never builds masks: granularity and ranking do that. Criteria that
need data (gradients, Hessians, activations) receive it through the context or
their own constructor arguments.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ._validate import check_int

__all__ = ["Criterion", "ScoreContext", "Magnitude", "Random"]


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
