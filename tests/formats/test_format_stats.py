"""The entropy bound, computed here by hand, and the size summary the bench reports."""

from __future__ import annotations

import gzip
import math

import pytest
import torch
from formats_helpers import make_sparse
from safetensors.torch import save as st_save

import prunekit
import prunekit.formats as pf
from prunekit.formats.stats import binary_entropy, gzip_fp32_bytes


def _h(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


@pytest.mark.parametrize("n, k, bits", [(1000, 100, 8), (1000, 0, 8), (1000, 1000, 32), (7, 3, 4), (0, 0, 8)])
def test_entropy_bound_matches_the_formula(n, k, bits):
    expected = n * _h(k / n) + k * bits if n else 0.0
    assert pf.entropy_bound_bits(n, k, bits) == pytest.approx(expected, rel=1e-12)


def test_the_issue_numbers():
    # 90% sparse int8: about 1.27 bits per weight, 25x smaller than fp32.
    per_weight = pf.entropy_bound_bits(10**6, 10**5, 8) / 10**6
    assert per_weight == pytest.approx(1.269, abs=1e-3)
    assert 32 / per_weight == pytest.approx(25.2, abs=0.1)
    assert binary_entropy(0.5) == 1.0


def test_size_summary_fields_and_independent_checks():
    state = {"w": make_sparse((300, 784), torch.float32, 0.9, seed=0), "b": torch.randn(300)}
    s = prunekit.size_summary(state)
    assert s["numel"] == 300 * 784 + 300
    assert s["weight_sparsity"] == pytest.approx(0.9)
    assert s["fp32_bytes"] == 4 * s["numel"]
    assert s["gzip_fp32_bytes"] == len(gzip.compress(st_save(state), compresslevel=9, mtime=0))
    assert s["prunekit_bytes"] == len(pf.dumps(state))
    assert s["prunekit_q_bytes"] == len(pf.dumps(state, quantize="int8"))
    n, k = 300 * 784, round(0.1 * 300 * 784)
    nq = int((pf.quantize_int8(state["w"]).q != 0).sum())  # rounding may zero a few more
    assert s["bound_bytes"] == pytest.approx((n * _h(k / n) + k * 32 + 300 * 32) / 8)
    assert s["bound_q_bytes"] == pytest.approx((n * _h(nq / n) + nq * 8 + 300 * 32) / 8)


def test_a_90_percent_sparse_int8_layer_is_at_the_bound():
    # Random positions and Gaussian values: nothing to exploit beyond order-0 statistics.
    state = {"w": make_sparse((300, 784), torch.float32, 0.9, seed=1)}
    s = prunekit.size_summary(state)
    assert s["prunekit_q_bytes"] <= 1.10 * s["bound_q_bytes"]
    assert s["fp32_bytes"] / s["prunekit_q_bytes"] >= 23
    assert s["prunekit_bytes"] < s["gzip_fp32_bytes"]


def test_gzip_baseline_counts_floats_as_fp32():
    half = {"w": torch.randn(50, 50).half()}
    assert gzip_fp32_bytes(half) == gzip_fp32_bytes({"w": half["w"].float()})
