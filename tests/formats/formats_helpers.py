"""Helpers for the file-format tests: sparse tensors, exact bytes, and a manifest editor.

The editor rewrites a file's manifest and recomputes the SHA-256, so tests reach
the validation behind the checksum (what a deliberately crafted file would hit).
It parses the envelope with its own few lines rather than with the code under test.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import zlib
from typing import Any, Callable

import numpy as np
import safetensors.numpy
import torch

from prunekit.formats.codecs import _MANIFEST_DICT  # a constant of the format, not code under test


def make_sparse(shape: tuple[int, ...], dtype: torch.dtype, sparsity: float, seed: int = 0) -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` with exactly ``round(sparsity * numel)`` zeros at random places."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == torch.bool:
        t = torch.ones(n, dtype=torch.bool)
    elif dtype.is_floating_point:
        t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        t[t == 0] = 1.0
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -1000), min(info.max, 1000), (n,), generator=g, dtype=torch.int64).to(dtype)
        t[t == 0] = 1
    zeros = torch.randperm(n, generator=g)[: round(sparsity * n)]
    t[zeros] = 0
    return t.reshape(shape)


def bits_of(t: torch.Tensor) -> bytes:
    """A tensor's exact bytes (so -0.0 vs 0.0 and NaN payloads count)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def split_file(data: bytes) -> tuple[dict, bytes, bytes]:
    """(safetensors header, stored manifest bytes, payload bytes)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    m0, m1 = header["manifest"]["data_offsets"]
    p0, p1 = header["payload"]["data_offsets"]
    return header, body[m0:m1], body[p0:p1]


def read_manifest(data: bytes) -> dict:
    """The decoded manifest JSON of a file."""
    header, stored, _ = split_file(data)
    codec = header["__metadata__"]["manifest_codec"]
    if codec == "lzma":
        stored = lzma.decompress(stored, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    elif codec == "zlib-dict1":
        stored = zlib.decompressobj(-15, zdict=_MANIFEST_DICT).decompress(stored)
    return json.loads(stored)


def rebuild(manifest_text: bytes, payload: bytes, **meta_overrides: str) -> bytes:
    """A file with this (uncompressed) manifest text and payload, and a correct SHA-256."""
    digest = hashlib.sha256(manifest_text + payload).hexdigest()
    meta = {"format": "prunekit", "version": "1", "manifest_codec": "none",
            "manifest_size": str(len(manifest_text)), "sha256": digest, **meta_overrides}
    arrays = {"manifest": np.frombuffer(manifest_text, np.uint8), "payload": np.frombuffer(payload, np.uint8)}
    return safetensors.numpy.save(arrays, metadata=meta)


class Replace:
    """Returned by an edit to replace the whole manifest (any other return value is ignored)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def edit_manifest(data: bytes, edit: Callable[[dict], Any]) -> bytes:
    """Apply ``edit`` to the manifest of ``data`` (in place, or by returning a :class:`Replace`) and re-sign."""
    _, _, payload = split_file(data)
    manifest = read_manifest(data)
    result = edit(manifest)
    if isinstance(result, Replace):
        manifest = result.value
    return rebuild(json.dumps(manifest).encode(), payload)
