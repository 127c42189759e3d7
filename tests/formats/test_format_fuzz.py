"""Property-based fuzzing: mutated files either load unchanged or raise FormatError, nothing else.

Three mutators: raw byte edits (stopped by the SHA-256 or the envelope parser),
payload edits re-signed (reach the decompressor, decoders and CRCs) and manifest
edits re-signed (reach the manifest validator).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from formats_helpers import make_sparse, read_manifest, rebuild, split_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit.formats as pf
from prunekit.formats import FormatError

STATE = {
    "conv.weight": make_sparse((8, 3, 3, 3), torch.float32, 0.9, seed=1),
    "fc.weight": make_sparse((32, 64), torch.float32, 0.8, seed=2),
    "fc.bias": make_sparse((32,), torch.float32, 0.0, seed=3),
    "mask": make_sparse((40,), torch.bool, 0.7, seed=4),
    "half": make_sparse((5, 7), torch.bfloat16, 0.5, seed=5),
}
BASES = [pf.dumps(STATE), pf.dumps(STATE, quantize="int8"), pf.dumps(STATE, quantize="int4")]
EXPECTED = [pf.loads(b) for b in BASES]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _loads_or_format_error(data: bytes) -> dict[str, torch.Tensor] | None:
    try:
        return pf.loads(data, max_bytes=1 << 24)
    except FormatError as exc:
        assert str(exc), "a FormatError must say what is wrong"
        return None


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


_EDIT = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def _apply(data: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in edits:
        if not buf:
            break
        i = pos % len(buf)
        if op == "flip":
            buf[i] ^= 1 << arg
        elif op == "set":
            buf[i] = arg
        elif op == "insert":
            buf[i:i] = arg
        elif op == "delete":
            del buf[i:i + arg]
        else:
            del buf[i:]
    return bytes(buf)


@FUZZ
@given(base=st.integers(0, len(BASES) - 1), edits=st.lists(_EDIT, min_size=1, max_size=4))
def test_byte_mutations_raise_only_format_error(base, edits):
    data = _apply(BASES[base], edits)
    out = _loads_or_format_error(data)
    if out is not None:  # only a no-op mutation may load, and then it loads the same tensors
        assert data == BASES[base] and _same(out, EXPECTED[base])


@FUZZ
@given(base=st.integers(0, len(BASES) - 1), edits=st.lists(_EDIT, min_size=1, max_size=3))
def test_resigned_payload_mutations_raise_only_format_error(base, edits):
    _, _, payload = split_file(BASES[base])
    text = json.dumps(read_manifest(BASES[base])).encode()
    mutated = _apply(payload, edits)
    out = _loads_or_format_error(rebuild(text, mutated))
    if out is not None:  # e.g. a flipped LZMA setting that decodes to the same bytes: never different tensors
        assert _same(out, EXPECTED[base])


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["float32", "int8", "gaps", "bitmask", "dense", "lzma", "none", "values"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@FUZZ
@given(base=st.integers(0, len(BASES) - 1), which=st.integers(0, 10**6), value=_JSON, delete=st.booleans())
def test_resigned_manifest_mutations_raise_only_format_error(base, which, value, delete):
    manifest = read_manifest(BASES[base])
    paths = _paths(manifest)
    path = paths[which % len(paths)]
    if not path:
        manifest = value
    else:
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if delete:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    _, _, payload = split_file(BASES[base])
    _loads_or_format_error(rebuild(json.dumps(manifest).encode(), payload))


@pytest.mark.parametrize("base", range(len(BASES)))
def test_the_fuzz_bases_are_valid(base):
    assert _same(_loads_or_format_error(BASES[base]), EXPECTED[base])
