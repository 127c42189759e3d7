"""Pruning under DDP with 2 real processes (torchrun, gloo, CPU): masks agree on every rank at every step.

tests/apps/recipe/ddp_worker.py runs three scenarios in one process group; the
single-process references run here, in the test's process, from the same worker
code with ``world=1``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch
from safetensors.torch import load_file

from prunekit.core.distributed import distributed_world_size, sync_keeps

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for scenario in ("magnitude", "taylor", "taylor-nosync"):
        meta = json.loads((out / f"{scenario}.json").read_text())
        tensors = load_file(out / f"{scenario}.safetensors")
        results[scenario] = {"world": meta["world"], "hashes": meta["hashes"],
                             "weights": {k[2:]: v for k, v in tensors.items() if k.startswith("w/")},
                             "masks": {k[2:]: v for k, v in tensors.items() if k.startswith("m/")}}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["magnitude", "taylor"])
def test_masks_identical_on_every_rank_at_every_step(ddp, scenario):
    run = ddp[scenario]
    assert run["world"] == 2 and len(run["hashes"]) == ddp_worker.STEPS + 1
    for step, per_rank in enumerate(run["hashes"]):
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1], f"{scenario}: masks differ at step {step}"
    assert len({h[0] for h in run["hashes"]}) == 4  # the masks did change, at the 4 update steps (0, 3, 6, 9)


@pytest.mark.slow
@pytest.mark.parametrize("scenario,shard", [("magnitude", None), ("taylor", 0)])
def test_ddp_equals_single_process_on_the_global_batch(ddp, scenario, single_thread, shard):
    # With the sync, every rank uses rank 0's masks: for Taylor those of rank 0's calibration shard.
    reference = ddp_worker.train(scenario, world=1, shard=shard)
    run = ddp[scenario]
    for name, mask in reference["masks"].items():
        assert torch.equal(run["masks"][name], mask), name
    for name, value in reference["weights"].items():
        torch.testing.assert_close(run["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert reference["hashes"] == [per_rank[0] for per_rank in run["hashes"]]  # same masks at every step


@pytest.mark.slow
def test_without_sync_rank_local_criterion_diverges(ddp):
    """Negative control: Taylor on per-rank data without the Pruner's sync gives different masks per rank."""
    run = ddp["taylor-nosync"]
    differing = [step for step, (a, b) in enumerate(run["hashes"]) if a != b]
    assert differing and differing[0] == 0  # from the very first masks on


def test_sync_keeps_is_identity_without_a_process_group():
    assert distributed_world_size() == 1
    keeps = [torch.rand(3, 4) > 0.5, torch.rand(5) > 0.5]
    assert sync_keeps(keeps) is keeps
