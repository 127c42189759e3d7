"""Schedules: tfmot semantics against an independent float64 formula, validation, dict round trips."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit import ConstantSparsity, PolynomialDecay, Schedule, schedule_from_dict

# The grids below deliberately include spans that are not a multiple of the frequency;
# the warning for those is tested on its own in test_warns_when_final_sparsity_is_unreachable.
pytestmark = [
    pytest.mark.filterwarnings("ignore:PolynomialDecay.*not a multiple of frequency:UserWarning"),
    pytest.mark.usefixtures("single_thread"),
]

# --------------------------------------------------------------------------------------
# Independent reference (issue 2, verbatim semantics)
# --------------------------------------------------------------------------------------


def ref_update(step: int, begin: int, end: int, freq: int) -> bool:
    if step < begin:
        return False
    if end != -1 and step > end:
        return False
    return (step - begin) % freq == 0


def ref_poly(step: int, initial: float, final: float, begin: int, end: int, power: float) -> float:
    if end == begin:  # documented choice: jump to final at begin_step
        p = 1.0 if step >= begin else 0.0
    else:
        p = (step - begin) / (end - begin)
        p = 0.0 if p < 0.0 else 1.0 if p > 1.0 else p
    return final + (initial - final) * math.pow(1.0 - p, power)


BEGINS = [0, 1, 7]
SPANS = [0, 1, 5, 13]
FREQS = [1, 2, 3, 100]
POWERS = [0.5, 1.0, 2.0, 3.0, 7.5]
SPARSITIES = [(0.0, 0.0), (0.0, 0.9), (0.1, 0.5), (0.5, 0.8), (0.9, 0.2), (0.0, 0.999999)]


def _steps_for(begin: int, end: int) -> list[int]:
    pts = {0, 1, max(begin - 1, 0), begin, begin + 1, (begin + end) // 2, max(end - 1, 0), end, end + 1,
           end + 2, 10 * (end + 1), 10**9}
    return sorted(pts)


@pytest.mark.parametrize("begin,span,freq", list(itertools.product(BEGINS, SPANS, FREQS)))
def test_polynomial_grid_matches_formula(begin, span, freq):
    end = begin + span
    checked = 0
    for power, (initial, final) in itertools.product(POWERS, SPARSITIES):
        s = PolynomialDecay(initial, final, begin, end, power=power, frequency=freq)
        for step in _steps_for(begin, end):
            want = ref_poly(step, initial, final, begin, end, power)
            got = s.sparsity(step)
            assert isinstance(got, float)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (s, step)
            assert s.should_update(step) is ref_update(step, begin, end, freq), (s, step)
            assert s(step) == (ref_update(step, begin, end, freq), got)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("begin,end,freq", [(b, e, f) for b in BEGINS for e in (-1, b, b + 4, b + 250)
                                             for f in FREQS])
@pytest.mark.parametrize("target", [0.0, 0.3, 0.95])
def test_constant_grid_matches_formula(begin, end, freq, target):
    s = ConstantSparsity(target, begin_step=begin, end_step=end, frequency=freq)
    horizon = list(range(0, 260)) + [10**6, 10**6 + 1, 10**9]
    for step in horizon:
        assert s.should_update(step) is ref_update(step, begin, end, freq), (s, step)
        assert s.sparsity(step) == target
        assert s(step) == (ref_update(step, begin, end, freq), target)


@settings(max_examples=300, deadline=None)
@given(
    begin=st.integers(0, 10**6),
    span=st.integers(0, 10**6),
    freq=st.integers(1, 10**4),
    power=st.floats(0.01, 20.0, allow_nan=False),
    initial=st.floats(0.0, 0.999, allow_nan=False),
    final=st.floats(0.0, 0.999, allow_nan=False),
    offset=st.integers(-10**6, 3 * 10**6),
)
def test_polynomial_random_matches_formula(begin, span, freq, power, initial, final, offset):
    end = begin + span
    step = max(0, begin + offset)
    s = PolynomialDecay(initial, final, begin, end, power=power, frequency=freq)
    assert s.sparsity(step) == pytest.approx(ref_poly(step, initial, final, begin, end, power), rel=1e-12, abs=1e-15)
    assert s.should_update(step) is ref_update(step, begin, end, freq)
    assert 0.0 <= s.sparsity(step) < 1.0


@settings(max_examples=100, deadline=None)
@given(initial=st.floats(0.0, 0.99), final=st.floats(0.0, 0.99), power=st.floats(0.1, 10.0),
       begin=st.integers(0, 50), span=st.integers(1, 50))
def test_polynomial_is_monotone_between_initial_and_final(initial, final, power, begin, span):
    s = PolynomialDecay(initial, final, begin, begin + span, power=power, frequency=1)
    values = [s.sparsity(t) for t in range(0, begin + span + 5)]
    diffs = np.diff(values)
    if final >= initial:
        assert (diffs >= -1e-15).all()
    else:
        assert (diffs <= 1e-15).all()
    assert values[0] == pytest.approx(initial) and values[-1] == pytest.approx(final)


def test_polynomial_known_values():
    # Hand-computed: p = 0.5 -> 0.8 + (0.5 - 0.8) * 0.5**3 = 0.7625.
    s = PolynomialDecay(0.5, 0.8, begin_step=0, end_step=100, frequency=50)
    assert [s.sparsity(t) for t in (0, 50, 100, 200)] == pytest.approx([0.5, 0.7625, 0.8, 0.8])
    # Zhu & Gupta with power 3, begin 10, end 30: at step 20, p = 0.5.
    z = PolynomialDecay(0.0, 0.9, 10, 30)
    assert z.sparsity(5) == 0.0 and z.sparsity(10) == 0.0
    assert z.sparsity(20) == pytest.approx(0.9 - 0.9 * 0.125)
    assert z.sparsity(25) == pytest.approx(0.9 - 0.9 * 0.25**3)
    assert z.sparsity(30) == pytest.approx(0.9) and z.sparsity(10**7) == pytest.approx(0.9)
    # power 1 is linear
    lin = PolynomialDecay(0.2, 0.6, 0, 4, power=1, frequency=1)
    assert [lin.sparsity(t) for t in range(6)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.6])


def test_defaults_follow_tfmot():
    c = ConstantSparsity(0.5)
    assert (c.begin_step, c.end_step, c.frequency) == (0, -1, 100)
    p = PolynomialDecay(0.1, 0.5, 0, 1000)
    assert (p.power, p.frequency) == (3.0, 100)
    assert [t for t in range(0, 1101) if p.should_update(t)] == list(range(0, 1001, 100))
    assert [t for t in range(0, 1001) if c.should_update(t)] == list(range(0, 1001, 100))


def test_begin_equals_end_updates_once_at_final():
    s = PolynomialDecay(0.2, 0.7, 5, 5, frequency=3)
    assert [t for t in range(20) if s.should_update(t)] == [5]
    assert s.sparsity(4) == 0.2 and s.sparsity(5) == 0.7 and s.sparsity(6) == 0.7
    c = ConstantSparsity(0.4, 5, 5, 3)
    assert [t for t in range(20) if c.should_update(t)] == [5]


def test_update_steps_are_aligned_on_begin_not_zero():
    s = ConstantSparsity(0.5, begin_step=3, end_step=20, frequency=4)
    assert [t for t in range(40) if s.should_update(t)] == [3, 7, 11, 15, 19]
    p = PolynomialDecay(0.0, 0.5, 3, 19, frequency=4)
    assert [t for t in range(40) if p.should_update(t)] == [3, 7, 11, 15, 19]


def test_numpy_scalars_are_accepted_and_normalised():
    s = PolynomialDecay(np.float32(0.25), np.float64(0.75), np.int64(2), np.int32(10), power=np.int64(2),
                        frequency=np.int16(2))
    d = s.to_dict()
    assert type(d["initial_sparsity"]) is float and type(d["power"]) is float
    assert type(d["begin_step"]) is int and type(d["end_step"]) is int and type(d["frequency"]) is int
    json.dumps(d)
    assert s(np.int64(6)) == (True, pytest.approx(0.75 - 0.5 * 0.5**2))


def test_schedules_are_immutable_and_comparable():
    s = ConstantSparsity(0.5, 1, 9, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.target_sparsity = 0.9  # type: ignore[misc]
    assert s == ConstantSparsity(0.5, 1, 9, 2)
    assert s != ConstantSparsity(0.5, 1, 9, 3)
    assert hash(s) == hash(ConstantSparsity(0.5, 1, 9, 2))
    assert isinstance(s, Schedule)


# --------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------

ROUNDTRIP = [
    ConstantSparsity(0.9),
    ConstantSparsity(0.0, 5, -1, 1),
    ConstantSparsity(0.5, 2, 2, 7),
    PolynomialDecay(0.0, 0.9, 0, 1000),
    PolynomialDecay(0.75, 0.1, 3, 3, power=0.5, frequency=1),
    PolynomialDecay(0.123456789, 0.987654321, 10, 10 + 999 * 1001001, power=2.718281828, frequency=999),
]


@pytest.mark.parametrize("sched", ROUNDTRIP, ids=repr)
def test_dict_round_trip_through_json(sched):
    d = sched.to_dict()
    assert d["type"] == type(sched).__name__
    assert set(d) == {"type"} | {f.name for f in dataclasses.fields(sched)}
    assert all(type(v) in (str, int, float) for v in d.values())
    back = schedule_from_dict(json.loads(json.dumps(d)))
    assert back == sched and type(back) is type(sched)
    for t in (0, 1, 2, 3, 5, 10, 999, 1000, 10**6):
        assert back(t) == sched(t)


def test_to_dict_values():
    assert PolynomialDecay(0.1, 0.8, 4, 40, power=2, frequency=6).to_dict() == {
        "type": "PolynomialDecay", "initial_sparsity": 0.1, "final_sparsity": 0.8, "begin_step": 4,
        "end_step": 40, "power": 2.0, "frequency": 6}
    assert ConstantSparsity(0.3).to_dict() == {"type": "ConstantSparsity", "target_sparsity": 0.3,
                                               "begin_step": 0, "end_step": -1, "frequency": 100}


def test_from_dict_uses_defaults_and_does_not_mutate_input():
    data = {"type": "ConstantSparsity", "target_sparsity": 0.9}
    assert schedule_from_dict(data) == ConstantSparsity(0.9, 0, -1, 100)
    assert data == {"type": "ConstantSparsity", "target_sparsity": 0.9}


@pytest.mark.parametrize("data,exc,match", [
    ([("type", "ConstantSparsity")], TypeError, "expected a dict"),
    ("ConstantSparsity", TypeError, "expected a dict"),
    (None, TypeError, "expected a dict"),
    ({}, ValueError, "'type' must be one of .*ConstantSparsity.*PolynomialDecay"),
    ({"type": "Cubic", "target_sparsity": 0.5}, ValueError, "'type' must be one of .*got 'Cubic'"),
    ({"type": "Schedule"}, ValueError, "'type' must be one of"),
    ({"type": 3}, ValueError, "'type' must be one of"),
    ({"type": "ConstantSparsity", "target_sparsity": 0.5, "bogus": 1}, ValueError, r"unknown field.*bogus"),
    ({"type": "PolynomialDecay", "initial_sparsity": 0.1, "final_sparsity": 0.5, "begin_step": 0, "end_step": 9,
      "target_sparsity": 0.5}, ValueError, r"unknown field.*target_sparsity"),
    ({"type": "ConstantSparsity"}, ValueError, "missing.*target_sparsity"),
    ({"type": "PolynomialDecay", "initial_sparsity": 0.1, "final_sparsity": 0.5, "begin_step": 0},
     ValueError, "missing.*end_step"),
    ({"type": "ConstantSparsity", "target_sparsity": 1.5}, ValueError, r"target_sparsity must be in \[0, 1\)"),
    ({"type": "ConstantSparsity", "target_sparsity": 0.5, "frequency": "10"}, TypeError,
     "frequency must be an integer"),
    ({"type": "PolynomialDecay", "initial_sparsity": 0.1, "final_sparsity": 0.5, "begin_step": 9, "end_step": 2},
     ValueError, "end_step must be >= begin_step"),
])
def test_from_dict_errors(data, exc, match):
    with pytest.raises(exc, match=match):
        schedule_from_dict(data)


# --------------------------------------------------------------------------------------
# Validation: every argument, wrong type and wrong value
# --------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

CONSTANT_BAD = [
    # (kwargs, exception, message pattern)
    (dict(target_sparsity=1.0), ValueError, r"target_sparsity must be in \[0, 1\), got 1.0"),
    (dict(target_sparsity=1.5), ValueError, r"target_sparsity must be in \[0, 1\)"),
    (dict(target_sparsity=-0.01), ValueError, r"target_sparsity must be in \[0, 1\)"),
    (dict(target_sparsity=NAN), ValueError, "target_sparsity must be finite"),
    (dict(target_sparsity=INF), ValueError, "target_sparsity must be finite"),
    (dict(target_sparsity=-INF), ValueError, "target_sparsity must be finite"),
    (dict(target_sparsity=True), TypeError, "target_sparsity must be a real number"),
    (dict(target_sparsity="0.5"), TypeError, "target_sparsity must be a real number"),
    (dict(target_sparsity=None), TypeError, "target_sparsity must be a real number"),
    (dict(target_sparsity=0.5j), TypeError, "target_sparsity must be a real number"),
    (dict(target_sparsity=0.5, begin_step=-1), ValueError, "begin_step must be >= 0, got -1"),
    (dict(target_sparsity=0.5, begin_step=1.0), TypeError, "begin_step must be an integer"),
    (dict(target_sparsity=0.5, begin_step=True), TypeError, "begin_step must be an integer"),
    (dict(target_sparsity=0.5, begin_step="0"), TypeError, "begin_step must be an integer"),
    (dict(target_sparsity=0.5, begin_step=NAN), TypeError, "begin_step must be an integer"),
    (dict(target_sparsity=0.5, end_step=-2), ValueError, r"end_step must be >= begin_step \(0\) or -1"),
    (dict(target_sparsity=0.5, begin_step=5, end_step=4), ValueError, r"end_step must be >= begin_step \(5\)"),
    (dict(target_sparsity=0.5, end_step=2.0), TypeError, "end_step must be an integer"),
    (dict(target_sparsity=0.5, end_step=False), TypeError, "end_step must be an integer"),
    (dict(target_sparsity=0.5, end_step=None), TypeError, "end_step must be an integer"),
    (dict(target_sparsity=0.5, frequency=0), ValueError, "frequency must be >= 1, got 0"),
    (dict(target_sparsity=0.5, frequency=-3), ValueError, "frequency must be >= 1"),
    (dict(target_sparsity=0.5, frequency=1.5), TypeError, "frequency must be an integer"),
    (dict(target_sparsity=0.5, frequency=True), TypeError, "frequency must be an integer"),
    (dict(target_sparsity=0.5, frequency=INF), TypeError, "frequency must be an integer"),
]


@pytest.mark.parametrize("kwargs,exc,match", CONSTANT_BAD, ids=[str(c[0]) for c in CONSTANT_BAD])
def test_constant_sparsity_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=r"ConstantSparsity: " + match):
        ConstantSparsity(**kwargs)


GOOD_POLY = dict(initial_sparsity=0.1, final_sparsity=0.8, begin_step=2, end_step=20)

POLY_BAD = [
    (dict(initial_sparsity=1.0), ValueError, r"initial_sparsity must be in \[0, 1\)"),
    (dict(initial_sparsity=-0.5), ValueError, r"initial_sparsity must be in \[0, 1\)"),
    (dict(initial_sparsity=NAN), ValueError, "initial_sparsity must be finite"),
    (dict(initial_sparsity=False), TypeError, "initial_sparsity must be a real number"),
    (dict(final_sparsity=1.0), ValueError, r"final_sparsity must be in \[0, 1\)"),
    (dict(final_sparsity=2), ValueError, r"final_sparsity must be in \[0, 1\)"),
    (dict(final_sparsity=INF), ValueError, "final_sparsity must be finite"),
    (dict(final_sparsity="high"), TypeError, "final_sparsity must be a real number"),
    (dict(begin_step=-5), ValueError, "begin_step must be >= 0"),
    (dict(begin_step=2.5), TypeError, "begin_step must be an integer"),
    (dict(begin_step=True), TypeError, "begin_step must be an integer"),
    (dict(end_step=-1), ValueError, r"end_step must be >= begin_step \(2\), got -1"),
    (dict(end_step=1), ValueError, r"end_step must be >= begin_step \(2\), got 1"),
    (dict(end_step=20.0), TypeError, "end_step must be an integer"),
    (dict(end_step=True), TypeError, "end_step must be an integer"),
    (dict(power=0), ValueError, "power must be > 0, got 0"),
    (dict(power=-1.0), ValueError, "power must be > 0"),
    (dict(power=NAN), ValueError, "power must be finite"),
    (dict(power=INF), ValueError, "power must be finite"),
    (dict(power=True), TypeError, "power must be a real number"),
    (dict(power="3"), TypeError, "power must be a real number"),
    (dict(frequency=0), ValueError, "frequency must be >= 1"),
    (dict(frequency=-1), ValueError, "frequency must be >= 1"),
    (dict(frequency=10.0), TypeError, "frequency must be an integer"),
    (dict(frequency=False), TypeError, "frequency must be an integer"),
]


@pytest.mark.parametrize("bad,exc,match", POLY_BAD, ids=[str(c[0]) for c in POLY_BAD])
def test_polynomial_decay_rejects(bad, exc, match):
    with pytest.raises(exc, match=r"PolynomialDecay: " + match):
        PolynomialDecay(**{**GOOD_POLY, **bad})


def test_sparsity_just_below_one_and_zero_are_allowed():
    assert ConstantSparsity(0.0).target_sparsity == 0.0
    assert ConstantSparsity(math.nextafter(1.0, 0.0)).target_sparsity < 1.0
    assert PolynomialDecay(0.0, 0.9999999, 0, 0).sparsity(0) == 0.9999999


@pytest.mark.parametrize("sched", [ConstantSparsity(0.5), PolynomialDecay(0.1, 0.5, 0, 10, frequency=5)], ids=repr)
@pytest.mark.parametrize("step,exc,match", [
    (-1, ValueError, "step must be >= 0, got -1"),
    (True, TypeError, "step must be an integer"),
    (1.0, TypeError, "step must be an integer"),
    ("3", TypeError, "step must be an integer"),
    (None, TypeError, "step must be an integer"),
])
def test_call_validates_step(sched, step, exc, match):
    with pytest.raises(exc, match=type(sched).__name__ + ": " + match):
        sched(step)


def test_base_schedule_is_abstract():
    with pytest.raises(NotImplementedError):
        Schedule().sparsity(0)
    with pytest.raises(NotImplementedError):
        Schedule().should_update(0)


@pytest.mark.filterwarnings("error")
def test_warns_when_final_sparsity_is_unreachable():
    with pytest.warns(UserWarning, match=r"PolynomialDecay: end_step - begin_step \(20\) is not a multiple of "
                                         r"frequency \(100\); the last mask update is at step 10 with sparsity "
                                         r"0.0000, so final_sparsity 0.9 is never reached") as record:
        PolynomialDecay(0.0, 0.9, 10, 30)
    assert record[0].filename == __file__  # points at the caller, not at prunekit
    with pytest.warns(UserWarning, match=r"last mask update is at step 9 with sparsity 0.7300"):
        PolynomialDecay(0.1, 0.8, 0, 10, power=1, frequency=3)  # 0.8 - 0.7 * (1 - 0.9) = 0.73


@pytest.mark.filterwarnings("error")
def test_no_warning_when_end_is_an_update_step():
    PolynomialDecay(0.0, 0.9, 0, 1000)
    PolynomialDecay(0.0, 0.9, 7, 7, frequency=5)
    PolynomialDecay(0.0, 0.9, 3, 15, frequency=4)
    ConstantSparsity(0.5, 0, 7, 3)
