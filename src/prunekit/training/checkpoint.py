"""Training checkpoints as one safetensors file with a JSON header: no pickle anywhere.

A checkpoint holds the model's state_dict, the optimizer's state (tensors in
the file, everything else in JSON), the Pruner's state (masks as bool tensors,
step/schedule/targets in JSON), the global torch RNG state and the position in
the data order (:class:`prunekit.training.loop.Position`: epoch, batch within
the epoch, optimizer steps, running loss). :class:`Checkpoints` is the training
loop's hook that writes them and resumes from them.
It is written with :func:`prunekit._io.atomic_open`: a crash (even ``kill -9``)
during a write leaves the previous checkpoint intact under the final name.

Under FSDP2 (a model with ``fully_shard``-ed parameters) saving and loading are
collectives (every rank calls them): the model's and optimizer's full state dicts
are gathered onto rank 0's CPU with ``torch.distributed.checkpoint.state_dict``
(``full_state_dict=True, cpu_offload=True``), rank 0 writes the one file (the
same format, optimizer state keyed by parameter name) with every rank's RNG state,
and on resume every rank reads it (the path must be visible to every rank) and
keeps its own shards of the model and optimizer state.

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
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .._io import atomic_open, remove_stale_temps
from ..core.distributed import is_sharded, local_tensor, shard_like
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
    state: dict[int | str, dict[str, Any]] = {}
    key_of = lambda index: int(index) if index.isdigit() else index  # noqa: E731 (FSDP2: parameter names)
    for name, value in tensors.items():
        _, index, key = name.split("/", 2)
        state.setdefault(key_of(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(key_of(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` has parameters sharded by FSDP2 (then saving and loading are collectives)."""
    return any(is_sharded(p) for p in model.parameters())


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimizer's state dicts; under FSDP2 the full ones on rank 0's CPU (others get empty ones)."""
    if not _fsdp2(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def _load_states(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                 optimizer_state: dict[str, Any]) -> None:
    """Load full state dicts into ``model`` and ``optimizer`` (under FSDP2 every rank keeps its slices of them)."""
    if not _fsdp2(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    # Each rank slices its shards out of the full tensors (shard_like: no communication). DCP's loaders scatter
    # tensor by tensor in the dict's order, and a loaded file's order differs between processes.
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    differ = sorted(set(model_state) ^ set(model.state_dict()))
    if differ:
        raise ValueError(f"checkpoint: its model keys differ from the model's ({', '.join(differ[:3])}); resume into "
                         "the model that wrote it")
    with torch.no_grad():
        for name, full in model_state.items():
            local_tensor(live[name]).copy_(local_tensor(shard_like(full, live[name])))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(params)}
    unknown = sorted(set(optimizer_state["state"]) - set(index))
    if unknown:
        raise ValueError(f"checkpoint: optimizer state of {unknown[:3]}, which this optimizer does not hold; resume "
                         "with the optimizer over the same parameters")
    # in parameter order, keys sorted: the same on every rank (the file's dict order is not), as the gathers
    # of the next save need
    saved = optimizer_state["state"]
    state = {i: {k: shard_like(v, p) if torch.is_tensor(v) and v.dim() else v for k, v in sorted(saved[n].items())}
             for i, (n, p) in enumerate((names[id(p)], p) for p in params) if n in saved}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optimizer_state["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_states(sharded: bool) -> torch.Tensor:
    """This process's torch RNG state; under FSDP2 every rank's, one row each (a collective)."""
    state = torch.get_rng_state()
    if not sharded:
        return state
    rows = [torch.empty_like(state) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, state)
    return torch.stack(rows)


def _set_rng_state(path: Path, saved: torch.Tensor) -> None:
    if saved.dim() == 1:
        torch.set_rng_state(saved)
        return
    running = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if running else (1, 0)
    if saved.shape[0] != world:
        raise ValueError(f"checkpoint {str(path)!r} was written by {saved.shape[0]} FSDP2 ranks, this run has "
                         f"{world}; resume it with as many processes (torchrun --nproc_per_node {saved.shape[0]})")
    torch.set_rng_state(saved[rank].clone())  # a row view (storage offset) would crash set_rng_state


def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    pruner: Any | None, position: Position) -> None:
    """Write a checkpoint atomically (see the module docstring for what it holds).

    Example:
        >>> save_checkpoint(Path("ckpt.safetensors"), model=m, optimizer=o, pruner=p, position=Position())  # doctest: +SKIP
    """
    sharded = _fsdp2(model)
    model_state, optimizer_state = _states(model, optimizer)
    tensors = {f"model/{k}": v for k, v in model_state.items()}
    pstate = None if pruner is None else pruner.state_dict()  # a collective too under FSDP2 (full masks)
    tensors["rng/torch"] = _rng_states(sharded)
    if sharded and dist.get_rank() != 0:  # rank 0 writes; the others wait until it is written
        dist.barrier()
        return
    opt_tensors, opt_meta = _optimizer_split(optimizer_state)
    tensors.update(opt_tensors)
    meta: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "position": asdict(position),
                            "optimizer": opt_meta, "pruner": None}
    if pstate is not None:
        tensors.update({f"pruner/{k}": v for k, v in pstate["masks"].items()})
        meta["pruner"] = {k: v for k, v in pstate.items() if k != "masks"}
    try:
        _write(path, st_save(state_tensors(tensors), metadata={_META_KEY: json.dumps(meta)}), position.step)
    finally:
        if sharded:
            dist.barrier()


def _write(path: Path, data: bytes, step: int) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        _test_hook("PRUNEKIT_TEST_KILL_IN_WRITE", step)
    _test_hook("PRUNEKIT_TEST_KILL_AT_STEP", step)


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
    _load_states(model, optimizer, group("model/"),
                 _optimizer_join({k: v for k, v in tensors.items() if k.startswith("optimizer/")}, meta["optimizer"]))
    if pruner is not None:
        if meta["pruner"] is None:
            raise ValueError(f"checkpoint {str(path)!r} holds no Pruner state")
        pruner.load_state_dict({**meta["pruner"], "masks": group("pruner/")})
    _set_rng_state(path, tensors["rng/torch"])
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
