"""The controls a lottery ticket is compared with, at the ticket's own sparsities.

* ``"reinit"``: the ticket's mask, a fresh random initialization (Frankle &
  Carbin's random reinitialization);
* ``"random_mask"``: a uniformly random mask with the ticket's per-layer counts,
  from the ticket's rewind weights;
* ``"one_shot"``: the dense trained network (round 0) pruned by magnitude in
  one shot to round ``r``'s targets, from the ticket's rewind weights.

Each control is its own resumable run directory with the layout of a ticket
run (``round_XX/{mask.safetensors, metrics.json}``; final weights are not
kept, nothing builds on them), bound to the ticket run by its config hash.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..._progress import progress_bar
from ..._validate import check_choice, check_int
from .config import LotteryConfig
from .data import LotteryData
from .imp import ModelFn, RoundResult, RunContext, derive_seed, init_weights, open_run, round_metrics
from .masks import Masks, check_counts, random_masks_like, rank_masks
from .store import RunStore
from .train import Trainer, train_masked

__all__ = ["CONTROLS", "run_control"]

CONTROLS = ("reinit", "random_mask", "one_shot")
# Mixed into derived seeds so that the controls never share random streams.
_STREAM = {"reinit": 1, "random_mask": 2}


def run_control(kind: str, model_fn: ModelFn, data: LotteryData, config: LotteryConfig, ticket_dir: str | Path,
                out: str | Path, *, seed: int = 0, rounds: int | None = None, trainer: Trainer | None = None,
                progress: bool | None = None) -> list[RoundResult]:
    """Train control ``kind`` at the sparsity of each ticket round ``1..rounds``.

    Args:
        kind: ``"reinit"``, ``"random_mask"`` or ``"one_shot"`` (see the module docstring).
        model_fn, data, config: exactly those of the ticket run (checked by its config hash).
        ticket_dir: the ticket's run directory (:func:`run_lottery`).
        out: this control's run directory.
        seed: seed of the control's randomness (fresh inits, random masks), mixed
            with ``config.seed`` and the round.
        rounds: rounds to run (default ``config.rounds``); the ticket's rounds
            must be finished (only round 0 for ``"one_shot"``).
        trainer: replaces :func:`~prunekit.methods.lottery.train_early_stopping`.
        progress: progress bars (``None``: when stderr is a terminal).

    Returns:
        One :class:`RoundResult` per round ``1..rounds``.

    Raises:
        ValueError: no such ticket run, a ticket round missing, or ``out`` holds another run.

    Example:
        >>> run_lottery(LeNet300100, data, cfg, "runs/ticket")  # doctest: +SKIP
        >>> reinit = run_control("reinit", LeNet300100, data, cfg, "runs/ticket", "runs/reinit")  # doctest: +SKIP
    """
    kind = check_choice("run_control", "kind", kind, CONTROLS)
    seed = check_int("run_control", "seed", seed, minimum=0)
    rounds = config.rounds if rounds is None else check_int("run_control", "rounds", rounds, minimum=0)
    if not (Path(ticket_dir) / "config.json").is_file():
        raise ValueError(f"run_control: {ticket_dir} is not a lottery run directory (run run_lottery first)")
    ticket = open_run(model_fn, data, config, ticket_dir, trainer=trainer, progress=progress)
    store = RunStore(out)
    store.bind({"kind": "control", "control": kind, "seed": seed, "ticket": ticket.store.hash})
    results = []
    with progress_bar(ticket.progress, range(1, rounds + 1), desc=kind, unit="round") as bar:
        for r in bar:
            finished = store.is_finished(r)
            results.append(_finished(ticket, store, r) if finished else _run(kind, model_fn, ticket, store, r, seed))
    return results


def _finished(ticket: RunContext, store: RunStore, r: int) -> RoundResult:
    metrics = store.read_metrics(r)
    masks = store.read_tensors(store.round_path(r, "mask.safetensors"), ticket.mask_spec,
                               store.recorded_sha(r, metrics, "mask.safetensors"))
    check_counts(masks, ticket.targets(r), ticket.config.ranking, str(store.root / store.round_path(r)))
    return RoundResult(r, store.root / store.round_path(r), metrics)


def _run(kind: str, model_fn: ModelFn, ticket: RunContext, store: RunStore, r: int, seed: int) -> RoundResult:
    start_time = time.perf_counter()
    needed = 0 if kind == "one_shot" else r
    if not ticket.store.is_finished(needed):
        raise ValueError(f"run_control: round {needed} of the ticket run {ticket.store.root} is not finished")
    masks, start = _inputs(kind, model_fn, ticket, r, seed)
    files = {"mask.safetensors": store.write_tensors(store.round_path(r, "mask.safetensors"), masks)}
    outcome = train_masked(ticket.model, start, masks, ticket.data, ticket.config.train, seed=ticket.config.seed,
                           trainer=ticket.trainer, progress=ticket.progress, desc=f"{kind} round {r}")
    metrics = round_metrics(r, store.hash, masks, ticket.targets(r), outcome, files, time.perf_counter() - start_time)
    metrics["control"] = kind
    store.write_metrics(r, metrics)
    return RoundResult(r, store.root / store.round_path(r), metrics)


def _inputs(kind: str, model_fn: ModelFn, ticket: RunContext, r: int, seed: int) -> tuple[Masks, dict]:
    """The control's masks and starting weights at ticket round ``r``."""
    if kind == "reinit":
        _, masks, _ = ticket.read_round(r, weights=False)
        _, fresh = init_weights(model_fn, derive_seed(ticket.config.seed, seed, r, _STREAM[kind]))
        return masks, fresh
    rewind = ticket.read_rewind()
    if kind == "random_mask":
        _, reference, _ = ticket.read_round(r, weights=False)
        mask_seed = derive_seed(ticket.config.seed, seed, r, _STREAM[kind])
        return random_masks_like(ticket.model, reference, mask_seed), rewind
    _, _, dense = ticket.read_round(0)
    ticket.model.load_state_dict(dense)
    return rank_masks(ticket.model, ticket.names, ticket.targets(r), ranking=ticket.config.ranking), rewind
