"""Pruning and distillation in a ``transformers.Trainer`` script, in a few lines.

* :class:`PruneDistillCallback` — a ``TrainerCallback`` that keeps a
  :class:`prunekit.Pruner`'s (or :class:`~prunekit.core.masks.MaskKeeper`'s) masks
  applied after every optimizer step of the Trainer (a scheduled Pruner goes on
  pruning with the Trainer's steps), writes the mask state into every Trainer
  checkpoint (``prunekit_masks.safetensors``) and restores it on
  ``trainer.train(resume_from_checkpoint=...)``, so a resumed run is the uninterrupted one.
* :class:`DistillMixin` / :class:`DistillTrainer` — a Trainer whose loss is a
  :class:`~prunekit.methods.distill.DistillLoss` from a frozen teacher, with the
  callback added for you.

Example::

    teacher = AutoModelForCausalLM.from_pretrained(path)
    student = copy.deepcopy(teacher)
    pruner = prunekit.Pruner(student, prunekit.PolynomialDecay(0.0, 0.5, 0, 500, frequency=50))
    trainer = DistillTrainer(model=student, args=args, train_dataset=ds,
                             distill=DistillLoss(teacher, kl=1.0, temperature=2.0), pruner=pruner)
    trainer.train()

This module imports ``transformers``; nothing in the library imports this module.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .._io import atomic_write_bytes
from ..methods.distill import DistillLoss

__all__ = ["MASKS_FILE", "DistillMixin", "DistillTrainer", "PruneDistillCallback"]

MASKS_FILE = "prunekit_masks.safetensors"
_FORMAT, _VERSION, _META_KEY = "prunekit.trainer_masks", 1, "prunekit"


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside the Trainer's (accelerate wraps it in an ``AcceleratedOptimizer``)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"PruneDistillCallback: the Trainer's optimizer is a {type(optimizer).__name__} without a "
                        "torch.optim.Optimizer inside; the masks follow a torch optimizer's steps")
    return inner


class PruneDistillCallback(TrainerCallback):
    """Keep pruning masks through a ``transformers.Trainer`` run: every optimizer step, every checkpoint, every resume.

    At the start of training the pruner is attached to the Trainer's torch optimizer
    (pruned weights get no gradient, momentum and Adam moments of pruned entries are
    cleaned, masks are re-applied right after each ``optimizer.step()``, a scheduled
    Pruner advances one step per optimizer step); at the end it is detached again.
    Each Trainer checkpoint gets the pruner's state (masks, step, schedule) in
    ``prunekit_masks.safetensors``; a resumed run loads it from ``resume_from``, else
    from ``args.resume_from_checkpoint``, else from ``output_dir/checkpoint-<step>``
    (where ``trainer.train(resume_from_checkpoint=True)`` resumes).

    Args:
        pruner: a :class:`prunekit.Pruner` (manual or scheduled) or :class:`~prunekit.core.masks.MaskKeeper`
            on the Trainer's model, built before the Trainer starts.
        resume_from: the checkpoint folder a resumed run reads the masks from (``None``: found as above).

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   callbacks=[PruneDistillCallback(prunekit.Pruner(model, 0.5))])  # doctest: +SKIP
    """

    def __init__(self, pruner: Any, *, resume_from: str | os.PathLike[str] | None = None) -> None:
        if not all(callable(getattr(pruner, a, None)) for a in ("attach", "detach", "state_dict", "load_state_dict")):
            raise TypeError(f"PruneDistillCallback: pruner must be a prunekit.Pruner or MaskKeeper, "
                            f"got {type(pruner).__name__}")
        self.pruner = pruner
        self.resume_from = None if resume_from is None else os.fspath(resume_from)
        self._attached: torch.optim.Optimizer | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Restore the masks of a resumed run, then follow the Trainer's optimizer."""
        if state.global_step > 0:  # a fresh TrainerState starts at 0: this run resumes from a checkpoint
            self.load(self._resume_file(args, state), state.global_step)
        inner = _torch_optimizer(optimizer)
        if not any(o is inner for o in self._followed()):
            self.pruner.attach(inner)
            self._attached = inner

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Write the mask state into the checkpoint folder the Trainer just wrote."""
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.save(os.path.join(folder, MASKS_FILE), state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Stop following the optimizer (the pruner and its masks stay, for ``strip`` or another run)."""
        if self._attached is not None:
            if any(o is self._attached for o in self._followed()):
                self.pruner.detach(self._attached)
            self._attached = None

    def _followed(self) -> tuple[torch.optim.Optimizer, ...]:
        own = getattr(self.pruner, "optimizers", None)  # a StructuredPruner tells through its keeper
        return tuple(own if own is not None else self.pruner.keeper.optimizers)

    # -- the mask file -------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], global_step: int) -> None:
        """Write the pruner's state at ``global_step`` to ``path`` (safetensors + JSON, atomically)."""
        state = self.pruner.state_dict()
        meta = {"format": _FORMAT, "version": _VERSION, "global_step": global_step,
                "pruner": {k: v for k, v in state.items() if k != "masks"}}
        masks = {name: mask.detach().cpu().contiguous() for name, mask in state["masks"].items()}
        atomic_write_bytes(path, st_save(masks, metadata={_META_KEY: json.dumps(meta)}))

    def load(self, path: str | os.PathLike[str], global_step: int | None = None) -> None:
        """Load the pruner's state from ``path``; ``global_step``: the step the Trainer resumes at, checked.

        Raises:
            ValueError: not a prunekit mask file, or saved at another step than the Trainer resumes at.
        """
        where = f"PruneDistillCallback: {os.fspath(path)!r}"
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
            with open(path, "rb") as f:
                masks = st_load(f.read())
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # safetensors' own error is none of the others
            raise ValueError(f"{where} is unreadable: {exc}") from None
        if (not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != _VERSION
                or not isinstance(meta.get("pruner"), dict)):
            raise ValueError(f"{where} is not a prunekit mask file of version {_VERSION}")
        if global_step is not None and meta.get("global_step") != global_step:
            raise ValueError(f"{where} holds the masks of step {meta.get('global_step')}, but the Trainer resumes at "
                             f"step {global_step}; pass resume_from= the checkpoint folder being resumed")
        self.pruner.load_state_dict({**meta["pruner"], "masks": masks})

    def _resume_file(self, args: TrainingArguments, state: TrainerState) -> str:
        if self.resume_from is not None:
            candidates = [self.resume_from]
        else:
            given = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
            candidates = [c for c in (given, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-"
                                                                           f"{state.global_step}")) if c]
        for folder in candidates:
            path = os.path.join(folder, MASKS_FILE)
            if os.path.isfile(path):
                return path
        raise ValueError(f"PruneDistillCallback: the Trainer resumes at step {state.global_step} but no {MASKS_FILE} "
                         f"is in {', '.join(map(repr, candidates))}; pass PruneDistillCallback(..., resume_from=<the "
                         "checkpoint folder>) (a checkpoint written without this callback cannot restore the masks)")


class DistillMixin:
    """Mix into a ``Trainer`` class: the loss is a :class:`~prunekit.methods.distill.DistillLoss`, pruning is kept.

    ``class MyTrainer(DistillMixin, MyTrainerBase)`` for a Trainer subclass of your own;
    :class:`DistillTrainer` for the plain one. The teacher is moved to the Trainer's device.
    The loss is a per-batch mean, so the Trainer averages it over gradient accumulation
    steps (``loss_is_scaled_for_ga = False``); evaluation reports it as the eval loss.

    Args:
        *args, **kwargs: the Trainer's.
        distill: the loss (``None``: the Trainer's own, e.g. for pruning alone).
        pruner: a :class:`prunekit.Pruner` or MaskKeeper on the model: a :class:`PruneDistillCallback` is added.
    """

    def __init__(self, *args: Any, distill: DistillLoss | None = None, pruner: Any | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if distill is not None and not isinstance(distill, DistillLoss):
            raise TypeError(f"{type(self).__name__}: distill must be a prunekit DistillLoss, got "
                            f"{type(distill).__name__}")
        self.distill = distill
        self.prune_callback = None if pruner is None else PruneDistillCallback(pruner)
        if self.prune_callback is not None:
            self.add_callback(self.prune_callback)
        if distill is not None:
            distill.teacher.to(self.args.device)
            self.loss_is_scaled_for_ga = False

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The distillation loss of ``model`` on ``inputs`` (the teacher runs here, without gradients)."""
        if self.distill is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                        num_items_in_batch=num_items_in_batch)
        outputs = self.distill.student_outputs(model, inputs)
        loss = self.distill.from_outputs(outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; the callback learns which checkpoint folder a resumed run reads the masks from."""
        if self.prune_callback is not None and resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            self.prune_callback.resume_from = None if folder is None else os.fspath(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]


class DistillTrainer(DistillMixin, Trainer):
    """``transformers.Trainer`` with a distillation loss and pruning (see :class:`DistillMixin`).

    Example:
        >>> trainer = DistillTrainer(model=student, args=args, train_dataset=ds,
        ...                          distill=DistillLoss(teacher, kl=1.0, temperature=2.0),
        ...                          pruner=prunekit.Pruner(student, 0.5))  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """
