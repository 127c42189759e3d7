"""Sparse fine-tuning under FSDP2 (``fully_shard``; 2 processes, torchrun, gloo, CPU) equals one process.

tests/core/fsdp2_worker.py trains every engine on the one MaskKeeper (a bare keeper, a Pruner with global
ranking, Pruner.manual, a StructuredPruner) with Adam and SGD momentum on a tiny transformer-like model
whose blocks and root are sharded (uneven shards), each rank on half of each batch. The references are the
same runs in this process on the full batch, from the same initial weights. Negative controls: the keeper
removed after its first masks (weights revive), and gradients left unmasked (first moments revive).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import fsdp2_worker as w
import pytest
import torch

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]  # one torchrun of ~25 s

WORKER = Path(__file__).with_name("fsdp2_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
RUNS = [f"{engine}/{optimizer}" for engine, optimizer in w.CASES if engine in w.ENGINES]
# One process sums the full batch, FSDP2 averages two half-batch means: float32 rounding apart.
ATOL, RTOL = 1e-5, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks wrote (one torchrun for every case)."""
    out = tmp_path_factory.mktemp("fsdp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r, part in enumerate(loaded):
        part["error"] = (out / f"rank{r}.txt").read_text()
    assert [part["world"] for part in loaded] == [2, 2]
    return loaded


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    """Every case in this one process (no process group), on the full batch."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = {f"{case}/{optimizer}": w.train(case, optimizer, None) for case, optimizer in w.CASES}
        refs["eval"] = w.eval_then_update(None)
    finally:
        torch.set_num_threads(before)
    return refs


def assert_masks_equal(a: list[dict], b: list[dict], what: str) -> None:
    assert len(a) == len(b) == w.STEPS + 1
    for step, (ma, mb) in enumerate(zip(a, b)):
        assert ma.keys() == mb.keys(), what
        for name in ma:
            assert torch.equal(ma[name], mb[name]), f"{what}: masks of '{name}' differ after step {step}"


def assert_weights_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} '{name}': {m}")


@pytest.mark.parametrize("run", RUNS)
def test_masks_are_identical_on_every_rank_and_equal_one_process(ranks, references, run):
    r0, r1, ref = ranks[0]["results"][run], ranks[1]["results"][run], references[run]
    assert_masks_equal(r0["masks"], r1["masks"], f"{run}: rank 0 vs rank 1")
    assert_masks_equal(r0["masks"], ref["masks"], f"{run}: FSDP2 vs one process")
    # Not vacuous: the masks change at each of the three updates and reach the last target.
    keys = [tuple(bool(m.all()) for m in masks.values()) for masks in r0["masks"]]
    distinct = [s for s in range(w.STEPS + 1) if s == 0 or any(not torch.equal(r0["masks"][s][n], r0["masks"][s - 1][n])
                                                              for n in r0["masks"][s])]
    assert distinct == list(w.UPDATES), f"{run}: masks changed after steps {distinct}"
    assert not all(all(k) for k in keys)
    pruned = sum(int((~m).sum()) for m in r0["masks"][-1].values())
    total = sum(m.numel() for m in r0["masks"][-1].values())
    assert pruned / total == pytest.approx(w.SPARSITY[1], abs=0.06), run


def test_global_ranking_spans_the_shards(ranks, references):
    # One ranking over every weight: per-tensor sparsities differ (a per-shard or per-tensor ranking would
    # not give the one-process masks that the test above compares with).
    final = ranks[0]["results"]["pruner/adam"]["masks"][-1]
    sparsities = sorted(float((~m).float().mean()) for m in final.values())
    assert sparsities[-1] - sparsities[0] > 0.1, sparsities


@pytest.mark.parametrize("run", RUNS)
def test_weights_after_fine_tune_equal_one_process_on_the_full_batch(ranks, references, run):
    r0, r1, ref = ranks[0]["results"][run], ranks[1]["results"][run], references[run]
    for name in r0["weights"]:  # gathered from the shards: the same tensor on both ranks
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    assert_weights_close(r0["weights"], ref["weights"], f"{run}: FSDP2 vs one process")
    # Not vacuous: training moved the weights well beyond the tolerance.
    start = {n: p.detach() for n, p in w.make_model(0, False).named_parameters()}
    moved = max(float((ref["weights"][n] - start[n]).abs().max()) for n in start)
    assert moved > 100 * ATOL


@pytest.mark.parametrize("run", RUNS)
def test_pruned_entries_stay_exactly_zero_on_every_rank(ranks, references, run):
    for r in range(2):
        for step, flags in enumerate(ranks[r]["results"][run]["zero"]):
            assert flags == {"weight": True, "grad": True, "state": True}, f"{run} rank {r} step {step}: {flags}"
    for name, keep in ranks[0]["results"][run]["masks"][-1].items():  # and in the gathered weights
        assert bool((ranks[0]["results"][run]["weights"][name][~keep] == 0).all()), name


@pytest.mark.parametrize("run", RUNS)
def test_sparsity_report_counts_the_zeros_of_every_shard(ranks, references, run):
    ref = references[run]["report"]
    assert any(zeros for _, _, zeros in ref)
    for r in range(2):
        assert ranks[r]["results"][run]["report"] == ref, f"rank {r}"


@pytest.mark.parametrize("run", RUNS)
def test_each_rank_holds_only_the_mask_shard_of_its_parameter_shard(ranks, run):
    full = {n: m.numel() for n, m in ranks[0]["results"][run]["masks"][0].items()}
    for r in range(2):
        for (sharded, mask_numel, param_numel), numel in zip(ranks[r]["results"][run]["layout"], full.values()):
            assert sharded and mask_numel == param_numel < numel
    assert sum(ranks[0]["results"][run]["layout"][i][1] + ranks[1]["results"][run]["layout"][i][1]
               for i in range(len(full))) == sum(full.values())


@pytest.mark.parametrize("run", RUNS)
def test_state_dict_holds_full_masks_and_a_fresh_sharded_model_restores_them(ranks, references, run):
    shapes = {n: v.shape for n, v in references[run]["weights"].items()}
    for name, mask in ranks[0]["results"][run]["masks"][-1].items():
        assert mask.dtype == torch.bool and mask.shape == shapes[name]
    for r in range(2):
        assert ranks[r]["results"][run]["restored"] == {"differed": True, "equal": True, "applied": True}


def test_negative_control_removed_keeper_lets_pruned_weights_revive(ranks, references):
    for r in range(2):
        zero = ranks[r]["results"]["removed/adam"]["zero"]
        assert not any(flags["weight"] for flags in zero), f"rank {r}: a pruned weight stayed zero without a keeper"
    removed, kept = ranks[0]["results"]["removed/adam"], references["keeper/adam"]
    with pytest.raises(AssertionError):  # the weight comparison above would catch it
        assert_weights_close(removed["weights"], kept["weights"], "removed vs kept")
    assert_weights_close(removed["weights"], references["removed/adam"]["weights"], "removed: FSDP2 vs one process")


def test_negative_control_unmasked_gradients_revive_first_moments(ranks, references):
    for r in range(2):
        zero = ranks[r]["results"]["nograd/adam"]["zero"]
        assert all(flags["weight"] for flags in zero)  # the masks are still re-applied after each step ...
        assert not any(flags["grad"] for flags in zero)  # ... but the gradients ...
        assert not all(flags["state"] for flags in zero)  # ... and Adam's first moments of pruned entries are not 0


def test_new_masks_after_an_evaluation_forward_reach_the_next_forward(ranks, references):
    ref = references["eval"]
    for r in range(2):
        got = ranks[r]["eval"]
        assert got["unsharded"], "the root's parameters should be FSDP2's unsharded copies after a no-grad forward"
        assert got["masks"].keys() == ref["masks"].keys()
        assert all(torch.equal(got["masks"][n], ref["masks"][n]) for n in ref["masks"])
        torch.testing.assert_close(got["out"], ref["out"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got["before"], ref["before"], atol=ATOL, rtol=RTOL)
    # Not vacuous: the masks change the output (a forward reusing the stale unsharded copy would not).
    assert float((ref["out"] - ref["before"]).abs().max()) > 0.01


@pytest.fixture(scope="module")
def recover_reference(tmp_path_factory) -> dict:
    """w.recover_runs in this one process, on the full data."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return w.recover_runs(None, tmp_path_factory.mktemp("recover"))
    finally:
        torch.set_num_threads(before)


def test_recover_resumes_bit_identically_from_its_fsdp2_checkpoint(ranks):
    for r in range(2):
        got = ranks[r]["recover"]
        assert got["steps"] == (w.RECOVER_STEPS, w.RECOVER_STOP, w.RECOVER_STEPS)
        assert got["resumed_from"] == w.RECOVER_STOP
        for name in got["whole"]:
            assert torch.equal(got["resumed"][name], got["whole"][name]), f"rank {r} '{name}'"
            assert torch.equal(got["whole"][name], ranks[0]["recover"]["whole"][name]), f"rank {r} '{name}'"
        assert got["resumed_losses"] == got["losses"]  # this rank's loss of every step, resumed or not
    # Not vacuous: the resumed model had another init, and going on without the checkpoint's optimizer state
    # and schedule position ends elsewhere.
    got = ranks[0]["recover"]
    with pytest.raises(AssertionError):
        assert_weights_close(got["control"], got["whole"], "no checkpoint")
    assert any(not torch.equal(got["at_stop"][n], got["whole"][n]) for n in got["whole"])


def test_recover_under_fsdp2_equals_one_process_and_keeps_the_zeros(ranks, recover_reference):
    got, ref = ranks[0]["recover"], recover_reference
    assert_weights_close(got["whole"], ref["whole"], "recover: FSDP2 vs one process")
    assert ref["resumed_from"] == w.RECOVER_STOP
    assert all(torch.equal(ref["resumed"][n], ref["whole"][n]) for n in ref["whole"])
    assert got["sparsity"] == ref["sparsity"] == pytest.approx(0.5 * 0.9, abs=0.1)
    moved = max(float((ref["whole"][n] - ref["start"][n]).abs().max()) for n in ref["start"])
    assert moved > 100 * ATOL
    for name, start in got["start"].items():  # the pruned entries stayed exact zeros
        if start.dim() == 2:
            zeros = start == 0
            assert bool(zeros.any()) and bool((got["whole"][name][zeros] == 0).all()), name


def test_a_pruner_built_before_fully_shard_is_refused_naming_the_parameter(ranks):
    for r in range(2):
        assert "parameter 'embed.weight' was sharded by fully_shard after this Pruner was built" in ranks[r]["error"]
