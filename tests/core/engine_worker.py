"""Every engine that keeps masks with the one MaskKeeper, built alike on small models and trained alike.

Used in-process by tests/core/test_engines.py, and run as a script for what needs other processes:

    python engine_worker.py run ENGINE[,ENGINE...] OUT_DIR --steps N --every C [--hang-at H]
    torchrun --nproc_per_node 2 engine_worker.py ddp OUT_DIR

``run`` trains each ENGINE on the conv model, one step of each in turn, and writes an atomic checkpoint
``OUT_DIR/ENGINE/ckpt.pt`` after every C-th step; where that file exists it resumes from it first. With
``--hang-at H`` it stops in the middle of writing the first checkpoint of step H (half the bytes written
to the temporary file) and waits there to be killed. At the end it writes ``OUT_DIR/ENGINE/final.pt``
(:func:`snapshot`). ``ddp`` trains every engine under
DDP (gloo, CPU) with rank-dependent weights, with and without the mask sync, and rank 0 writes the mask
hashes of every rank at every step to ``OUT_DIR/ddp.json``. Everything is loaded with
``torch.load(weights_only=True)``.

Engines (:data:`ENGINES`): ``keeper`` (a :class:`prunekit.MaskKeeper` over every parameter, masks set by
the loop from weight magnitudes), ``pruner`` (a :class:`prunekit.Pruner` on a schedule), ``manual``
(:meth:`prunekit.Pruner.manual`, ``update_masks`` called by the loop, as lottery and iterative pruning do)
and ``structured`` (a :class:`prunekit.StructuredPruner`). All four change their masks after the same
steps (:data:`UPDATES` by default), to the same target sparsities.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import prunekit
from prunekit._io import atomic_open

ENGINES = ("keeper", "pruner", "manual", "structured")
MASKING_ENGINES = ENGINES  # every engine computes or takes masks that the DDP sync must make agree
UPDATES = (3, 6)  # masks change after these optimizer steps (resume: before, between and after them)
SPARSITY = (0.4, 0.7)  # target at the first and the last update
STEPS = 8
BATCH = 8

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "rmsprop-momentum": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9),
    "rmsprop-centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "adadelta": lambda p: torch.optim.Adadelta(p),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
}


class ConvNet(nn.Module):
    """Conv2d + BatchNorm + Linear: a StructuredPruner removes conv rows, biases, BN entries, fc columns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_model(kind: str, seed: int) -> nn.Module:
    """``"conv"`` (:class:`ConvNet`), ``"mlp"`` or ``"mlp-nobias"`` (8 -> 16 -> 16 -> 3), seeded."""
    torch.manual_seed(seed)
    if kind == "conv":
        return ConvNet()
    bias = kind != "mlp-nobias"
    return nn.Sequential(nn.Linear(8, 16, bias=bias), nn.ReLU(), nn.Linear(16, 16, bias=bias), nn.ReLU(),
                         nn.Linear(16, 3, bias=bias))


def example_input(kind: str) -> torch.Tensor:
    return torch.zeros(1, 2, 4, 4) if kind == "conv" else torch.zeros(1, 8)


def batch(kind: str, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` (a function of the step: no RNG state to resume), rank-dependent under DDP."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn((BATCH, 2, 4, 4) if kind == "conv" else (BATCH, 8), generator=g)
    return x, torch.randint(0, 3, (BATCH,), generator=g)


def schedule(updates: Sequence[int]) -> prunekit.PolynomialDecay:
    """Updates exactly at ``updates`` (evenly spaced), from SPARSITY[0] to SPARSITY[1]."""
    return prunekit.PolynomialDecay(SPARSITY[0], SPARSITY[1], begin_step=updates[0], end_step=updates[-1],
                                    frequency=updates[1] - updates[0])


def magnitude_keeps(model: nn.Module, names: Sequence[str], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep masks pruning the round(n * s) smallest |w| of each parameter (stable: ties by position)."""
    params = dict(model.named_parameters())
    keeps = {}
    for name in names:
        w = params[name].detach()
        order = w.abs().flatten().argsort(stable=True)
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[order[:round(w.numel() * sparsity)]] = False
        keeps[name] = keep.reshape(w.shape)
    return keeps


@dataclass
class Run:
    """One model, its optimizer and its engine; :meth:`after_step` does what the loop does after a step."""

    engine_name: str
    kind: str
    model: nn.Module
    opt: torch.optim.Optimizer
    engine: Any
    updates: tuple[int, ...]
    net: nn.Module | None = None  # what the forward runs through (a DDP wrapper), default the model
    steps: int = field(default=0)

    @property
    def keeper(self) -> prunekit.MaskKeeper:
        return self.engine if isinstance(self.engine, prunekit.MaskKeeper) else self.engine.keeper

    def update_manually(self, step: int) -> None:
        """The loop's mask update of the engines without a schedule (keeper, manual)."""
        if step not in self.updates or self.engine_name not in ("keeper", "manual"):
            return
        sparsity = schedule(self.updates).sparsity(step)
        if self.engine_name == "manual":
            self.engine.update_masks(sparsity)
        else:
            self.engine.set_masks(magnitude_keeps(self.model, self.keeper.names, sparsity))

    def train_step(self, rank: int = 0) -> None:
        x, y = batch(self.kind, self.steps, rank)
        self.opt.zero_grad()
        nn.functional.cross_entropy((self.net or self.model)(x), y).backward()
        self.opt.step()
        self.steps += 1
        self.update_manually(self.steps)


def build(engine: str, kind: str = "conv", optimizer: OptimizerFactory = OPTIMIZERS["adam"], *,
          updates: Sequence[int] = UPDATES, seed: int = 0,
          prepare: Callable[[nn.Module], nn.Module | None] | None = None) -> Run:
    """Model, optimizer and ``engine`` on it; ``prepare(model)`` runs before the engine is built (DDP)."""
    model = make_model(kind, seed)
    net = prepare(model) if prepare is not None else None
    opt = optimizer(model.parameters())
    updates = tuple(updates)
    if engine == "keeper":
        built: Any = prunekit.MaskKeeper(model, [n for n, _ in model.named_parameters()], optimizer=opt)
    elif engine == "pruner":
        built = prunekit.Pruner(model, schedule(updates), optimizer=opt)
    elif engine == "manual":
        built = prunekit.Pruner.manual(model, optimizer=opt)
    elif engine == "structured":
        built = prunekit.StructuredPruner(model, example_input(kind), schedule(updates), optimizer=opt)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    run = Run(engine, kind, model, opt, built, updates, net)
    run.update_manually(0)
    return run


def checkpoint(run: Run) -> dict[str, Any]:
    """Everything a resume needs (the batches are a function of the step)."""
    return {"step": run.steps, "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
            "engine": run.engine.state_dict()}


def save_atomic(path: Path, obj: Any) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def load(path: Path | Any) -> Any:
    return torch.load(path, weights_only=True)


def resume(engine: str, ckpt: dict[str, Any], kind: str = "conv", optimizer: OptimizerFactory = OPTIMIZERS["adam"],
           *, updates: Sequence[int] = UPDATES, load_engine: bool = True) -> Run:
    """A freshly built run (other initial weights) that continues from ``ckpt``."""
    run = build(engine, kind, optimizer, updates=updates, seed=12345)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    if load_engine:
        run.engine.load_state_dict(ckpt["engine"])
    run.steps = ckpt["step"]
    return run


def snapshot(run: Run) -> dict[str, Any]:
    """Final weights, optimizer state, masks and engine state (copies)."""
    return {"step": run.steps, "model": {k: v.clone() for k, v in run.model.state_dict().items()},
            "optimizer": _clone(run.opt.state_dict()), "masks": run.keeper.masks,
            "engine": _clone(run.engine.state_dict())}


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def mask_hash(keeper: prunekit.MaskKeeper) -> str:
    digest = hashlib.sha256()
    for name, mask in keeper.masks.items():
        digest.update(name.encode())
        digest.update(mask.numpy().tobytes())
    return digest.hexdigest()


# -- script modes ------------------------------------------------------------------------------


def run_mode(engines: Sequence[str], out: Path, steps: int, every: int, hang_at: int | None) -> None:
    """Train every engine, interleaved, to ``steps`` with atomic checkpoints ``out/ENGINE/ckpt.pt``.

    Each engine resumes from its checkpoint if there is one. With ``hang_at``, the first engine to reach
    that step hangs in the middle of writing its checkpoint: every engine is mid-run when killed.
    """
    runs = {}
    for engine in engines:
        path = out / engine / "ckpt.pt"
        runs[engine] = resume(engine, load(path)) if path.exists() else build(engine)
        print(f"start {engine} {runs[engine].steps}", flush=True)
    while any(run.steps < steps for run in runs.values()):
        for engine, run in runs.items():
            if run.steps == steps:
                continue
            run.train_step()
            if run.steps == hang_at:
                _hang_in_write(out / engine / "ckpt.pt", checkpoint(run))
            if run.steps % every == 0:
                save_atomic(out / engine / "ckpt.pt", checkpoint(run))
                print(f"saved {engine} {run.steps}", flush=True)
    for engine, run in runs.items():
        save_atomic(out / engine / "final.pt", snapshot(run))


def _hang_in_write(path: Path, state: dict[str, Any]) -> None:
    """Write half of a checkpoint through atomic_open, then wait to be killed (SIGKILL) mid-write."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_open(path) as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        print("hanging", flush=True)
        time.sleep(600)
    raise SystemExit("was not killed")


def ddp_mode(out: Path) -> None:
    """Every engine under DDP with rank-dependent weights, synced and not; rank 0 writes ``ddp.json``."""
    import torch.distributed as dist

    import prunekit.core.masks as masks_module
    import prunekit.methods.structural.gradual as gradual_module

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    real = masks_module.sync_keeps
    results: dict[str, Any] = {"world": world}
    for synced in (True, False):
        # The negative control replaces the sync by the identity: each rank keeps its own masks.
        for module in (masks_module, gradual_module):
            module.sync_keeps = real if synced else (lambda keeps: keeps)
        for engine in MASKING_ENGINES:
            local = _ddp_train(engine, rank)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, local)
            results[f"{engine}/{'sync' if synced else 'nosync'}"] = gathered
    for module in (masks_module, gradual_module):
        module.sync_keeps = real
    if rank == 0:
        (out / "ddp.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _ddp_train(engine: str, rank: int) -> dict[str, Any]:
    """Per step: this rank's mask hash, and whether every pruned weight is exactly zero."""

    def prepare(model: nn.Module) -> nn.Module:
        net = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
        g = torch.Generator().manual_seed(77 + rank)
        with torch.no_grad():  # after DDP's broadcast: ranks now rank (and score) differently
            for p in model.parameters():
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
        return net

    run = build(engine, "mlp", OPTIMIZERS["sgd-momentum"], updates=(0, 3), prepare=prepare)
    hashes, zero = [mask_hash(run.keeper)], []
    for _ in range(5):
        run.train_step(rank)
        hashes.append(mask_hash(run.keeper))
        zero.append(all(bool((s.param[s.pruned] == 0).all()) for s in run.keeper.slots))
    return {"hashes": hashes, "pruned_zero": zero}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["run", "ddp"])
    parser.add_argument("args", nargs="+")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--hang-at", type=int, default=None)
    ns = parser.parse_args(argv)
    torch.set_num_threads(1)
    if ns.mode == "run":
        engines, out = ns.args
        run_mode(engines.split(","), Path(out), ns.steps, ns.every, ns.hang_at)
    else:
        ddp_mode(Path(ns.args[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's threads can abort the interpreter's own shutdown now and then; the work is done.
    os._exit(0)
