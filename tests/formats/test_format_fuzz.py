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
from prunekit.formats.names import BAD_CHARACTERS, escape

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


# -- hostile names and declared sizes ---------------------------------------------------------------

def _only_format_errors(data: bytes) -> dict[str, torch.Tensor] | None:
    """Load under a 16 MiB limit: the tensors, or None after a FormatError whose message is one printable line."""
    try:
        return pf.loads(data, max_bytes=1 << 24)
    except FormatError as exc:
        assert str(exc) and str(exc).isprintable(), repr(str(exc))
        return None


# Names drawn mostly from the characters that cause trouble: controls, separators, bidi, surrogates, quotes.
_NASTY = st.sampled_from(["\x00", "\x07", "\x1b", "\n", "\r", "\t", "\x7f", "\x85", "\x9b", "\u2028", "\u202e",
                          "\u2066", "\u200f", "\ud800", "\udfff", "'", '"', "\\", "[", "]", " ", "\ufeff"])
_NAME = st.lists(st.one_of(_NASTY, st.characters(), st.sampled_from(["fc", ".", "weight"])),
                 min_size=0, max_size=12).map("".join) | st.text(min_size=4000, max_size=4200)


@FUZZ
@given(base=st.integers(0, len(BASES) - 1), which=st.integers(0, 10), name=_NAME, alias=st.booleans())
def test_hostile_names_raise_only_format_error(base, which, name, alias):
    manifest = read_manifest(BASES[base])
    if alias:  # as an alias of a real tensor, or as the source of one
        source = manifest["tensors"][which % len(manifest["tensors"])]["name"]
        manifest["aliases"] = [[name, source] if which % 2 else ["extra.name", name]]
    else:
        manifest["tensors"][which % len(manifest["tensors"])]["name"] = name
    _, _, payload = split_file(BASES[base])
    out = _only_format_errors(rebuild(json.dumps(manifest).encode(), payload))
    if out is not None:  # only an alias can load (a tensor's name is in its CRC), and only an acceptable one
        assert alias and not any(BAD_CHARACTERS.search(n) for n in out)
        assert all(escape(n).isprintable() for n in out)

# Declared sizes at the boundaries that overflow int32/int64/uint64 arithmetic, or that are just plausible.
_SIZE = st.one_of(st.sampled_from([0, 1, 2, 7, 8, 255, 256, 2**16, 2**24, 2**31 - 1, 2**31, 2**32, 2**32 + 1,
                                   2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 8, -1, -(2**63)]),
                  st.integers(-(2**70), 2**70))


@FUZZ
@given(base=st.integers(0, len(BASES) - 1), which=st.integers(0, 10), field=st.sampled_from(
    ["shape", "shape_all", "nnz", "raw_size", "size", "consistent"]), value=_SIZE, dims=st.integers(1, 4))
def test_hostile_declared_sizes_raise_only_format_error(base, which, field, value, dims):
    manifest = read_manifest(BASES[base])
    t = manifest["tensors"][which % len(manifest["tensors"])]
    stream = t["streams"][which % len(t["streams"])]
    if field == "shape":
        t["shape"] = [value] + t["shape"][1:]
    elif field == "shape_all":
        t["shape"] = [value] * dims
    elif field == "nnz":
        t["nnz"] = value
    elif field == "raw_size":
        stream[3] = value
    elif field == "size":
        stream[2] = value
    else:  # a self-consistent claim: a huge tensor, all nonzero, whose streams "decode" to exactly that
        t["shape"], t["nnz"] = [abs(value)] * dims, abs(value) ** dims
        for s in t["streams"]:
            s[3] = abs(value) ** dims
    _, _, payload = split_file(BASES[base])
    _only_format_errors(rebuild(json.dumps(manifest).encode(), payload))


@FUZZ
@given(base=st.integers(0, len(BASES) - 1), edits=st.lists(_EDIT, min_size=1, max_size=3),
       block=st.sampled_from([1, 3, 64]))
def test_resigned_payload_mutations_decoded_in_small_blocks(base, edits, block):
    # The same payload mutations, with every block boundary in play: still only FormatError or the same tensors.
    from prunekit.formats import decoding

    _, _, payload = split_file(BASES[base])
    text = json.dumps(read_manifest(BASES[base])).encode()
    saved = decoding.BLOCK, decoding.TINY
    decoding.BLOCK, decoding.TINY = block, 0
    try:
        out = _only_format_errors(rebuild(text, _apply(payload, edits)))
    finally:
        decoding.BLOCK, decoding.TINY = saved
    if out is not None:
        assert _same(out, EXPECTED[base])
