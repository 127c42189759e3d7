"""Sparsity reports: per layer and total, as a table or a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

from torch import nn

from .distributed import count_true
from .scope import Target, check_materialised, resolve_scope

__all__ = ["LayerSparsity", "Rows", "SparsityReport", "sparsity_report"]


class Rows(Protocol):
    """What a report reads from a pruning engine (:class:`prunekit.Pruner` is one)."""

    skipped: Sequence[tuple[str, str]]

    def rows(self) -> list[tuple[Target, float]]:
        """``(target, last target sparsity)`` per pruned parameter."""


@dataclass(frozen=True)
class LayerSparsity:
    """One row of a report.

    Attributes:
        name: parameter name as in ``state_dict``.
        layer: type name of the owning module.
        shape: parameter shape.
        numel: number of entries.
        zeros: entries that are exactly zero.
        target: the pruner's last target sparsity for it (``None`` without a pruner).
        aliases: the parameter's other names when it is tied or shared (``lm_head.weight`` ...).
    """

    name: str
    layer: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    target: float | None = None
    aliases: tuple[str, ...] = ()

    @property
    def sparsity(self) -> float:
        """Fraction of entries that are zero (0 for an empty tensor)."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Rows for the pruned (or prunable) parameters, the skipped layers, and totals."""

    rows: list[LayerSparsity] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Total entries over all rows."""
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        """Total zero entries over all rows."""
        return sum(r.zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Overall fraction of zeros over all rows."""
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``layers`` (list of rows), ``skipped``, and totals."""
        layers = [{**asdict(r), "shape": list(r.shape), "aliases": list(r.aliases), "sparsity": r.sparsity}
                  for r in self.rows]
        skipped = [{"module": m, "reason": why} for m, why in self.skipped]
        return {"layers": layers, "skipped": skipped, "numel": self.numel, "zeros": self.zeros, "sparsity": self.sparsity}

    def __str__(self) -> str:
        header = ("parameter", "layer", "shape", "params", "zeros", "sparsity", "target")
        body = [(r.name, r.layer, "x".join(map(str, r.shape)), f"{r.numel:,}", f"{r.zeros:,}",
                 f"{r.sparsity:.2%}", "-" if r.target is None else f"{r.target:.2%}") for r in self.rows]
        body.append(("total", "", "", f"{self.numel:,}", f"{self.zeros:,}", f"{self.sparsity:.2%}", ""))
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"{r.name} is also {', '.join(r.aliases)} (tied)" for r in self.rows if r.aliases]
        lines += [f"skipped {m or '<root>'}: {why}" for m, why in self.skipped]
        return "\n".join(lines)


def sparsity_report(model: nn.Module, pruner: Rows | None = None) -> SparsityReport:
    """Count zeros per prunable parameter of ``model``.

    Args:
        model: any model (pruned or not).
        pruner: if given, report exactly its parameters, targets and skipped layers.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a parameter is on the ``meta`` device, ``pruner``'s layers
            or parameters were replaced since it was built (build a new Pruner),
            or ``pruner`` prunes parameters that ``model`` does not have.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[0] = 0
        >>> sparsity_report(net).sparsity
        0.5
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsity_report: model must be an nn.Module, got {type(model).__name__}")
    if pruner is None:
        scope = resolve_scope(model)
        check_materialised("sparsity_report", scope.targets)
        items = [(t, None) for t in scope.targets]
        skipped = scope.skipped
    else:
        items = pruner.rows()  # raises if a pruned layer was replaced: it would be reported with its old target
        _check_same_model(model, items)
        skipped = pruner.skipped
    rows = []
    for target, goal in items:
        p = target.param
        rows.append(LayerSparsity(target.name, type(target.module).__name__, tuple(p.shape), p.numel(),
                                  count_true(p == 0), goal, target.aliases[1:]))  # FSDP2: over all shards
    return SparsityReport(rows, list(skipped))


def _check_same_model(model: nn.Module, items: list[tuple[Target, float | None]]) -> None:
    # The rows come from the pruner: with another model they would describe tensors it does not have.
    own = {id(p) for p in model.parameters()}
    for target, _ in items:
        if id(target.param) not in own:
            raise ValueError(f"sparsity_report: the pruner prunes '{target.name}', which is not a parameter of "
                             "model; pass the model the Pruner was built on, or no pruner")
