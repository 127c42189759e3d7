"""Training checkpoints as one safetensors file with a JSON header: no pickle anywhere.

A checkpoint holds the model's state_dict, the optimizer's state (tensors in
the file, everything else in JSON), the Pruner's state (masks as bool tensors,
step/schedule/targets in JSON), the global torch RNG state and the position in
the data order (:class:`prunekit.training.loop.Position`: epoch, batch within
the epoch, optimizer steps, running loss). :class:`Checkpoints` is the training
loop's hook that writes them and resumes from them.
It is written with :func:`prunekit._io.atomic_open`: a crash (even ``kill -9``)
during a write leaves the previous checkpoint intact under the final name.

Test-only hooks (read from the environment, documented for the fault-tolerance
tests; never set them in real runs):

* ``PRUNEKIT_TEST_KILL_AT_STEP=k``: the process SIGKILLs itself right after the
  first checkpoint at optimizer step ``>= k`` is complete.
* ``PRUNEKIT_TEST_KILL_IN_WRITE=k``: the process SIGKILLs itself while writing
  the first checkpoint at step ``>= k``, after the temporary file is written and
  synced but before it is renamed over the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .._io import atomic_open, remove_stale_temps
from .loop import Position

__all__ = ["Checkpoints", "save_checkpoint", "load_checkpoint", "restore_checkpoint", "state_tensors"]

_FORMAT, _VERSION = "prunekit.checkpoint", 1
_META_KEY = "prunekit.checkpoint"


def state_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors stores no views or shared storage).

    Example:
        >>> state_tensors({"w": torch.ones(2, 2).t()})["w"].is_contiguous()
        True
    """
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _optimizer_split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split("/", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    pruner: Any | None, position: Position) -> None:
    """Write a checkpoint atomically (see the module docstring for what it holds).

    Example:
        >>> save_checkpoint(Path("ckpt.safetensors"), model=m, optimizer=o, pruner=p, position=Position())  # doctest: +SKIP
    """
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    meta: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "position": asdict(position),
                            "optimizer": opt_meta, "pruner": None}
    if pruner is not None:
        pstate = pruner.state_dict()
        tensors.update({f"pruner/{k}": v for k, v in pstate["masks"].items()})
        meta["pruner"] = {k: v for k, v in pstate.items() if k != "masks"}
    data = st_save(state_tensors(tensors), metadata={_META_KEY: json.dumps(meta)})
    with atomic_open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        _test_hook("PRUNEKIT_TEST_KILL_IN_WRITE", position.step)
    _test_hook("PRUNEKIT_TEST_KILL_AT_STEP", position.step)


def _test_hook(variable: str, step: int) -> None:
    value = os.environ.get(variable)
    if value is not None and value.strip().isdigit() and step >= int(value):
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint: ``(tensors by name, JSON metadata)``; ``ValueError`` if it is not one.

    Example:
        >>> tensors, meta = load_checkpoint(Path("runs/demo-0b6fb08f2af9/checkpoints/prune.safetensors"))  # doctest: +SKIP
        >>> meta["position"]["step"]  # doctest: +SKIP
        756
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
        tensors = st_load(path.read_bytes())
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # corrupt headers raise several types
        raise ValueError(f"checkpoint {str(path)!r} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"checkpoint {str(path)!r} is not a prunekit checkpoint of version {_VERSION}")
    return tensors, meta


def restore_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       pruner: Any | None) -> Position:
    """Load a checkpoint into live objects (the Pruner must already exist) and return its position.

    Example:
        >>> pos = restore_checkpoint(path, model=model, optimizer=opt, pruner=pruner)  # doctest: +SKIP
    """
    tensors, meta = load_checkpoint(path)
    group = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    model.load_state_dict(group("model/"))
    optimizer.load_state_dict(_optimizer_join({k: v for k, v in tensors.items() if k.startswith("optimizer/")},
                                              meta["optimizer"]))
    if pruner is not None:
        if meta["pruner"] is None:
            raise ValueError(f"checkpoint {str(path)!r} holds no Pruner state")
        pruner.load_state_dict({**meta["pruner"], "masks": group("pruner/")})
    torch.set_rng_state(tensors["rng/torch"])
    return Position(**meta["position"])


@dataclass(frozen=True)
class Checkpoints:
    """The training loop's checkpoint hook: resume from ``path`` if it exists, save to it as the run goes.

    Pass it to :func:`prunekit.training.loop.run_loop` both as ``start=`` (what
    :meth:`resume` returns) and as a callback: a run killed at any point and run
    again continues bit-identically from the last complete checkpoint.

    Attributes:
        path: the checkpoint file.
        optimizer: saved and restored with the model.
        pruner: saved and restored too (``None``: none).
        every: optimizer steps between checkpoints (``None``: at the end of each epoch).

    Example:
        >>> from prunekit.training.loop import LoopOptions, run_loop
        >>> ckpt = Checkpoints(Path("ckpt.safetensors"), optimizer=opt, pruner=None, every=100)  # doctest: +SKIP
        >>> run_loop(model, opt, X, y, LoopOptions(batch_size=32, epochs=3), start=ckpt.resume(model),
        ...          callbacks=[ckpt])  # doctest: +SKIP
    """

    path: Path
    optimizer: torch.optim.Optimizer
    pruner: Any | None = None
    every: int | None = None

    def resume(self, model: nn.Module) -> Position | None:
        """Load the checkpoint into ``model``, the optimizer and the pruner; its position (``None``: none yet)."""
        remove_stale_temps(self.path)  # debris of a write cut off by a crash (the checkpoint itself is intact)
        if not self.path.exists():
            return None
        return restore_checkpoint(self.path, model=model, optimizer=self.optimizer, pruner=self.pruner)

    def __call__(self, model: nn.Module, pos: Position) -> None:
        """After an optimizer step: save if ``every`` steps have passed (or an epoch just ended)."""
        due = pos.batch == 0 if self.every is None else pos.step % self.every == 0
        if due:
            save_checkpoint(self.path, model=model, optimizer=self.optimizer, pruner=self.pruner, position=pos)
