"""The iterative pruning procedure of Optimal Brain Damage: train, score, prune, retrain, repeat.

:func:`iterative_prune` runs the loop around a user's own training function
and any :class:`~prunekit.core.criteria.Criterion`. Masks are owned by a
:class:`~prunekit.Pruner`, so pruned weights stay exactly zero while retraining
as long as ``train_fn`` attaches its optimizer (``pruner.attach(opt)``).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Sequence

from torch import nn

from .._validate import check_int, check_real, check_sparsity
from ..core.criteria import Criterion
from ..core.pruner import Pruner
from ..core.scope import Selector

__all__ = ["iterative_prune", "round_sparsities"]

TrainFn = Callable[[nn.Module, "Pruner | None"], None]
Callback = Callable[[nn.Module, Pruner, int, str], "dict[str, Any] | None"]



def round_sparsities(fraction_per_round: float, rounds: int) -> list[float]:
    """Target sparsity after each round when pruning ``fraction_per_round`` of the surviving weights.

    Round ``r`` reaches ``1 - (1 - f)**r``.

    Example:
        >>> [round(s, 3) for s in round_sparsities(0.2, 3)]
        [0.2, 0.36, 0.488]
    """
    f = check_real("round_sparsities", "fraction_per_round", fraction_per_round)
    if not 0.0 < f < 1.0:
        raise ValueError(f"round_sparsities: fraction_per_round must be in (0, 1), got {f}")
    rounds = check_int("round_sparsities", "rounds", rounds, minimum=1)
    return [1.0 - (1.0 - f) ** r for r in range(1, rounds + 1)]


def _targets(rounds: int | None, fraction_per_round: float | None, sparsities: Sequence[float] | None) -> list[float]:
    if sparsities is not None:
        if fraction_per_round is not None:
            raise ValueError("iterative_prune: pass either sparsities or fraction_per_round, not both")
        if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence) or not sparsities:
            raise TypeError("iterative_prune: sparsities must be a non-empty list of floats in [0, 1)")
        out = [check_sparsity("iterative_prune", f"sparsities[{i}]", s) for i, s in enumerate(sparsities)]
        if any(b < a for a, b in zip(out, out[1:])):
            raise ValueError(f"iterative_prune: sparsities must not decrease (masks only grow), got {out}")
        if rounds is not None and rounds != len(out):
            raise ValueError(f"iterative_prune: rounds={rounds} but {len(out)} sparsities given")
        return out
    if fraction_per_round is None or rounds is None:
        raise ValueError("iterative_prune: pass sparsities=[...], or rounds with fraction_per_round")
    return round_sparsities(fraction_per_round, rounds)


def _pruned_nonzero(pruner: Pruner) -> int:
    """Pruned weights that are not zero: a ``train_fn`` that did not attach its optimizer moved them."""
    params = dict(pruner.model.named_parameters())
    return sum(int((params[name].detach()[~keep] != 0).sum()) for name, keep in pruner.masks.items())


def _train_round(train_fn: TrainFn, model: nn.Module, pruner: Pruner, round_index: int) -> int:
    """Retrain with the pruner; re-zero anything that moved; detach optimizers attached meanwhile."""
    before = list(pruner.optimizers)
    train_fn(model, pruner)
    for opt in [o for o in pruner.optimizers if all(o is not b for b in before)]:
        pruner.detach(opt)  # a fresh optimizer per round should not stay referenced (memory)
    moved = _pruned_nonzero(pruner)
    if moved:
        warnings.warn(f"iterative_prune: round {round_index}: train_fn changed {moved} pruned weights; they were "
                      "reset to zero. Call pruner.attach(optimizer) in train_fn to keep them frozen.", stacklevel=3)
        pruner.apply_masks()
    return moved


def iterative_prune(
    model: nn.Module,
    *,
    criterion: Criterion,
    train_fn: TrainFn,
    rounds: int | None = None,
    fraction_per_round: float | None = None,
    sparsities: Sequence[float] | None = None,
    ranking: str = "layerwise",
    layers: Sequence[Selector] | None = None,
    exclude: Sequence[Selector] | None = None,
    train_first: bool = True,
    callback: Callback | None = None,
) -> list[dict[str, Any]]:
    """Train, score, prune the lowest-saliency weights, retrain; repeat (OBD's procedure).

    Each round scores the *current* (retrained) weights with ``criterion``,
    raises the sparsity of the pruned tensors to the round's target (already
    pruned weights stay pruned), then calls ``train_fn(model, pruner)``. The
    training function must attach its optimizer (``pruner.attach(opt)``) so
    that pruned weights stay frozen at zero; if any moved anyway they are reset
    and a warning says so. Criteria with a ``bind`` method (OBD, Taylor) are
    bound to ``model``. At the end the pruner is removed: ``model`` is a plain
    module whose pruned weights are exact zeros.

    Args:
        model: the model, pruned in place.
        criterion: saliency criterion (higher = keep).
        train_fn: ``train_fn(model, pruner)`` trains in place; ``pruner`` is
            ``None`` for the first, dense training.
        rounds: number of rounds (with ``fraction_per_round``).
        fraction_per_round: fraction of the surviving weights pruned per round.
        sparsities: explicit non-decreasing target per round (instead of the two above).
        ranking: ``"layerwise"`` or ``"global"``.
        layers: which parameters to prune (see :class:`~prunekit.Pruner`).
        exclude: parameters never pruned.
        train_first: train the dense model before the first round.
        callback: ``callback(model, pruner, round, phase)`` with phase
            ``"pruned"`` (before retraining) and ``"retrained"``; a returned dict
            is stored in the round's record under that phase.

    Returns:
        One dict per round: ``round`` (1-based), ``target_sparsity``,
        ``sparsity`` (measured zeros over the pruned tensors), ``moved``
        (pruned weights train_fn changed), ``seconds``, and ``pruned`` /
        ``retrained`` (the callback's dicts, or ``{}``).

    Example:
        >>> def train_fn(model, pruner):  # doctest: +SKIP
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     if pruner is not None:
        ...         pruner.attach(opt)
        ...     prunekit.training.loop.train(model, X, y, epochs=2, optimizer=opt)
        >>> records = iterative_prune(model, criterion=Magnitude(), train_fn=train_fn,  # doctest: +SKIP
        ...                           rounds=5, fraction_per_round=0.2)
    """
    targets = _targets(rounds, fraction_per_round, sparsities)
    if not callable(train_fn):
        raise TypeError("iterative_prune: train_fn must be callable (model, pruner) -> None")
    if callback is not None and not callable(callback):
        raise TypeError("iterative_prune: callback must be callable (model, pruner, round, phase) -> dict | None")
    if hasattr(criterion, "bind"):
        criterion.bind(model)
    if train_first:
        train_fn(model, None)
    # Manual: in this loop masks change only through update_masks(), once per round.
    pruner = Pruner.manual(model, criterion=criterion, ranking=ranking, layers=layers, exclude=exclude)
    records = []
    try:
        for index, target in enumerate(targets, start=1):
            records.append(_one_round(model, pruner, train_fn, callback, index, target))
    finally:
        pruner.remove()
    return records


def _one_round(model: nn.Module, pruner: Pruner, train_fn: TrainFn, callback: Callback | None, index: int,
               target: float) -> dict[str, Any]:
    start = time.perf_counter()
    pruner.update_masks(target)
    record: dict[str, Any] = {"round": index, "target_sparsity": target, "sparsity": pruner.report().sparsity}
    record["pruned"] = (callback(model, pruner, index, "pruned") if callback else None) or {}
    record["moved"] = _train_round(train_fn, model, pruner, index)
    record["retrained"] = (callback(model, pruner, index, "retrained") if callback else None) or {}
    record["seconds"] = time.perf_counter() - start
    return record
