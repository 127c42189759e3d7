"""Pruning under DDP (gloo, CPU): started by tests/apps/recipe/test_distributed.py with torchrun, 2 processes.

    torchrun --nproc_per_node 2 ddp_worker.py OUT_DIR

Runs three scenarios in one process group, each from the same initial weights:

* ``magnitude``: magnitude pruning; the reference is single-process training on the full global batch;
* ``taylor``: Taylor saliency on rank-local calibration data (rank r sees shard r), masks synced by the Pruner;
* ``taylor-nosync``: the same with the Pruner's mask sync disabled (negative control: masks must diverge).

Rank r trains on half r of every global batch; DDP averages gradients, so with a mean loss an update equals
the single-process update on the whole batch. At every step each rank hashes its masks (SHA-256 of the mask
bytes) and all ranks all_gather the hashes. Rank 0 writes ``OUT_DIR/<scenario>.json`` (the hashes per step)
and ``OUT_DIR/<scenario>.safetensors`` (its final weights and masks). :func:`train` with ``world=1`` is the
single-process reference, run in the test's own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import prunekit
import prunekit.core.masks

STEPS = 12
GLOBAL_BATCH = 32
SCHEDULE = prunekit.PolynomialDecay(0.2, 0.8, begin_step=0, end_step=9, frequency=3)  # updates at 0, 3, 6, 9


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    X = torch.randn(STEPS * GLOBAL_BATCH, 20, generator=g)
    y = (X @ torch.randn(20, 4, generator=g)).argmax(dim=1)
    X_cal = torch.randn(64, 20, generator=g)
    y_cal = (X_cal @ torch.randn(20, 4, generator=g)).argmax(dim=1)
    return X, y, X_cal, y_cal


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def mask_hash(pruner: prunekit.Pruner) -> str:
    digest = hashlib.sha256()
    for name, mask in pruner.masks.items():
        digest.update(name.encode())
        digest.update(mask.numpy().tobytes())
    return digest.hexdigest()


def train(criterion: str, *, world: int = 1, rank: int = 0, shard: int | None = None) -> dict:
    """Train and prune; returns per-step mask hashes (this rank's), final weights and masks.

    ``shard``: which half of the calibration data the Taylor criterion sees (default: this rank's).
    """
    X, y, X_cal, y_cal = data()
    model = build()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shard = rank if shard is None else shard
    crit = (prunekit.Magnitude() if criterion == "magnitude"
            else prunekit.Taylor([(X_cal[shard::2], y_cal[shard::2])], nn.functional.cross_entropy))
    pruner = prunekit.Pruner(model, SCHEDULE, criterion=crit, optimizer=opt)
    hashes = [mask_hash(pruner)]
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        batch = slice(step * GLOBAL_BATCH + rank * per_rank, step * GLOBAL_BATCH + (rank + 1) * per_rank)
        opt.zero_grad()
        nn.functional.cross_entropy(net(X[batch]), y[batch]).backward()
        opt.step()
        hashes.append(mask_hash(pruner))
    return {"hashes": hashes, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "masks": pruner.masks}


def main(out_dir: str) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    sync = prunekit.core.masks.sync_keeps
    for scenario, criterion, synced in (("magnitude", "magnitude", True), ("taylor", "taylor", True),
                                        ("taylor-nosync", "taylor", False)):
        # The negative control replaces the mask keeper's sync by the identity.
        prunekit.core.masks.sync_keeps = sync if synced else (lambda keeps: keeps)
        result = train(criterion, world=world, rank=rank)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, result["hashes"])
        if rank == 0:
            per_step = [list(h) for h in zip(*gathered)]
            Path(out_dir, f"{scenario}.json").write_text(json.dumps({"world": world, "hashes": per_step}))
            tensors = {**{f"w/{k}": v.contiguous() for k, v in result["weights"].items()},
                       **{f"m/{k}": v.contiguous() for k, v in result["masks"].items()}}
            save_file(tensors, os.path.join(out_dir, f"{scenario}.safetensors"))
    prunekit.core.masks.sync_keeps = sync
    dist.barrier()  # every file is written
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's threads can abort the interpreter's own shutdown now and then ("terminate called without an
    # active exception"); the work is done and the group destroyed, so leave without that teardown.
    os._exit(code)
