"""Sparse fine-tuning under FSDP2 (``fully_shard``, gloo, CPU), and the same run in one process.

Used in-process by tests/core/test_fsdp2.py (the single-process references) and run as a script:

    torchrun --nproc_per_node 2 fsdp2_worker.py OUT_DIR

Every rank trains every case of :data:`CASES` on a tiny transformer-like model whose blocks and root are
sharded with ``fully_shard`` (odd sizes: the shards are uneven), each rank on its half of the batch
(FSDP2 averages the gradients over the ranks, so the update is that of the full batch in one
process). Each rank writes ``OUT_DIR/rank{R}.pt`` (``torch.load(weights_only=True)``): per case the full
masks after every step (from the engine's ``state_dict``), whether this rank's pruned entries of weights,
gradients and first moments were exactly zero after every step, the gathered full weights at the end,
and whether a fresh engine on a freshly sharded model restores the saved masks; also
:func:`eval_then_update` (new masks after an evaluation forward) and, in ``OUT_DIR/rank{R}.txt``, the error of
a Pruner built before ``fully_shard``; and :func:`recover_runs` (:func:`prunekit.methods.recover.recover` with
fixed masks and checkpoints: uninterrupted, and stopped then resumed on a fresh sharded model).

Cases: an engine (``keeper``: a :class:`prunekit.MaskKeeper` whose masks the loop sets from full-weight
magnitudes; ``pruner``: a :class:`prunekit.Pruner` on a schedule with global ranking; ``manual``:
:meth:`prunekit.Pruner.manual` with ``update_masks`` called by the loop; ``structured``: a
:class:`prunekit.StructuredPruner` removing hidden units of the blocks) times an optimizer (Adam, SGD
with momentum), plus two negative controls: ``removed`` (the keeper is removed after its first masks:
pruned weights revive) and ``nograd`` (gradients are not masked: first moments of pruned entries revive,
although the weights are still re-zeroed after each step).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import prunekit
import prunekit.core.masks as masks_module
from prunekit._io import atomic_open
from prunekit.core.distributed import full_tensor, is_sharded, local_tensor, shard_like
from prunekit.methods.recover import recover, warmup_cosine, zero_masks

BATCH = 16  # the full batch; each of the 2 ranks trains on half of it
STEPS = 10
UPDATES = (0, 4, 8)  # mask updates before the first step and after steps 4 and 8
SPARSITY = (0.3, 0.7)
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
}
ENGINES = ("keeper", "pruner", "manual", "structured")
CONTROLS = ("removed", "nograd")  # both on the keeper engine with Adam
CASES = [(e, o) for e in ENGINES for o in OPTIMIZERS] + [(c, "adam") for c in CONTROLS]
FIRST_MOMENTS = ("exp_avg", "momentum_buffer")


class Block(nn.Module):
    """Pre-norm residual MLP block (a transformer block without attention)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class Tiny(nn.Module):
    """10 inputs -> 13 wide -> two blocks (hidden 27) -> norm -> 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(10, 13)
        self.blocks = nn.ModuleList([Block(13, 27) for _ in range(2)])
        self.norm = nn.LayerNorm(13)
        self.head = nn.Linear(13, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model(seed: int, sharded: bool) -> nn.Module:
    """The model from ``seed``; with ``sharded``, every block and then the root are ``fully_shard``-ed."""
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():  # LayerNorm weights start at 1.0: make them distinct so their masks mean something
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.5 * torch.randn(module.weight.shape))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def batch(step: int, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of ``step``, or rank ``rank``'s half of it."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(BATCH, 10, generator=g), torch.randint(0, 5, (BATCH,), generator=g)
    if rank is None:
        return x, y
    half = BATCH // 2
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


def sparsity_at(step: int) -> float:
    """The target after update ``step`` (linear from SPARSITY[0] to SPARSITY[1] over UPDATES)."""
    i = UPDATES.index(step)
    return SPARSITY[0] + (SPARSITY[1] - SPARSITY[0]) * i / (len(UPDATES) - 1)


def magnitude_keeps(model: nn.Module, names: list[str], sparsity: float) -> dict[str, torch.Tensor]:
    """Per-parameter keep masks pruning the round(n * s) smallest |w| (ties by position), from the full weights."""
    params = dict(model.named_parameters())
    keeps = {}
    for name in names:
        w = full_tensor(params[name].detach())
        order = w.abs().flatten().argsort(stable=True)
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[order[:round(w.numel() * sparsity)]] = False
        keeps[name] = keep.reshape(w.shape)
    return keeps


def schedule() -> prunekit.PolynomialDecay:
    """Updates exactly at UPDATES, from SPARSITY[0] to SPARSITY[1]."""
    return prunekit.PolynomialDecay(SPARSITY[0], SPARSITY[1], begin_step=UPDATES[0], end_step=UPDATES[-1],
                                    frequency=UPDATES[1] - UPDATES[0])


def build_engine(engine: str, model: nn.Module, opt: torch.optim.Optimizer) -> Any:
    if engine == "pruner":
        return prunekit.Pruner(model, schedule(), ranking="global", optimizer=opt)
    if engine == "structured":  # traced under FSDP2: the forward gathers the shards
        return prunekit.StructuredPruner(model, torch.zeros(1, 10), schedule(), optimizer=opt)
    if engine == "manual":
        return prunekit.Pruner.manual(model, optimizer=opt)
    # keeper (and the controls): every Linear and LayerNorm weight, biases too
    return prunekit.MaskKeeper(model, [n for n, _ in model.named_parameters()], optimizer=opt)


def keeper_of(engine: Any) -> prunekit.MaskKeeper:
    return engine if isinstance(engine, prunekit.MaskKeeper) else engine.keeper


def full_masks(engine: Any) -> dict[str, torch.Tensor]:
    """Every masked parameter's full keep mask, from the keeper's state_dict (gathered on every rank)."""
    return keeper_of(engine).state_dict()["masks"]


def update_manually(case: str, engine: Any, model: nn.Module, step: int) -> None:
    """The loop's mask update of the engines without a schedule."""
    if step not in UPDATES or case in ("pruner", "structured"):
        return
    if case == "manual":
        engine.update_masks(sparsity_at(step))
    elif not engine.removed:
        engine.set_masks(magnitude_keeps(model, engine.names, sparsity_at(step)))


def local_pruned(keep: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full mask ``~keep``, cut as FSDP2 cut ``param`` (all of it in one process)."""
    return local_tensor(shard_like(~keep, param))


def local_zero(keeper: prunekit.MaskKeeper, opt: torch.optim.Optimizer, before: dict[str, torch.Tensor],
               after: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Whether this rank's pruned entries of weights and first moments (by the masks ``after`` the step) and of
    gradients (by the masks ``before`` it, which the backward ran under) are exactly zero."""
    ok = {"weight": True, "grad": True, "state": True}
    for slot in keeper.slots:
        now, then = local_pruned(after[slot.name], slot.param), local_pruned(before[slot.name], slot.param)
        tensors = [("weight", slot.param, now), ("grad", slot.param.grad, then)]
        tensors += [("state", opt.state.get(slot.param, {}).get(key), now) for key in FIRST_MOMENTS]
        for what, tensor, pruned in tensors:
            if tensor is not None:
                ok[what] &= bool((local_tensor(tensor.detach())[pruned] == 0).all())
    return ok


def train(case: str, optimizer: str, rank: int | None) -> dict[str, Any]:
    """One case; ``rank`` ``None``: one process on the full batch, else FSDP2 on this rank's half."""
    sharded = rank is not None
    model = make_model(0, sharded)
    opt = OPTIMIZERS[optimizer](model.parameters())
    real = masks_module._mask_grad
    if case == "nograd":
        masks_module._mask_grad = lambda keeper, slot, param: None
    try:
        engine = build_engine(case, model, opt)
    finally:
        masks_module._mask_grad = real  # the hooks already hold the no-op: only this keeper is affected
    keeper = keeper_of(engine)
    update_manually(case, engine, model, 0)
    masks = [full_masks(engine)]
    layout = [(is_sharded(s.pruned), local_tensor(s.pruned).numel(), local_tensor(s.param).numel())
              for s in keeper.slots]
    if case == "removed":
        engine.remove()
    zero = []
    for step in range(STEPS):
        x, y = batch(step, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        update_manually(case, engine, model, step + 1)
        masks.append(full_masks(engine) if not keeper.removed else masks[-1])
        zero.append(local_zero(keeper, opt, masks[-2], masks[-1]))
    weights = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
    report = prunekit.sparsity_report(model, pruner=engine if case in ("pruner", "manual") else None)
    return {"masks": masks, "zero": zero, "weights": weights, "layout": layout,
            "report": [(row.name, row.numel, row.zeros) for row in report.rows],
            "restored": restored(case, optimizer, engine, sharded) if case in ENGINES else None}


def restored(case: str, optimizer: str, engine: Any, sharded: bool) -> dict[str, bool]:
    """A fresh engine on a freshly built (and sharded) model of another init, loading ``engine``'s state_dict:
    whether its masks differed before, equal the saved ones after, and are applied to this rank's shards."""
    saved, before = engine.state_dict(), full_masks(engine)
    prunekit.strip(engine.model)
    model = make_model(1, sharded)
    fresh = build_engine(case, model, OPTIMIZERS[optimizer](model.parameters()))
    differed = any(not torch.equal(m, before[n]) for n, m in full_masks(fresh).items())
    fresh.load_state_dict(saved)
    again = full_masks(fresh)
    equal = again.keys() == before.keys() and all(torch.equal(again[n], m) for n, m in before.items())
    params = dict(model.named_parameters())
    applied = all(bool((local_tensor(params[n].detach())[local_pruned(keep, params[n])] == 0).all())
                  for n, keep in again.items())
    prunekit.strip(model)
    return {"differed": differed, "equal": equal, "applied": applied}


def eval_then_update(rank: int | None) -> dict[str, Any]:
    """A step, a forward without backward (FSDP2 then leaves the root's parameters unsharded), new masks, a forward.

    Returns whether the root's weight was an unsharded copy before the update, the masks, and both forwards'
    outputs on one full batch (the same on every rank).
    """
    model = make_model(0, rank is not None)
    opt = OPTIMIZERS["adam"](model.parameters())
    engine = prunekit.Pruner.manual(model, optimizer=opt)
    x, y = batch(0, rank)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        before = model(batch(1, None)[0])
    unsharded = not is_sharded(model.embed.weight)
    engine.update_masks(0.6)
    with torch.no_grad():
        out = model(batch(1, None)[0])
    masks = full_masks(engine)
    prunekit.strip(model)
    return {"unsharded": unsharded, "masks": masks, "before": before, "out": out}


def sharded_after_build() -> str:
    """The error of a Pruner built before ``fully_shard``, at its next step."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tiny()
    pruner = prunekit.Pruner(model, 0.5)
    fully_shard(model)
    try:
        pruner.step()
    except ValueError as exc:
        return str(exc)
    finally:
        pruner.remove()
    return ""


RECOVER_STEPS, RECOVER_STOP = 8, 5  # recover(): 8 steps, or 5 then resumed to 8 (checkpoints every 3 and at the end)


def pruned_student(seed: int, sharded: bool) -> nn.Module:
    """``make_model(seed)`` with the smaller half of every Linear weight (by full-weight magnitude) set to 0."""
    model = make_model(seed, sharded)
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in magnitude_keeps(model, names, 0.5).items():
            local_tensor(params[name])[local_pruned(keep, params[name])] = 0.0
    return model


def fit(model: nn.Module, data: torch.Tensor, steps: int, checkpoint: Path | None) -> Any:
    """recover() from the dense model of seed 0 with the model's zeros as masks, AdamW, warm-up/cosine over 8 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    return recover(model, make_model(0, False), data, optimizer=opt, steps=steps, masks=zero_masks(model),
                   batch_size=len(data), lr_schedule=warmup_cosine(RECOVER_STEPS, warmup=2), max_grad_norm=1.0,
                   checkpoint=checkpoint, checkpoint_every=3, progress=False)


def recover_runs(rank: int | None, folder: Path) -> dict[str, Any]:
    """recover() under FSDP2 (``rank``: each rank on its half of the data, full-batch steps) or in one process:
    the gathered weights of an uninterrupted run, of a run stopped at RECOVER_STOP and resumed from its checkpoint
    on a freshly built (other init) sharded model, and of a control that goes on from the stopped run's weights
    without the checkpoint (a fresh optimizer and schedule)."""
    data = torch.randn(BATCH, 10, generator=torch.Generator().manual_seed(7))
    if rank is not None:
        data = data[rank * BATCH // 2:(rank + 1) * BATCH // 2]
    sharded = rank is not None
    gathered = lambda model: {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}  # noqa: E731
    whole = pruned_student(0, sharded)
    first = fit(whole, data, RECOVER_STEPS, folder / "whole.safetensors")
    stopped = pruned_student(0, sharded)
    cut = fit(stopped, data, RECOVER_STOP, folder / "cut.safetensors")
    at_stop = gathered(stopped)
    fresh = pruned_student(1, sharded)
    resumed = fit(fresh, data, RECOVER_STEPS, folder / "cut.safetensors")
    fit(stopped, data, RECOVER_STEPS - RECOVER_STOP, None)  # the control
    return {"whole": gathered(whole), "resumed": gathered(fresh), "control": gathered(stopped), "at_stop": at_stop,
            "start": gathered(pruned_student(0, sharded)), "losses": first.losses,
            "resumed_losses": cut.losses + resumed.losses, "resumed_from": resumed.resumed_from,
            "steps": (first.steps, cut.steps, resumed.steps), "sparsity": first.sparsity}


def main(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {f"{case}/{optimizer}": train(case, optimizer, rank) for case, optimizer in CASES}
    evaluated, recovered = eval_then_update(rank), recover_runs(rank, out)
    with atomic_open(out / f"rank{rank}.pt") as f:
        torch.save({"world": dist.get_world_size(), "results": results, "eval": evaluated, "recover": recovered}, f)
    with atomic_open(out / f"rank{rank}.txt", "w") as f:
        f.write(sharded_after_build())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's threads can abort the interpreter's own shutdown now and then; the work is done.
    os._exit(0)
