"""Training with a fixed mask: early-stopping bookkeeping and a snapshot at the rewind iteration.

The default trainer is :func:`prunekit.training.loop.run_loop` (epoch ``e``
shuffled with :func:`prunekit.training.loop.epoch_seed`) for exactly
``spec.iterations`` steps, with one callback: every ``eval_every`` steps it
measures the validation loss; the early-stopping iteration is the one of
minimum validation loss (the first, on ties). Test accuracy is measured once,
on the weights of that iteration, and once on the final weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch
from torch import nn

from ...training.loop import LoopOptions, Position, evaluate, run_loop
from .config import TrainSpec
from .data import LotteryData
from .masks import masking_pruner, set_masks

__all__ = ["TrainOutcome", "Trainer", "train_early_stopping", "train_masked", "make_optimizer", "snapshot"]

State = dict[str, torch.Tensor]


@dataclass
class TrainOutcome:
    """What one training produced (the trained weights stay in the model).

    Attributes:
        curve: ``{"iteration", "val_loss", "val_accuracy"}`` at each evaluation.
        early_stop_iteration: iteration of minimum validation loss.
        early_stop: ``val_loss``, ``val_accuracy``, ``test_loss``, ``test_accuracy`` at that iteration.
        final: the same four at the last iteration.
        captured: the model's ``state_dict`` at ``capture_at`` (``None`` if not asked).
    """

    curve: list[dict[str, float]]
    early_stop_iteration: int
    early_stop: dict[str, float]
    final: dict[str, float]
    captured: State | None = None


class Trainer(Protocol):
    """``trainer(model, optimizer, data, spec, *, seed, capture_at, progress, desc) -> TrainOutcome``."""

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: LotteryData, spec: TrainSpec, *,
                 seed: int, capture_at: int | None = None, progress: bool = False,
                 desc: str = "train") -> TrainOutcome: ...


def snapshot(model: nn.Module) -> State:
    """Detached copies of ``model.state_dict()``."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """A fresh optimizer for one training, as ``spec`` says."""
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)


class _EarlyStopping:
    """The loop's callback: validation every ``spec.eval_every`` steps and at the last, a copy of the best weights.

    Also captures the weights after ``capture_at`` steps (the late-rewinding point).
    """

    def __init__(self, data: LotteryData, spec: TrainSpec, capture_at: int | None) -> None:
        self.data, self.spec, self.capture_at = data, spec, capture_at
        self.curve: list[dict[str, float]] = []
        self.best: tuple[float, int, State] | None = None
        self.captured: State | None = None

    def __call__(self, model: nn.Module, pos: Position) -> dict[str, str] | None:
        """After optimizer step ``pos.step``: capture, and evaluate when due; the bar's postfix."""
        if pos.step == self.capture_at:
            self.captured = snapshot(model)
        if pos.step % self.spec.eval_every and pos.step != self.spec.iterations:
            return None
        return {"val_loss": f"{self.observe(model, pos.step)['loss']:.4f}"}

    def observe(self, model: nn.Module, iteration: int) -> dict[str, float]:
        val = evaluate(model, self.data.X_val, self.data.y_val)
        self.curve.append({"iteration": iteration, "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        if self.best is None or val["loss"] < self.best[0]:
            self.best = (val["loss"], iteration, snapshot(model))
        return val

    def outcome(self, model: nn.Module) -> TrainOutcome:
        assert self.best is not None, "at least one evaluation happens (the last iteration)"
        final = self._scores(model)
        current = snapshot(model)
        model.load_state_dict(self.best[2])
        early = self._scores(model)
        model.load_state_dict(current)  # leave the final weights in the model: the next round prunes them
        return TrainOutcome(self.curve, self.best[1], early, final, self.captured)

    def _scores(self, model: nn.Module) -> dict[str, float]:
        val = evaluate(model, self.data.X_val, self.data.y_val)
        test = evaluate(model, self.data.X_test, self.data.y_test)
        return {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "test_loss": test["loss"], "test_accuracy": test["accuracy"]}


def train_early_stopping(model: nn.Module, optimizer: torch.optim.Optimizer, data: LotteryData, spec: TrainSpec, *,
                         seed: int, capture_at: int | None = None, progress: bool = False,
                         desc: str = "train") -> TrainOutcome:
    """Train for ``spec.iterations`` steps, evaluating every ``spec.eval_every``; the default :class:`Trainer`.

    Args:
        model: trained in place; ends with its final weights.
        optimizer: updates ``model`` (a Pruner may be attached to it).
        data: train/val/test splits.
        spec: iterations, batch size, evaluation interval.
        seed: seed of the sample order (epoch ``e`` uses ``epoch_seed(seed, e)``).
        capture_at: also return a copy of the weights after this many steps (0: before training).
        progress: show a tqdm bar.
        desc: label of the bar.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> data = LotteryData(*(torch.randn(16, 4), torch.randint(0, 2, (16,))) * 3)
        >>> out = train_early_stopping(model, torch.optim.Adam(model.parameters()), data,
        ...                            TrainSpec(iterations=8, batch_size=4, eval_every=4), seed=0)
        >>> [p["iteration"] for p in out.curve]
        [4, 8]
    """
    tracker = _EarlyStopping(data, spec, capture_at)
    if capture_at == 0:
        tracker.captured = snapshot(model)
    options = LoopOptions(batch_size=spec.batch_size, seed=seed, max_steps=spec.iterations, progress=progress,
                          desc=desc, leave=False)
    run_loop(model, optimizer, data.X_train, data.y_train, options, callbacks=[tracker])
    return tracker.outcome(model)


def train_masked(model: nn.Module, start: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 data: LotteryData, spec: TrainSpec, *, seed: int, trainer: Trainer | None = None,
                 capture_at: int | None = None, progress: bool = False, desc: str = "train") -> TrainOutcome:
    """Load ``start`` into ``model``, apply ``masks`` and train with them held fixed.

    A :class:`prunekit.Pruner` over exactly the masked parameters is attached
    to a fresh optimizer, so pruned weights stay exactly zero (their gradients
    and optimizer state are zeroed, and masks are re-applied after each step).

    Raises:
        RuntimeError: the trainer changed a pruned weight anyway (it updated
            weights outside the optimizer it was given).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 2))
        >>> masks = {"0.weight": torch.tensor([[True, False, True, False]] * 2)}
        >>> data = LotteryData(*(torch.randn(16, 4), torch.randint(0, 2, (16,))) * 3)
        >>> _ = train_masked(model, model.state_dict(), masks, data, TrainSpec(iterations=4, batch_size=4), seed=0)
        >>> bool((model[0].weight[:, 1::2] == 0).all())
        True
    """
    model.load_state_dict(dict(start))
    pruner = masking_pruner(model, list(masks))
    try:
        set_masks(pruner, masks)
        optimizer = make_optimizer(model, spec)
        pruner.attach(optimizer)
        outcome = (trainer or train_early_stopping)(model, optimizer, data, spec, seed=seed, capture_at=capture_at,
                                                    progress=progress, desc=desc)
        _check_pruned_zero(model, masks)
        return outcome
    finally:
        pruner.remove()


def _check_pruned_zero(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    params: dict[str, Any] = dict(model.named_parameters())
    moved = {name: int((params[name].detach()[~mask.to(params[name].device)] != 0).sum())
             for name, mask in masks.items()}
    moved = {name: count for name, count in moved.items() if count}
    if moved:
        raise RuntimeError(f"train_masked: the trainer changed pruned weights {moved}; it must update the model "
                           "only through the optimizer it is given")
