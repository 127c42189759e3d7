"""Iterative magnitude pruning with rewinding: the lottery-ticket procedure, resumable."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..._progress import progress_bar, resolve_progress
from .config import LotteryConfig
from .data import LotteryData
from .masks import Masks, Targets, check_counts, full_masks, imp_targets, kept_counts, pruned_names, rank_masks
from .store import RunStore, Spec, spec_of, tensor_digest
from .train import Trainer, TrainOutcome, snapshot, train_masked

__all__ = ["RoundResult", "run_lottery", "init_weights", "derive_seed", "RunContext", "open_run"]

ModelFn = Callable[[], nn.Module]


@dataclass(frozen=True)
class RoundResult:
    """One finished round: its directory and the contents of its ``metrics.json``.

    Example:
        >>> results = run_lottery(LeNet300100, data, config, "runs/ticket")  # doctest: +SKIP
        >>> [(r.remaining, r.test_accuracy) for r in results]  # doctest: +SKIP
    """

    round: int
    path: Path
    metrics: dict[str, Any]

    @property
    def remaining(self) -> float:
        """Fraction of the pruned tensors' weights still in place."""
        return float(self.metrics["remaining"])

    @property
    def test_accuracy(self) -> float:
        """Test accuracy at the early-stopping iteration."""
        return float(self.metrics["early_stop"]["test_accuracy"])

    @property
    def early_stop_iteration(self) -> int:
        """Iteration of minimum validation loss."""
        return int(self.metrics["early_stop_iteration"])


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from non-negative integers (``numpy.random.SeedSequence``).

    Example:
        >>> derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint32)[0])


def init_weights(model_fn: ModelFn, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build ``model_fn()`` with torch's RNG seeded by ``seed`` (the caller's RNG state is left untouched).

    Example:
        >>> _, a = init_weights(lambda: nn.Linear(2, 2), 3)
        >>> _, b = init_weights(lambda: nn.Linear(2, 2), 3)
        >>> torch.equal(a["weight"], b["weight"])
        True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
    return model, snapshot(model)


@dataclass
class RunContext:
    """Everything a round needs: the model, its data, the store and the pruned names."""

    model: nn.Module
    data: LotteryData
    config: LotteryConfig
    store: RunStore
    names: list[str]
    weights_spec: Spec
    mask_spec: Spec
    trainer: Trainer | None
    progress: bool
    init: dict[str, torch.Tensor]

    def targets(self, round_index: int) -> Targets:
        """The IMP targets of ``round_index``."""
        return imp_targets(self.names, self.config, round_index)

    def read_round(self, round_index: int, *, weights: bool = True) -> tuple[dict[str, Any], Masks, dict | None]:
        """Metrics, masks and (optionally) weights of a finished round, all validated."""
        store = self.store
        metrics = store.read_metrics(round_index)
        masks = store.read_tensors(store.round_path(round_index, "mask.safetensors"), self.mask_spec,
                                   store.recorded_sha(round_index, metrics, "mask.safetensors"))
        state = None
        if weights:
            state = store.read_tensors(store.round_path(round_index, "weights.safetensors"), self.weights_spec,
                                       store.recorded_sha(round_index, metrics, "weights.safetensors"))
        return metrics, masks, state

    def read_rewind(self) -> dict[str, torch.Tensor]:
        """The rewind weights, checked against the checksum round 0 recorded."""
        sha = self.store.recorded_sha(0, self.store.read_metrics(0), "rewind.safetensors")
        return self.store.read_tensors("rewind.safetensors", self.weights_spec, sha)


def open_run(model_fn: ModelFn, data: LotteryData, config: LotteryConfig, out: str | Path, *,
             trainer: Trainer | None = None, progress: bool | None = None) -> RunContext:
    """Bind ``out`` to this run (config hash) and return the context its rounds run in.

    The config hash covers the config (but ``rounds``), the model's parameter
    names and shapes, the data and the initial weights ``model_fn`` produces
    under ``config.seed``: the in-memory initialization is therefore the one
    the run started from.

    Raises:
        ValueError: ``out`` holds a run with a different config, model, data or initialization.
    """
    if not isinstance(config, LotteryConfig):
        raise TypeError(f"run_lottery: config must be a LotteryConfig, got {type(config).__name__}")
    if not isinstance(data, LotteryData):
        raise TypeError(f"run_lottery: data must be a LotteryData, got {type(data).__name__}")
    model, init = init_weights(model_fn, config.seed)
    names = pruned_names(model, config)
    imp_targets(names, config, 0)  # validates output_layer early
    store = RunStore(out)
    identity = {"kind": "imp", "config": {k: v for k, v in config.to_dict().items() if k != "rounds"},
                "model": {n: [list(s), str(d)] for n, (s, d) in spec_of(init).items()},
                "data": data.fingerprint(), "init": tensor_digest(init)}
    store.bind(identity)
    if not (store.root / "init.safetensors").is_file():
        store.write_tensors("init.safetensors", init)
    mask_spec = {n: (s, torch.bool) for n, (s, _) in spec_of(dict(model.named_parameters())).items() if n in names}
    return RunContext(model, data, config, store, names, spec_of(init), mask_spec, trainer, resolve_progress(progress),
                      init)


def run_lottery(model_fn: ModelFn, data: LotteryData, config: LotteryConfig, out: str | Path, *,
                trainer: Trainer | None = None, progress: bool | None = None) -> list[RoundResult]:
    """Find a lottery ticket: train, prune, rewind, retrain, for ``config.rounds`` rounds.

    Round 0 trains the dense model from ``model_fn()`` initialized with
    ``config.seed`` and keeps the weights of iteration ``config.rewind_iteration``.
    Each later round ``r`` prunes the previous round's trained weights by
    magnitude to ``1 - (1 - p)**r`` per layer (``p / 2`` for the output layer;
    or one global ranking, see :class:`LotteryConfig`), rewinds the survivors
    and retrains. Each round's mask, final weights and metrics land in
    ``out/round_XX/``; a rerun checks the finished rounds and skips them, so an
    interrupted run resumes where it stopped and gives bit-identical results
    (given the same threads and torch build).

    Args:
        model_fn: builds the model; called with torch's RNG seeded by ``config.seed``.
        data: train / validation / test splits.
        config: the run's settings.
        out: the run directory.
        trainer: replaces :func:`~prunekit.methods.lottery.train_early_stopping`.
        progress: progress bars (``None``: when stderr is a terminal).

    Returns:
        One :class:`RoundResult` per round, round 0 (dense) first.

    Raises:
        ValueError: ``out`` holds a different run, or a finished round fails its checks.

    Example:
        >>> from prunekit.training.data import load_mnist5k
        >>> from prunekit.methods.lottery import TrainSpec
        >>> from prunekit.apps.models import LeNet300100
        >>> data = LotteryData.carve(*load_mnist5k("train", flat=True), *load_mnist5k("test", flat=True))
        >>> cfg = LotteryConfig(TrainSpec(iterations=1200, eval_every=40), rounds=17, rate=0.2)
        >>> results = run_lottery(LeNet300100, data, cfg, "runs/ticket")  # doctest: +SKIP
    """
    ctx = open_run(model_fn, data, config, out, trainer=trainer, progress=progress)
    results = []
    with progress_bar(ctx.progress, range(config.rounds + 1), desc="lottery rounds", unit="round") as bar:
        for r in bar:
            results.append(_finished_round(ctx, r) if ctx.store.is_finished(r) else _run_round(ctx, r))
            bar.set_postfix(remaining=f"{results[-1].remaining:.1%}", acc=f"{results[-1].test_accuracy:.4f}")
    return results


def _finished_round(ctx: RunContext, r: int) -> RoundResult:
    metrics, masks, _ = ctx.read_round(r, weights=False)
    check_counts(masks, ctx.targets(r), ctx.config.ranking, str(ctx.store.root / ctx.store.round_path(r)))
    if r == 0:
        ctx.store.recorded_sha(0, metrics, "rewind.safetensors")  # the rewind point is part of round 0
    return RoundResult(r, ctx.store.root / ctx.store.round_path(r), metrics)


def _run_round(ctx: RunContext, r: int) -> RoundResult:
    start_time = time.perf_counter()
    store, files = ctx.store, {}
    if r == 0:
        masks, start = full_masks(ctx.model, ctx.names), ctx.init
    else:
        _, prev_masks, prev_weights = ctx.read_round(r - 1)
        ctx.model.load_state_dict(prev_weights)
        masks = rank_masks(ctx.model, ctx.names, ctx.targets(r), prior=prev_masks, ranking=ctx.config.ranking)
        start = ctx.read_rewind()
    files["mask.safetensors"] = store.write_tensors(store.round_path(r, "mask.safetensors"), masks)
    outcome = train_masked(ctx.model, start, masks, ctx.data, ctx.config.train, seed=ctx.config.seed,
                           trainer=ctx.trainer, capture_at=ctx.config.rewind_iteration if r == 0 else None,
                           progress=ctx.progress, desc=f"round {r}")
    if r == 0:
        files["rewind.safetensors"] = store.write_tensors("rewind.safetensors", _captured(outcome))
    files["weights.safetensors"] = store.write_tensors(store.round_path(r, "weights.safetensors"),
                                                       snapshot(ctx.model))
    metrics = round_metrics(r, store.hash, masks, ctx.targets(r), outcome, files, time.perf_counter() - start_time)
    store.write_metrics(r, metrics)
    return RoundResult(r, store.root / store.round_path(r), metrics)


def _captured(outcome: TrainOutcome) -> dict[str, torch.Tensor]:
    if outcome.captured is None:
        raise RuntimeError("the trainer returned no weights for the rewind iteration (capture_at was set)")
    return outcome.captured


def round_metrics(r: int, config_hash: str | None, masks: Masks, targets: Targets, outcome: TrainOutcome,
                  files: Mapping[str, str], seconds: float) -> dict[str, Any]:
    """The JSON record of one round (``metrics.json``)."""
    counts = kept_counts(masks)
    kept, total = sum(k for k, _ in counts.values()), sum(n for _, n in counts.values())
    return {
        "round": r,
        "config_hash": config_hash,
        "remaining": kept / total,
        "layers": {name: {"kept": k, "numel": n, "target_sparsity": targets.of(name)}
                   for name, (k, n) in counts.items()},
        "early_stop_iteration": outcome.early_stop_iteration,
        "early_stop": outcome.early_stop,
        "final": outcome.final,
        "curve": outcome.curve,
        "files": dict(files),
        "seconds": seconds,
    }
