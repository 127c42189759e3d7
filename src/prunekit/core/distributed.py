"""Pruning under ``torch.distributed`` (DDP): every rank must hold the same masks.

Data-parallel ranks see different data, so a criterion that scores with data
(Taylor, OBD on per-rank batches) ranks weights differently on each rank; even
magnitude scores can differ if weights ever drift. :class:`prunekit.Pruner`
therefore calls :func:`sync_keeps` after every mask computation: when a
process group with more than one rank is initialized, rank 0's masks are
broadcast to all ranks (one collective per mask update, of one byte per
weight). Every rank must build its Pruner and step it alike, which DDP
training does anyway.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["sync_keeps", "distributed_world_size"]


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
