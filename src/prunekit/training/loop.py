"""The one training loop, its small hooks, and an evaluation helper, for in-memory data.

Every training in prunekit runs through :func:`run_loop`: the demo and the
experiments (through :func:`train`), recipe phases with checkpoints and resume
(:func:`prunekit.apps.recipe.loop.run_phase`) and lottery-ticket trainings with
early stopping (:func:`prunekit.methods.lottery.train.train_early_stopping`).
What they need beyond the loop comes in through three hooks: a start
:class:`Position` (resume: batches before it are skipped), callbacks run after
every optimizer step (checkpoints, evaluation, weight capture) and a progress bar.
Inputs may be one tensor or a dict of tensors (a tokenizer's output: every batch is
then a dict), and a loss may see the whole batch and the model
(:attr:`LoopOptions.batch_loss`: distillation, :func:`prunekit.methods.recover.recover`).

The loop is deliberately ordinary (zero_grad, forward, backward, step): a
:class:`prunekit.Pruner` attached to the optimizer prunes through it unchanged,
because it hooks ``optimizer.step()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .._modes import in_mode
from .._progress import progress_bar
from .._validate import check_int
from .data import make_loader

__all__ = ["BatchLoss", "Inputs", "LoopOptions", "Position", "StepCallback", "run_loop", "train", "evaluate",
           "epoch_seed", "sample_count"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The inputs of a run: one tensor, or named tensors with the same first dimension (``model(**batch)``-style).
Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]
# ``batch_loss(model, inputs, targets) -> scalar`` of one batch, forward pass included.
BatchLoss = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


def sample_count(inputs: Inputs) -> int:
    """Samples in ``inputs``: the first dimension of the tensor, or of every tensor of a dict (they must agree).

    Raises:
        ValueError: a dict that is empty or whose tensors disagree on the first dimension.

    Example:
        >>> sample_count(torch.zeros(5, 3)), sample_count({"input_ids": torch.zeros(4, 7), "mask": torch.ones(4, 7)})
        (5, 4)
    """
    if isinstance(inputs, Mapping):
        sizes = {key: len(value) for key, value in inputs.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"run_loop: a dict of inputs needs tensors with one first dimension, got {sizes}")
        return next(iter(sizes.values()))
    return len(inputs)


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of ``epoch`` in a run seeded with ``seed``.

    Mixing with ``numpy.random.SeedSequence`` (rather than ``seed + epoch``)
    keeps neighbouring runs from sharing epochs: seed 0 epoch 1 and seed 1
    epoch 0 get unrelated orders.

    Example:
        >>> epoch_seed(0, 1) != epoch_seed(1, 0)
        True
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint32)[0])


@dataclass
class Position:
    """Where a training stands: the next batch to run and the losses so far (what a checkpoint records).

    Attributes:
        epoch: the epoch being run (0-based).
        batch: batches of that epoch already run.
        step: optimizer steps run in all.
        loss_sum: summed per-sample loss of the epoch so far.
        loss_count: samples of the epoch so far.
        epoch_losses: mean per-sample loss of each finished epoch.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    epoch_losses: list[float] = field(default_factory=list)

    def record(self, loss: float, samples: int, per_epoch: int) -> dict[str, object]:
        """Count one optimizer step on ``samples`` samples; close the epoch after its last batch.

        Returns:
            The bar's view of this step (epoch, running mean loss), taken before an epoch is closed.

        Example:
            >>> pos = Position()
            >>> pos.record(2.0, 4, per_epoch=1), pos.epoch_losses, pos.epoch
            ({'epoch': 1, 'loss': '2.0000'}, [2.0], 1)
        """
        self.loss_sum += loss * samples  # per-sample: a short last batch keeps its true weight
        self.loss_count += samples
        self.step += 1
        self.batch += 1
        shown: dict[str, object] = {"epoch": self.epoch + 1, "loss": f"{self.loss_sum / self.loss_count:.4f}"}
        if self.batch == per_epoch:
            self.epoch_losses.append(self.loss_sum / self.loss_count)
            self.epoch, self.batch, self.loss_sum, self.loss_count = self.epoch + 1, 0, 0.0, 0
        return shown


# ``callback(model, position)`` after every optimizer step (the position already counts that step, and an
# epoch's last step has closed the epoch); it may return entries for the progress bar's postfix.
StepCallback = Callable[[nn.Module, Position], "Mapping[str, object] | None"]


@dataclass(frozen=True)
class LoopOptions:
    """How :func:`run_loop` runs: length, batches, order, loss and progress bar.

    Attributes:
        batch_size: samples per optimizer step.
        seed: epoch ``e`` visits the samples in the order of ``epoch_seed(seed, e)``.
        epochs: passes over the data (``None``: as many as ``max_steps`` needs).
        max_steps: stop after this many optimizer steps in all, mid-epoch if need be (``None``: no limit).
        loss_fn: ``loss_fn(logits, targets) -> scalar`` (``None``: cross-entropy).
        batch_loss: ``batch_loss(model, inputs, targets) -> scalar``, the whole step's loss
            forward pass included, in place of ``loss_fn(model(inputs), targets)`` (a teacher's
            distillation loss, a model called as ``model(**inputs)``); not with ``loss_fn``.
        progress: show a bar (``None``: only when stderr is a terminal).
        desc: label of the bar.
        leave: keep the finished bar on screen (``False`` for bars nested in an outer one).

    Example:
        >>> LoopOptions(batch_size=8, max_steps=100).total_steps(samples=20)
        100
    """

    batch_size: int
    seed: int = 0
    epochs: int | None = None
    max_steps: int | None = None
    loss_fn: LossFn | None = None
    batch_loss: BatchLoss | None = None
    progress: bool | None = False
    desc: str = "train"
    leave: bool = True

    def __post_init__(self) -> None:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("LoopOptions: give epochs, max_steps or both")
        if self.loss_fn is not None and self.batch_loss is not None:
            raise ValueError("LoopOptions: give loss_fn or batch_loss, not both")

    def total_steps(self, samples: int) -> int:
        """Optimizer steps of a whole run over ``samples`` training samples."""
        by_epochs = None if self.epochs is None else self.epochs * math.ceil(samples / self.batch_size)
        return min(s for s in (by_epochs, self.max_steps) if s is not None)

    def finished(self, pos: Position) -> bool:
        """Whether a run standing at ``pos`` is over."""
        return (self.epochs is not None and pos.epoch >= self.epochs) or (
            self.max_steps is not None and pos.step >= self.max_steps)


def run_loop(model: nn.Module, optimizer: torch.optim.Optimizer, X: Inputs, y: torch.Tensor,
             options: LoopOptions, *, start: Position | None = None,
             callbacks: Sequence[StepCallback] = ()) -> Position:
    """Train ``model`` on in-memory ``(X, y)``, from ``start`` on, calling ``callbacks`` after every step.

    The model is in training mode while it trains and every module's own mode
    is restored afterwards; batches are moved to the device of its
    parameters. Inputs are not validated here (the public adapters do that).

    Args:
        model: trained in place.
        optimizer: updates the model's parameters; a Pruner may be attached.
        X: inputs, first dimension = samples: a tensor, or a dict of tensors (each batch
            is then the dict of those tensors' rows, for ``batch_loss``).
        y: targets.
        options: length, batch size, order, loss, progress bar.
        start: resume from this position (not modified): the batches of its
            epoch before ``start.batch`` are skipped, so a run cut at any step
            and resumed from the saved position (and model, optimizer and RNG
            state) gives bit-identical weights.
        callbacks: run in order after every optimizer step.

    Returns:
        The final position (``epoch_losses`` holds each finished epoch's mean per-sample loss).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> X, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> steps = []
        >>> pos = run_loop(model, opt, X, y, LoopOptions(batch_size=8, max_steps=5),
        ...                callbacks=[lambda m, p: steps.append(p.step)])
        >>> steps, pos.epoch, pos.batch
        ([1, 2, 3, 4, 5], 1, 2)

        Named inputs and a loss that calls the model itself:

        >>> inputs = {"a": torch.randn(20, 4), "b": torch.randn(20, 4)}
        >>> options = LoopOptions(batch_size=8, max_steps=3,
        ...                       batch_loss=lambda m, xb, yb: m(xb["a"] + xb["b"]).pow(2).mean())
        >>> run_loop(model, opt, inputs, torch.arange(20), options).step
        3
    """
    pos = Position() if start is None else replace(start, epoch_losses=list(start.epoch_losses))
    loss_fn = options.loss_fn if options.loss_fn is not None else nn.CrossEntropyLoss()
    with in_mode(model, training=True), progress_bar(options.progress, total=options.total_steps(sample_count(X)),
                                                      initial=pos.step, desc=options.desc, unit="step",
                                                      leave=options.leave) as bar:
        run = _Run(model, optimizer, X, y, options, loss_fn, callbacks, bar)
        while not options.finished(pos):
            if not run.epoch(pos):  # without this, empty data or a position past the epoch's end would never end
                raise ValueError(f"run_loop: no batch left to run in epoch {pos.epoch} (empty data, or a start "
                                 f"position past the end of the epoch: batch {pos.batch})")
    return pos


@dataclass
class _Run:
    """What one :func:`run_loop` call holds while it runs; its methods are the epoch and the step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    X: Inputs
    y: torch.Tensor
    options: LoopOptions
    loss_fn: LossFn
    callbacks: Sequence[StepCallback]
    bar: tqdm
    postfix: dict[str, object] = field(default_factory=dict)  # what a callback reports stays until it reports again

    def epoch(self, pos: Position) -> int:
        """Run the rest of epoch ``pos.epoch`` (or up to ``max_steps``), advancing ``pos``; the steps run."""
        samples = sample_count(self.X)
        device, per_epoch = _device_of(self.model), math.ceil(samples / self.options.batch_size)
        named = isinstance(self.X, Mapping)
        # A dict is loaded through its sample indices: the same order as a tensor of as many samples.
        loader = make_loader(torch.arange(samples) if named else self.X, self.y, batch_size=self.options.batch_size,
                             shuffle=True, seed=epoch_seed(self.options.seed, pos.epoch))
        first = pos.step
        for index, (xb, yb) in enumerate(loader):
            if index < pos.batch:  # already run before the position this run resumed from
                continue
            batch = {k: v[xb].to(device) for k, v in self.X.items()} if named else xb.to(device)
            loss = self.step(batch, yb.to(device))
            self.postfix.update(pos.record(loss, len(xb), per_epoch))
            for callback in self.callbacks:
                self.postfix.update(callback(self.model, pos) or {})
            self.bar.update(1)
            self.bar.set_postfix(self.postfix, refresh=False)
            if self.options.finished(pos):
                break
        return pos.step - first

    def step(self, xb: Any, yb: torch.Tensor) -> float:
        """One ordinary update; returns the batch's mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        batch_loss = self.options.batch_loss
        loss = batch_loss(self.model, xb, yb) if batch_loss is not None else self.loss_fn(self.model(xb), yb)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_data(owner: str, X: torch.Tensor, y: torch.Tensor) -> None:
    for name, value in (("X", X), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if X.dim() == 0 or y.dim() == 0 or len(X) != len(y):
        raise ValueError(f"{owner}: X and y must have the same number of samples, got shapes "
                         f"{tuple(X.shape)} and {tuple(y.shape)}")
    if len(X) == 0:
        raise ValueError(f"{owner}: X and y are empty")


def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    optimizer: torch.optim.Optimizer,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` on in-memory ``(X, y)`` with mini-batches; return the mean loss of each epoch.

    Epoch ``e`` visits the samples in the order of
    ``make_loader(..., seed=epoch_seed(seed, e))``, so a run is reproducible
    given the model's initial weights and the optimizer. The model is put in
    training mode and its previous mode is restored afterwards. Batches are
    moved to the device of the model's parameters. This is :func:`run_loop`
    with its arguments checked.

    Args:
        model: the model to train (in place).
        X: inputs, first dimension = samples.
        y: targets (class indices for the default loss).
        epochs: passes over the data (>= 0).
        batch_size: samples per optimizer step (>= 1).
        optimizer: updates the model's parameters; a Pruner may be attached.
        seed: non-negative seed of the shuffling order.
        loss_fn: ``loss_fn(logits, targets) -> scalar``; default cross-entropy.
        progress: show a tqdm bar (``None``: only when stderr is a terminal).
        desc: label of the progress bar.

    Returns:
        Mean per-sample loss of each epoch (losses of a batch are weighted by its size).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> X, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> losses = train(model, X, y, epochs=3, batch_size=8, optimizer=opt, progress=False)
        >>> len(losses)
        3
    """
    owner = "train"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_data(owner, X, y)
    options = LoopOptions(epochs=check_int(owner, "epochs", epochs, minimum=0),
                          batch_size=check_int(owner, "batch_size", batch_size, minimum=1),
                          seed=check_int(owner, "seed", seed, minimum=0), loss_fn=loss_fn, progress=progress, desc=desc)
    return run_loop(model, optimizer, X, y, options).epoch_losses


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a classifier on ``(X, y)``.

    Runs in eval mode under ``torch.no_grad()`` in batches of ``batch_size`` and
    restores every module's previous train/eval mode.

    Args:
        model: a classifier returning logits ``(N, num_classes)``.
        X: inputs, first dimension = samples.
        y: int64 class indices ``(N,)``.
        batch_size: samples per forward pass (>= 1).

    Returns:
        ``{"loss": mean per-sample cross-entropy, "accuracy": fraction correct in [0, 1]}``.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> X, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
        >>> sorted(evaluate(model, X, y, batch_size=10))
        ['accuracy', 'loss']
    """
    owner = "evaluate"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    _check_data(owner, X, y)
    batch_size = check_int(owner, "batch_size", batch_size, minimum=1)
    device = _device_of(model)
    loss_sum, correct = 0.0, 0
    with in_mode(model, training=False):
        for start in range(0, len(X), batch_size):
            xb, yb = X[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            logits = model(xb)
            # Summed per batch, divided once: a short last batch keeps its true weight.
            loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == yb).sum())
    return {"loss": loss_sum / len(X), "accuracy": correct / len(X)}
