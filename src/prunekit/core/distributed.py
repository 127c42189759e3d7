"""Pruning under ``torch.distributed``: every rank must hold the same masks (DDP and FSDP2).

Data-parallel ranks see different data, so a criterion that scores with data
(Taylor, OBD on per-rank batches) ranks weights differently on each rank; even
magnitude scores can differ if weights ever drift. :class:`prunekit.Pruner`
therefore calls :func:`sync_keeps` after every mask computation: when a
process group with more than one rank is initialized, rank 0's masks are
broadcast to all ranks (one collective per mask update, of one byte per
weight). Every rank must build its Pruner and step it alike, which DDP
training does anyway.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a
``DTensor`` of which each rank holds one shard. Its masks are DTensors laid out
like it (each rank holds the mask shard of its parameter shard: no rank ever
keeps a full mask between updates), and masks are computed from the full
tensor (:func:`full_tensor`, an all-gather, one parameter at a time) so that
global ranking is exactly that of one process. The helpers below are no-ops on
ordinary tensors, and ``torch.distributed.tensor`` is never imported here: a
tensor can only be a ``DTensor`` once that module has been imported.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

__all__ = ["sync_keeps", "distributed_world_size", "is_sharded", "full_tensor", "local_tensor", "local_like",
           "shard_like", "count_true", "reshard_fsdp"]


def distributed_world_size() -> int:
    """The size of the default process group, or 1 when ``torch.distributed`` is not initialized.

    Example:
        >>> distributed_world_size()
        1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def sync_keeps(keeps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's boolean keep-masks on every rank (a no-op outside a multi-rank process group).

    Takes full (ordinary) tensors; FSDP2's sharded masks are synchronised before they are sharded.

    Example:
        >>> sync_keeps([torch.tensor([True, False])])
        [tensor([ True, False])]
    """
    if distributed_world_size() == 1 or not keeps:
        return keeps
    # One flat uint8 broadcast: not every backend broadcasts bool tensors.
    flat = torch.cat([k.reshape(-1) for k in keeps]).to(torch.uint8)
    dist.broadcast(flat, src=0)
    pieces = torch.split(flat.bool(), [k.numel() for k in keeps])
    return [piece.reshape(k.shape) for piece, k in zip(pieces, keeps)]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 / tensor-parallel parameter, gradient, state or mask).

    Example:
        >>> is_sharded(torch.zeros(2))
        False
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank: ``t.full_tensor()`` for a DTensor (a collective: every rank must call), else ``t``.

    Example:
        >>> full_tensor(torch.ones(2))
        tensor([1., 1.])
    """
    return t.full_tensor() if is_sharded(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage: in-place ops write the DTensor), else ``t``.

    Example:
        >>> local_tensor(torch.ones(2))
        tensor([1., 1.])
    """
    if not is_sharded(t):  # the hot path of every ordinary run: no grad-mode switch
        return t
    with torch.no_grad():  # to_local() then returns the shard itself (a view of it for a Parameter), no autograd node
        return t.to_local()


def local_like(t: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
    """``t``'s local part, after checking that it is laid out as ``like`` (same mesh and placements).

    A shard and a full tensor can broadcast against each other silently; this refuses them.

    Raises:
        ValueError: ``t`` and ``like`` are not both ordinary tensors or both DTensors of the same layout.

    Example:
        >>> local_like(torch.ones(2), torch.zeros(2), "grad")
        tensor([1., 1.])
    """
    if is_sharded(t) != is_sharded(like) or (
            is_sharded(t) and (t.device_mesh != like.device_mesh or tuple(t.placements) != tuple(like.placements))):
        def layout(x: torch.Tensor) -> str:
            return f"DTensor {tuple(x.placements)}" if is_sharded(x) else "an ordinary tensor"
        raise ValueError(f"{what} is {layout(t)} but its parameter is {layout(like)}; keep gradients and optimizer "
                         "state sharded as the parameter (load optimizer state with "
                         "torch.distributed.checkpoint or set_optimizer_state_dict)")
    return local_tensor(t)


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) laid out as the DTensor ``like``, each rank slicing its own part; else ``full``.

    No communication: every rank holds the full tensor already (after :func:`sync_keeps`).

    Example:
        >>> shard_like(torch.tensor([True]), torch.zeros(1))
        tensor([True])
    """
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def count_true(mask: torch.Tensor) -> int:
    """The number of ``True`` entries of a bool tensor, over all shards of a DTensor (then a collective).

    ``int()`` of a DTensor sum would be this rank's partial sum only.

    Example:
        >>> count_true(torch.tensor([True, False, True]))
        2
    """
    total = mask.sum()
    return int(total.full_tensor() if is_sharded(total) else total)


def reshard_fsdp(model: torch.nn.Module) -> bool:
    """Reshard every FSDP2 module of ``model`` (local, no communication); whether there was any.

    FSDP2 leaves the root module's parameters unsharded after a forward without backward
    (an evaluation): the model then holds full copies, and a mask written to the sharded
    parameter would not reach the next forward, which reuses the copy. After this the model
    holds its sharded parameters again; the next forward gathers them anew.

    Example:
        >>> reshard_fsdp(torch.nn.Linear(2, 2))
        False
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(fsdp, "FSDPModule", None)
    if kind is None:
        return False
    modules = [m for m in model.modules() if isinstance(m, kind)]
    for module in modules:
        module.reshard()
    return bool(modules)
