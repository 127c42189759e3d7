"""Lottery tickets: iterative magnitude pruning with rewinding, and its controls.

Frankle & Carbin (2019): train, prune the smallest weights, reset the survivors
to their initial values and retrain; repeated, this finds sparse subnetworks
("winning tickets") that train to the dense network's accuracy. Frankle et al.
(2019) rewind to an early iteration ``k`` instead of 0 ("late rewinding").

* :func:`run_lottery` runs the rounds, resumably: each round's mask, weights
  and metrics are saved under ``out/round_XX/``, and a rerun skips finished rounds.
* :func:`run_control` trains the controls at the ticket's sparsities: random
  reinitialization, random mask, one-shot magnitude pruning.

Masks are computed and enforced by :class:`prunekit.Pruner`.

Example:
    >>> from prunekit.training.data import load_mnist5k
    >>> from prunekit.apps.models import LeNet300100
    >>> data = LotteryData.carve(*load_mnist5k("train", flat=True), *load_mnist5k("test", flat=True))
    >>> cfg = LotteryConfig(TrainSpec(iterations=1200, eval_every=40), rounds=17, rate=0.2)
    >>> ticket = run_lottery(LeNet300100, data, cfg, "runs/ticket")  # doctest: +SKIP
    >>> reinit = run_control("reinit", LeNet300100, data, cfg, "runs/ticket", "runs/reinit")  # doctest: +SKIP
"""

from .config import LotteryConfig, TrainSpec, pruned_count, round_sparsity
from .controls import CONTROLS, run_control
from .data import LotteryData
from .imp import RoundResult, derive_seed, init_weights, run_lottery
from .masks import Targets, imp_targets, kept_counts, pruned_names, random_masks_like, rank_masks
from .store import RunStore, tensor_digest
from .train import Trainer, TrainOutcome, train_early_stopping, train_masked

__all__ = [
    "CONTROLS",
    "LotteryConfig",
    "LotteryData",
    "RoundResult",
    "RunStore",
    "Targets",
    "TrainOutcome",
    "TrainSpec",
    "Trainer",
    "derive_seed",
    "imp_targets",
    "init_weights",
    "kept_counts",
    "pruned_count",
    "pruned_names",
    "random_masks_like",
    "rank_masks",
    "round_sparsity",
    "run_control",
    "run_lottery",
    "tensor_digest",
    "train_early_stopping",
    "train_masked",
]
