"""Build files that declare large outputs, and measure what loading one costs in a fresh process.

Used by ``test_format_memory.py``, and by hand to report the figures::

    .venv/bin/python tests/formats/memory_probe.py report 64        # every case, 64 Mi entries each
    .venv/bin/python tests/formats/memory_probe.py load FILE... [--as-extra BYTES,...] [--copy]
    .venv/bin/python tests/formats/memory_probe.py many 100000      # load time of 10^5 tiny tensors

The files are written by hand here (manifest, streams, CRC-32 as the format
defines them), not by ``prunekit.save``, so that each uses the encoding that is
worst for a reader: every entry a nonzero behind a gap or bitmask stream of a
few KB, int8 codes with a scale per row, float16 widened to float64, and LZMA
bombs. ``load`` prints one JSON line: the resident memory before loading, the
peak while loading (VmHWM after resetting it), the restored bytes and the outcome.
"""

from __future__ import annotations

import json
import lzma
import os
import resource
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

CASES = ("bool_gaps", "int8_bitmask", "int8_codes_gaps", "bf16_codes_per_row", "fp16_in_float64", "dense_bomb",
         "bomb_past_declared", "gaps_past_the_end")


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 1,
                                                                 "dict_size": 1 << 20}])


def _crc(name: str, dtype: str, shape: list[int], restored: bytes) -> int:
    # The format's checksum, written out: CRC-32 of "name\0dtype\0[shape]" continued over the little-endian bytes.
    return zlib.crc32(restored, zlib.crc32(f"{name}\0{dtype}\0{shape}".encode()))


def build(case: str, n: int) -> tuple[bytes, int, dict]:
    """``(file bytes, restored bytes, expectation)`` for one case with ``n`` entries."""
    from formats_helpers import rebuild

    ones = {"bool": b"\x01", "int8": b"\x01", "float32": np.float32(1).tobytes(), "bfloat16": b"\x80\x3f",
            "float64": np.float64(1).tobytes()}
    if case == "bool_gaps":  # every entry set, each behind a zero gap byte: n index entries from a tiny stream
        dtype, shape, enc, values, bits = "bool", [n], "gaps", "bool", None
        streams = [("gaps", _lzma(bytes(n)), n)]
    elif case == "int8_bitmask":
        dtype, shape, enc, values, bits = "int8", [n], "bitmask", "int8", None
        streams = [("mask", _lzma(b"\xff" * (n // 8)), n // 8), ("values", _lzma(b"\x01" * n), n)]
    elif case == "int8_codes_gaps":  # float32 restored from int8 codes and per-row scales, every entry kept
        dtype, shape, enc, values, bits = "float32", [n // 1024, 1024], "gaps", "int8", 8
        streams = [("scales", _lzma(b"\x80\x3f" * (n // 1024)), 2 * (n // 1024)), ("gaps", _lzma(bytes(n)), n),
                   ("values", _lzma(b"\x01" * n), n)]
    elif case == "bf16_codes_per_row":  # a scale for every entry: the most scale data per restored byte
        dtype, shape, enc, values, bits = "bfloat16", [n, 1], "dense", "int8", 8
        streams = [("scales", _lzma(b"\x80\x3f" * n), 2 * n), ("data", _lzma(b"\x01" * n), n)]
    elif case == "fp16_in_float64":  # 2 stored bytes widen to 8
        dtype, shape, enc, values, bits = "float64", [n], "dense", "float16", None
        streams = [("data", _lzma(b"\x00\x3c" * n), 2 * n)]
    elif case == "dense_bomb":
        dtype, shape, enc, values, bits = "float32", [n], "dense", "float32", None
        streams = [("data", _lzma(b"\x00\x00\x80\x3f" * n), 4 * n)]
    elif case == "bomb_past_declared":  # decodes to 4x what the manifest declares: stopped at the cap
        dtype, shape, enc, values, bits = "float32", [n], "dense", "float32", None
        streams = [("data", _lzma(b"\x00\x00\x80\x3f" * (4 * n)), 4 * n)]
    elif case == "gaps_past_the_end":  # n positions, the last one beyond the tensor: an error after most of the work
        dtype, shape, enc, values, bits = "float32", [n], "gaps", "float32", None
        streams = [("gaps", _lzma(bytes(n - 1) + b"\x01"), n), ("values", _lzma(ones["float32"] * n), 4 * n)]
    else:
        raise ValueError(case)
    width = {"bool": 1, "int8": 1, "float32": 4, "bfloat16": 2, "float64": 8}[dtype]
    numel = int(np.prod(shape))
    crc = _crc("t", dtype, shape, ones[dtype] * numel)
    manifest = {"tensors": [{"name": "t", "dtype": dtype, "shape": shape, "nnz": numel, "encoding": enc,
                             "values": values, "bits": bits, "crc32": crc,
                             "streams": [[role, "lzma", len(data), raw] for role, data, raw in streams]}],
                "metadata": {}}
    payload = b"".join(data for _, data, _ in streams)
    ok = case not in ("bomb_past_declared", "gaps_past_the_end")
    return rebuild(json.dumps(manifest).encode(), payload), numel * width, {"ok": ok, "dtype": dtype, "shape": shape}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the current one
    except OSError:
        pass


def load(paths: list[str], as_extra: list[int] | None, copy: bool) -> list[dict]:
    """Load each of ``paths`` in turn in this (fresh) process; memory before, peak during, outcome.

    ``as_extra``: per file, the address space allowed beyond what is mapped just before loading it.
    """
    import gc

    import torch

    import prunekit.formats as pf

    torch.set_num_threads(1)
    pf.loads(pf.dumps({"warm": torch.ones(3, 3)}))  # first-call allocations are not the file's
    results = []
    for i, path in enumerate(paths):
        gc.collect()
        if as_extra is not None:  # relative to what is mapped now, so each file gets its own room
            resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + as_extra[i], resource.RLIM_INFINITY))
        results.append(_load_one(pf, torch, path, copy))
        if as_extra is not None:
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return results


def _load_one(pf, torch, path: str, copy: bool) -> dict:
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    state = held = None
    try:
        state = pf.load(path)
        held = {k: v.clone() for k, v in state.items()} if copy else None  # the negative control: a second copy
        outcome = {"result": "ok"}
    except pf.FormatError as exc:
        outcome = {"result": "FormatError", "message": str(exc)}
    except MemoryError as exc:
        outcome = {"result": "MemoryError", "message": str(exc)}
    seconds, peak = time.perf_counter() - start, _status("VmHWM")  # before checking: checks allocate too
    if state is not None:
        t = state["t"]
        outcome.update(dtype=str(t.dtype).replace("torch.", ""), shape=list(t.shape), held=held is not None,
                       all_ones=bool(torch.equal(t, torch.ones_like(t))))
    return {"path": str(path), "rss_before": before, "peak": peak, "seconds": seconds, **outcome}


def run_load(paths: list, as_extra: list[int] | None = None, copy: bool = False) -> list[dict]:
    """``load`` in a fresh interpreter (so nothing of the caller's counts)."""
    import subprocess

    cmd = [sys.executable, __file__, "load", *map(str, paths)]
    cmd += (["--as-extra", ",".join(map(str, as_extra))] if as_extra else []) + (["--copy"] if copy else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"probe failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def many(count: int) -> dict:
    """Seconds to load ``count`` tiny tensors (a bias each), best of three, with the manifest parse on its own."""
    import torch

    import prunekit.formats as pf
    from prunekit.formats.container import parse

    torch.set_num_threads(1)
    data = pf.dumps({f"layers.{i}.bias": torch.tensor([float(i), 0.0]) for i in range(count)})
    _reset_peak()
    before = _status("VmRSS")
    pf.loads(data)
    per_tensor = (_status("VmHWM") - before) / count  # the manifest's objects and the tensors themselves
    loads = min(_timed(lambda: pf.loads(data)) for _ in range(3))
    parses = min(_timed(lambda: parse(data)) for _ in range(3))
    return {"tensors": count, "file_bytes": len(data), "load_s": loads, "parse_s": parses,
            "us_per_tensor": 1e6 * loads / count, "peak_bytes_per_tensor": per_tensor,
            "python_speed_s": _timed(lambda: sum(range(10**7)))}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(mebi: int, tmp: Path) -> None:
    """Print peak memory over restored bytes for every case with ``mebi`` Mi entries."""
    sizes = {}
    for case in CASES:
        data, restored, _ = build(case, mebi << 20)
        (tmp / f"{case}.pkt").write_bytes(data)
        sizes[case] = (len(data), restored)
    for case, r in zip(CASES, run_load([tmp / f"{case}.pkt" for case in CASES])):
        size, restored = sizes[case]
        grew = r["peak"] - r["rss_before"]
        print(f"{case:20s} file {size:>9,} B  restored {restored / 2**20:7.1f} MiB  peak-before "
              f"{grew / 2**20:7.1f} MiB  ratio {grew / restored:5.2f}  {r['seconds']:5.2f} s  {r['result']}"
              + (f" ({r['message'][:70]})" if r["result"] != "ok" else ""))


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "load":
        args = sys.argv[2:]
        extra = None
        if "--as-extra" in args:
            at = args.index("--as-extra")
            extra = [int(v) for v in args.pop(at + 1).split(",")]
            args.pop(at)
        print(json.dumps(load([a for a in args if a != "--copy"], extra, "--copy" in args)))
    elif what == "many":
        print(json.dumps(many(int(sys.argv[2]))))
    elif what == "report":
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            report(int(sys.argv[2]), Path(d))
    else:
        raise SystemExit(__doc__)
