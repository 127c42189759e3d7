"""Bounded decoding: loading needs the restored tensors plus a constant, measured in a fresh process.

Each file (built by hand in ``memory_probe.py``, in the encoding worst for a
reader) declares a large output behind a few KB of streams. The loader runs in
a subprocess: its peak resident memory (VmHWM, reset just before loading) minus
its resident memory before must stay within the documented bound, and under an
address-space limit (``RLIMIT_AS``) loading either fits or raises FormatError,
never MemoryError. A negative control shows the measurement sees a second copy.
"""

from __future__ import annotations

import resource
import sys

import pytest
from memory_probe import CASES, build, run_load

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                   reason="reads /proc/self/status")]

N = 4 << 20  # entries per file: 4-32 MiB restored, enough to dwarf the allocator's noise
CONSTANT = 24 << 20  # the documented constant (16 MiB) plus slack for the allocator


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    out = {}
    for case in CASES:
        data, restored, expect = build(case, N)
        path = root / f"{case}.pkt"
        path.write_bytes(data)
        out[case] = (path, restored, expect, len(data))
    return out


@pytest.fixture(scope="module")
def measured(files):
    """One fresh process loads every file in turn (the peak is reset before each)."""
    return dict(zip(CASES, run_load([files[case][0] for case in CASES])))


@pytest.mark.parametrize("case", CASES)
def test_peak_memory_is_the_restored_tensor_plus_a_constant(files, measured, case):
    _, restored, expect, size = files[case]
    assert size < 64 << 10  # a few KB on disk...
    r = measured[case]
    grew = r["peak"] - r["rss_before"]
    assert grew <= restored + CONSTANT, f"{case}: {grew / 2**20:.1f} MiB for {restored / 2**20:.1f} MiB restored"
    if expect["ok"]:  # ...that restores megabytes, exactly as declared
        assert r["result"] == "ok" and r["all_ones"], r
        assert (r["dtype"], r["shape"]) == (expect["dtype"], expect["shape"])
    else:
        assert r["result"] == "FormatError", r
        assert "more than the declared" in r["message"] or "gaps reach position" in r["message"]


def test_the_measurement_sees_a_second_copy(files):
    # Negative control: the probe holding a clone of the state must read about twice the tensor.
    path, restored, _, _ = files["dense_bomb"]
    [r] = run_load([path], copy=True)
    assert r["result"] == "ok" and r["held"]
    assert r["peak"] - r["rss_before"] >= 1.9 * restored


FITTING = ["bool_gaps", "int8_codes_gaps", "bf16_codes_per_row", "fp16_in_float64"]


def test_loading_fits_an_address_space_limit_of_the_bound(files):
    # Each file gets 1.5x its restored size (+64 MiB for the decoders and the allocator's arenas) of address space.
    extra = [int(1.5 * files[case][1]) + (64 << 20) for case in FITTING]
    results = run_load([files[case][0] for case in FITTING], as_extra=extra)
    for case, r in zip(FITTING, results):
        assert r["result"] == "ok" and r["all_ones"], (case, r)


def test_too_little_memory_is_a_format_error_not_a_memory_error(files):
    cases = ["int8_codes_gaps", "dense_bomb", "bool_gaps"]
    extra = [files[case][1] // 4 for case in cases]
    for case, r in zip(cases, run_load([files[case][0] for case in cases], as_extra=extra)):
        assert r["result"] == "FormatError", (case, r)
        assert "out of memory" in r["message"] and "max_bytes" in r["message"]
        assert "\n" not in r["message"]


def test_rlimit_is_available():
    # The limit tests above rely on it; a platform without RLIMIT_AS would silently test nothing.
    assert hasattr(resource, "RLIMIT_AS")
