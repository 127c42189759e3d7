"""Sparse recovery: fine-tune a pruned model with distillation from its dense teacher, masks kept.

:func:`recover` is a short fine-tune of the pruned student on in-memory inputs (a
tensor, or a tokenizer's dict of tensors) with a :class:`~prunekit.methods.distill.DistillLoss`,
run through the one training loop (:func:`prunekit.training.loop.run_loop`), so it
resumes bit for bit from its checkpoints (:mod:`prunekit.training.checkpoint`) and shows
the loop's progress bar. Pruned weights stay exact zeros through every optimizer
step: either fixed masks (``masks=``, kept by a :class:`~prunekit.core.masks.MaskKeeper`;
:func:`zero_masks` reads them off a one-shot pruned model) or a
:class:`~prunekit.Pruner` (``pruner=``), whose schedule goes on during the fine-tune
(gradual pruning while distilling). Masks are applied in place by the keeper (no
``.data`` swaps), so sharded parameters are masked the same way.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .._hf import cache_disabled
from .._validate import check_int, check_real
from ..core.distributed import count_true, full_tensor
from ..core.masks import MaskKeeper
from ..core.scope import Selector, resolve_scope
from ..training.checkpoint import Checkpoints, save_checkpoint
from ..training.loop import Inputs, LoopOptions, Position, StepCallback, run_loop, sample_count
from .distill import DistillLoss

__all__ = ["RecoverResult", "recover", "warmup_cosine", "zero_masks"]

LRSchedule = Callable[[int], float]


@dataclass(frozen=True)
class RecoverResult:
    """What :func:`recover` did.

    Attributes:
        steps: optimizer steps of the whole fine-tune (those before a resume included).
        losses: the loss of each step this call ran, in order.
        resumed_from: the step of the checkpoint this call resumed from (``None``: started fresh).
        sparsity: fraction of pruned entries over the masked parameters at the end.
        seconds: wall time of this call.
    """

    steps: int
    losses: list[float]
    resumed_from: int | None
    sparsity: float
    seconds: float


def zero_masks(model: nn.Module, layers: Sequence[Selector] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks (``True`` = kept) of the prunable weights of ``model``: its exact zeros are the pruned entries.

    What a one-shot pruned model (:func:`prunekit.methods.oneshot.prune_oneshot`) hands
    to :func:`recover`. A weight without zeros gets an all-``True`` mask (no constraint).
    Under FSDP2 the masks are full (gathered: a collective, every rank calls it), the same on every rank.

    Args:
        model: the pruned model.
        layers: selectors of the weights (as :class:`prunekit.Pruner`'s ``layers``; ``None``: every prunable weight).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
        >>> zero_masks(net)["0.weight"].tolist()
        [[False, True], [True, False]]
    """
    return {t.name: full_tensor(t.param.detach()) != 0 for t in resolve_scope(model, layers).targets}


def warmup_cosine(steps: int, warmup: int = 0, floor: float = 0.0) -> LRSchedule:
    """A learning-rate factor per step: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``.

    Example:
        >>> f = warmup_cosine(10, warmup=2)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 9)]
        [0.5, 1.0, 1.0, 0.5, 0.038]
    """
    steps = check_int("warmup_cosine", "steps", steps, minimum=1)
    warmup = check_int("warmup_cosine", "warmup", warmup, minimum=0)
    floor = check_real("warmup_cosine", "floor", floor)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def recover(
    student: nn.Module,
    teacher: nn.Module | DistillLoss,
    data: Inputs,
    *,
    optimizer: torch.optim.Optimizer,
    steps: int,
    masks: Mapping[str, torch.Tensor] | None = None,
    pruner: Any | None = None,
    batch_size: int = 8,
    seed: int = 0,
    lr_schedule: LRSchedule | None = None,
    max_grad_norm: float | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    callbacks: Sequence[StepCallback] = (),
    progress: bool | None = None,
    desc: str = "recover",
) -> RecoverResult:
    """Fine-tune the pruned ``student`` to match ``teacher`` on ``data`` for ``steps`` optimizer steps, masks kept.

    Args:
        student: the pruned model, trained in place (its train/eval flags are restored).
        teacher: the dense model (distilled with token KL on logits at temperature 1), or a
            :class:`~prunekit.methods.distill.DistillLoss` saying which terms (hidden-state MSE,
            embedding cosine/MSE for sentence encoders, temperature, the student's own loss).
        data: inputs, first dimension = samples: a tensor (``model(x)``) or a dict of tensors
            (``model(**batch)``, e.g. ``input_ids`` and ``attention_mask``).
        optimizer: over the student's parameters (SGD, Adam, AdamW, ...).
        steps: optimizer steps in all (a resumed run counts the steps before the checkpoint).
        masks: fixed keep-masks (``True`` = kept) by parameter name, e.g. :func:`zero_masks`;
            kept for the fine-tune and released at the end (the model is left plain, zeros in place).
        pruner: instead of ``masks``, a :class:`prunekit.Pruner` (manual or scheduled: its schedule
            goes on with the optimizer's steps), a :class:`prunekit.StructuredPruner` or a
            :class:`~prunekit.core.masks.MaskKeeper` on the student; attached to ``optimizer`` for the call if it is not already, never removed.
        batch_size: samples per step.
        seed: the order of the samples (epoch ``e`` as in :func:`prunekit.training.loop.run_loop`).
        lr_schedule: ``step -> factor`` of each group's initial learning rate (e.g. :func:`warmup_cosine`).
        max_grad_norm: clip the gradients' total norm to this before each step (``None``: no clipping).
        checkpoint: a checkpoint file: resumed from if it exists, written every ``checkpoint_every``
            steps and at the end (model, optimizer, masks and schedule, RNG, position). Under FSDP2
            a collective: full state dicts, written by rank 0, read by every rank (see
            :mod:`prunekit.training.checkpoint`).
        checkpoint_every: steps between checkpoints.
        callbacks: ``callback(model, position)`` after every step, as in ``run_loop``.
        progress: a progress bar (``None``: only on a terminal).
        desc: its label.

    Returns:
        A :class:`RecoverResult`.

    Raises:
        ValueError / TypeError: neither or both of ``masks`` and ``pruner``, a teacher that is (or shares
            parameters with) the student, empty data, a bad count or rate.

    Example:
        >>> import copy
        >>> teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> student = copy.deepcopy(teacher)
        >>> with torch.no_grad():
        ...     student[0].weight[:, :4] = 0
        >>> opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        >>> result = recover(student, teacher, torch.randn(64, 8), optimizer=opt, steps=20,
        ...                  masks=zero_masks(student), progress=False)
        >>> result.steps, bool((student[0].weight[:, :4] == 0).all())
        (20, True)
    """
    owner = "recover"
    loss = _distill_loss(owner, student, teacher)
    samples = _check_args(owner, student, data, optimizer, masks, pruner)
    steps = check_int(owner, "steps", steps, minimum=1)
    every = check_int(owner, "checkpoint_every", checkpoint_every, minimum=1)
    if max_grad_norm is not None and check_real(owner, "max_grad_norm", max_grad_norm) <= 0:
        raise ValueError(f"{owner}: max_grad_norm must be > 0 or None, got {max_grad_norm}")
    if lr_schedule is not None and not callable(lr_schedule):
        raise TypeError(f"{owner}: lr_schedule must be a callable step -> factor, got {type(lr_schedule).__name__}")
    options = LoopOptions(batch_size=check_int(owner, "batch_size", batch_size, minimum=1),
                          seed=check_int(owner, "seed", seed, minimum=0), max_steps=steps,
                          progress=progress, desc=desc)
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        engine = _masking(stack, student, optimizer, masks, pruner)
        ckpt = None if checkpoint is None else Checkpoints(Path(checkpoint), optimizer, pruner=engine, every=every)
        start = None if ckpt is None else ckpt.resume(student)
        if max_grad_norm is not None:
            stack.callback(optimizer.register_step_pre_hook(_clipper(student, max_grad_norm)).remove)
        stack.enter_context(cache_disabled(student))  # a KV cache is of no use to a training step
        stack.enter_context(cache_disabled(loss.teacher))
        losses: list[torch.Tensor] = []
        pos = run_loop(student, optimizer, data, torch.arange(samples),
                       _with_loss(options, loss, losses), start=start,
                       callbacks=_step_callbacks(optimizer, lr_schedule, start, loss, callbacks, ckpt))
        if ckpt is not None and pos.step % every:  # the end is a checkpoint too: a rerun finds the work done
            save_checkpoint(ckpt.path, model=student, optimizer=optimizer, pruner=engine, position=pos)
        sparsity = _sparsity(engine)
    return RecoverResult(steps=pos.step, losses=[float(v) for v in losses],
                         resumed_from=None if start is None else start.step, sparsity=sparsity,
                         seconds=time.perf_counter() - began)


def _distill_loss(owner: str, student: nn.Module, teacher: Any) -> DistillLoss:
    if not isinstance(student, nn.Module):
        raise TypeError(f"{owner}: student must be an nn.Module, got {type(student).__name__}")
    loss = teacher if isinstance(teacher, DistillLoss) else DistillLoss(teacher) if isinstance(teacher, nn.Module) \
        else None
    if loss is None:
        raise TypeError(f"{owner}: teacher must be an nn.Module or a DistillLoss, got {type(teacher).__name__}")
    if loss.teacher is student:
        raise ValueError(f"{owner}: the teacher is the student; distil into a copy (copy.deepcopy(teacher) before "
                         "pruning)")
    own = {id(p) for p in student.parameters()}
    shared = [name for name, p in loss.teacher.named_parameters() if id(p) in own]
    if shared:
        raise ValueError(f"{owner}: the teacher shares parameters with the student ({', '.join(shared[:3])}); "
                         "distil into a copy (copy.deepcopy(teacher) before pruning)")
    return loss


def _check_args(owner: str, student: nn.Module, data: Any, optimizer: Any, masks: Any, pruner: Any) -> int:
    """Check the data, optimizer and masking arguments; the number of samples."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if (masks is None) == (pruner is None):
        raise ValueError(f"{owner}: give masks= (fixed masks, e.g. zero_masks(student)) or pruner= (a prunekit.Pruner "
                         "or MaskKeeper on the student), exactly one; without either the pruned weights would revive")
    if masks is not None and not isinstance(masks, Mapping):
        raise TypeError(f"{owner}: masks must be a dict of bool tensors by parameter name, got {type(masks).__name__}")
    if pruner is not None and not all(callable(getattr(pruner, a, None)) for a in ("attach", "detach", "state_dict")):
        raise TypeError(f"{owner}: pruner must be a prunekit.Pruner or MaskKeeper, got {type(pruner).__name__}")
    tensors = list(data.values()) if isinstance(data, Mapping) else [data]
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tensors):
        raise TypeError(f"{owner}: data must be a tensor or a non-empty dict of tensors with a sample dimension")
    samples = sample_count(data)
    if samples == 0:
        raise ValueError(f"{owner}: data holds no sample")
    return samples


def _masking(stack: contextlib.ExitStack, student: nn.Module, optimizer: torch.optim.Optimizer,
             masks: Mapping[str, torch.Tensor] | None, pruner: Any | None) -> Any:
    """The keeper of the masks for the call, attached to ``optimizer``; undone when ``stack`` closes."""
    if masks is not None:
        keeper = MaskKeeper(student, list(masks), owner="recover")
        stack.callback(keeper.remove)  # the fine-tuned model is left plain, zeros in place
        keeper.set_masks(dict(masks))
        keeper.attach(optimizer)
        return keeper
    if not any(o is optimizer for o in _attached(pruner)):
        pruner.attach(optimizer)
        stack.callback(pruner.detach, optimizer)
    return pruner


def _attached(engine: Any) -> tuple[torch.optim.Optimizer, ...]:
    """The optimizers ``engine`` follows (a StructuredPruner tells through its keeper)."""
    own = getattr(engine, "optimizers", None)
    return tuple(own if own is not None else engine.keeper.optimizers)


def _clipper(student: nn.Module, max_norm: float) -> Callable[..., None]:
    params = [p for p in student.parameters() if p.requires_grad]

    def clip(optimizer: Any, args: Any, kwargs: Any) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)

    return clip


def _with_loss(options: LoopOptions, loss: DistillLoss, seen: list[torch.Tensor]) -> LoopOptions:
    def batch_loss(model: nn.Module, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        value = loss(model, inputs)
        seen.append(value.detach())
        return value

    return replace(options, batch_loss=batch_loss)


def _step_callbacks(optimizer: torch.optim.Optimizer, lr_schedule: LRSchedule | None, start: Position | None,
                    loss: DistillLoss, user: Iterable[StepCallback], ckpt: Checkpoints | None) -> list[StepCallback]:
    """Learning rate for the next step, the user's callbacks, the bar's terms, then the checkpoint (sees it all)."""
    out: list[StepCallback] = []
    if lr_schedule is not None:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # torch's schedulers keep the base rate under this name too
        _set_lr(optimizer, lr_schedule, 0 if start is None else start.step)
        out.append(lambda model, pos: _set_lr(optimizer, lr_schedule, pos.step))
    out.extend(user)
    out.append(lambda model, pos: {name: f"{float(v):.4f}" for name, v in loss.last.items()})
    if ckpt is not None:
        out.append(ckpt)
    return out


def _set_lr(optimizer: torch.optim.Optimizer, schedule: LRSchedule, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * float(schedule(step))


def _sparsity(engine: Any) -> float:
    keeps = list(engine.masks.values())
    total = sum(k.numel() for k in keeps)
    return sum(count_true(~k) for k in keeps) / total if total else 0.0
