"""Train a small model with a Pruner; checkpoint, or resume from a checkpoint, in this process.

Run by tests/core/test_resume.py with ``sys.executable`` so that every resume happens
in a fresh interpreter:

    python resume_worker.py full OUT_DIR --save-at 0,3,4    # uninterrupted run, checkpoints along the way
    python resume_worker.py resume OUT_DIR --ckpt CKPT [--order model-first|pruner-first]
    python resume_worker.py controls OUT_DIR --ckpt CKPT    # negative controls: skip RNG / pruner state

``full`` and ``resume`` write ``OUT_DIR/final.pt`` (``controls``: ``skip-rng.pt`` and
``skip-pruner.pt``) with the final weights, masks, pruner state and optimizer state.
Everything is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import prunekit

STEPS = 16
SCHEDULE = prunekit.PolynomialDecay(0.1, 0.85, begin_step=0, end_step=12, frequency=3)  # updates 0, 3, 6, 9, 12


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(32, 24)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(24, 16)
        self.gru = nn.GRU(4, 6, batch_first=True)
        self.out = nn.Linear(16 + 6, 3)

    def forward(self, x):  # x: (batch, 2, 8)
        h = torch.relu(self.conv(x))
        z = self.drop(torch.relu(self.fc1(h.flatten(1))))
        z = self.drop(torch.relu(self.fc2(z)))
        _, g = self.gru(h.transpose(1, 2))
        return self.out(torch.cat([z, g[-1]], dim=1))


def data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(256, 2, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(16, 3, generator=g)).argmax(dim=1)
    return x, y


def build(seed: int):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    return model, opt


def train_step(model, opt, x, y):
    idx = torch.randint(0, x.shape[0], (32,))  # global RNG: batch order is part of the resumed state
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.step()


def save_checkpoint(path, step, model, opt, pruner):
    tmp = path + ".tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "pruner": pruner.state_dict(), "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def write_final(path, model, opt, pruner):
    torch.save({"model": model.state_dict(), "masks": pruner.masks, "pruner": pruner.state_dict(),
                "optimizer": opt.state_dict(), "step": pruner.current_step}, path)


def run_full(out_dir, save_at):
    x, y = data()
    model, opt = build(seed=0)
    pruner = prunekit.Pruner(model, SCHEDULE, optimizer=opt)
    for step in range(STEPS):
        if step in save_at:
            assert pruner.current_step == step
            save_checkpoint(os.path.join(out_dir, f"ckpt_{step}.pt"), step, model, opt, pruner)
        train_step(model, opt, x, y)
    write_final(os.path.join(out_dir, "final.pt"), model, opt, pruner)


def run_resume(ckpt_path, out_path, order="pruner-first", skip_rng=False, skip_pruner=False):
    x, y = data()
    ckpt = torch.load(ckpt_path, weights_only=True)
    model, opt = build(seed=99)  # a different init: everything must come from the checkpoint
    if order == "pruner-first":
        pruner = prunekit.Pruner(model, SCHEDULE, optimizer=opt)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    else:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        pruner = prunekit.Pruner(model, SCHEDULE, optimizer=opt)
    if not skip_pruner:
        pruner.load_state_dict(ckpt["pruner"])
    if not skip_rng:
        torch.set_rng_state(ckpt["rng"])
    assert pruner.current_step == (0 if skip_pruner else ckpt["step"])
    for _ in range(ckpt["step"], STEPS):
        train_step(model, opt, x, y)
    write_final(out_path, model, opt, pruner)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["full", "resume", "controls"])
    parser.add_argument("out_dir")
    parser.add_argument("--save-at", default="")
    parser.add_argument("--ckpt")
    parser.add_argument("--order", choices=["model-first", "pruner-first"], default="pruner-first")
    args = parser.parse_args(argv)
    # Deterministic settings: CPU kernels on one thread. (torch.use_deterministic_algorithms
    # would change nothing on CPU here and costs ~2 s of imports in every process.)
    torch.set_num_threads(1)
    if args.mode == "full":
        run_full(args.out_dir, {int(k) for k in args.save_at.split(",") if k})
    elif args.mode == "resume":
        run_resume(args.ckpt, os.path.join(args.out_dir, "final.pt"), order=args.order)
    else:
        # Negative controls (not the property under test, so they may share one process):
        # resuming without the RNG state, or without the pruner state, must NOT reproduce the run.
        run_resume(args.ckpt, os.path.join(args.out_dir, "skip-rng.pt"), skip_rng=True)
        run_resume(args.ckpt, os.path.join(args.out_dir, "skip-pruner.pt"), skip_pruner=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
