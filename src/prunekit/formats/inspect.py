"""Where the bytes of a prunekit file go (what ``prunekit inspect FILE [--json]`` prints).

Per tensor: shape, dtype, how values are stored, sparsity, encoding, bytes and
bits per weight. Totals against dense fp32, gzip of the fp32 state_dict and the
entropy bound ``n·H(k/n) + k·value_bits`` (see :mod:`.stats`). Inspecting
decodes and verifies every tensor, so it doubles as an integrity check. Names
are printed through :func:`.names.escape`: a name (from a file written by
something else) with control characters cannot move the cursor or forge rows.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .container import DEFAULT_MAX_BYTES, Parsed, decode_all, open_bounded, parse
from .names import escape
from .stats import fp32_bytes, gzip_fp32_bytes, spec_bound_bits

__all__ = ["TensorRow", "FileReport", "inspect_file", "inspect_bytes"]


@dataclass(frozen=True)
class TensorRow:
    """One tensor of a file.

    Attributes:
        name: state_dict key.
        shape: its shape.
        dtype: dtype it is restored to.
        stored: how values are stored (``"float32"``, ``"float16"``, ``"int8"``, ``"int4 (int8 codes)"``).
        numel: entries.
        nnz: entries with a nonzero stored value.
        encoding: ``dense``, ``bitmask`` or ``gaps``.
        codecs: codec of each stream, in order.
        bytes: bytes its streams take.
        bound_bits: its entropy bound.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    stored: str
    numel: int
    nnz: int
    encoding: str
    codecs: tuple[str, ...]
    bytes: int
    bound_bits: float

    @property
    def sparsity(self) -> float:
        """Fraction of entries stored as zero."""
        return 1 - self.nnz / self.numel if self.numel else 0.0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per entry."""
        return 8 * self.bytes / self.numel if self.numel else 0.0


@dataclass
class FileReport:
    """A whole file: its rows, its overhead and the sizes it compares against."""

    rows: list[TensorRow]
    file_bytes: int
    overhead_bytes: int
    fp32_bytes: int
    gzip_fp32_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Entries over all tensors."""
        return sum(r.numel for r in self.rows)

    @property
    def bound_bytes(self) -> float:
        """The entropy bound of all tensors, in bytes."""
        return sum(r.bound_bits for r in self.rows) / 8

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``tensors`` (rows with sparsity and bits_per_weight) and ``totals``."""
        tensors = [{**asdict(r), "shape": list(r.shape), "codecs": list(r.codecs), "sparsity": r.sparsity,
                    "bits_per_weight": r.bits_per_weight} for r in self.rows]
        n = max(self.numel, 1)
        totals = {
            "numel": self.numel, "file_bytes": self.file_bytes, "overhead_bytes": self.overhead_bytes,
            "bits_per_weight": 8 * self.file_bytes / n,
            "fp32_bytes": self.fp32_bytes, "gzip_fp32_bytes": self.gzip_fp32_bytes, "bound_bytes": self.bound_bytes,
            "ratio_vs_fp32": _ratio(self.fp32_bytes, self.file_bytes),
            "ratio_vs_gzip_fp32": _ratio(self.gzip_fp32_bytes, self.file_bytes),
            "file_vs_bound": _ratio(self.file_bytes, self.bound_bytes),
        }
        return {"tensors": tensors, "totals": totals, "metadata": dict(self.metadata)}

    def __str__(self) -> str:
        header = ("tensor", "shape", "stored", "sparsity", "encoding", "bytes", "bits/w")
        body = [(escape(r.name, 120), "x".join(map(str, r.shape)) or "scalar", r.stored, f"{r.sparsity:.1%}", r.encoding,
                 f"{r.bytes:,}", f"{r.bits_per_weight:.3f}") for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        t = self.to_dict()["totals"]
        lines += [
            "",
            f"file         {self.file_bytes:>12,} bytes  {t['bits_per_weight']:.3f} bits/weight "
            f"(headers and manifest {self.overhead_bytes:,})",
            f"dense fp32   {self.fp32_bytes:>12,} bytes  file is {_times(t['ratio_vs_fp32'], 1)} smaller",
            f"gzip fp32    {self.gzip_fp32_bytes:>12,} bytes  file is {_times(t['ratio_vs_gzip_fp32'], 1)} smaller",
            f"bound        {round(self.bound_bytes):>12,} bytes  file is {_times(t['file_vs_bound'], 2)} the bound "
            "n*H(k/n) + k*value_bits",
        ]
        return "\n".join(lines)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None  # None, not inf: inf is not JSON


def _times(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def inspect_bytes(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> FileReport:
    """The report for a prunekit file's bytes; every tensor is decoded and verified.

    Raises:
        FormatError: anything wrong with the file.

    Example:
        >>> import torch
        >>> from prunekit.formats import dumps
        >>> report = inspect_bytes(dumps({"w": torch.zeros(64, 64)}))
        >>> report.file_bytes < 64 * 64 * 4
        True
    """
    return _report(parse(data, max_bytes=max_bytes))


def _report(parsed: Parsed) -> FileReport:
    state = decode_all(parsed)
    for alias, _ in parsed.aliases:  # tied copies are stored once, and counted once
        del state[alias]
    rows = [_row(parsed, e) for e in parsed.entries]
    overhead = parsed.file_size - parsed.payload_size
    return FileReport(rows, parsed.file_size, overhead, fp32_bytes(state), gzip_fp32_bytes(state), parsed.metadata)


def inspect_file(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> FileReport:
    """The report for a prunekit file (see :func:`inspect_bytes`).

    Example:
        >>> print(inspect_file("model.pkt"))  # doctest: +SKIP
    """
    with open_bounded(path, max_bytes) as source:
        report = _report(parse(source, max_bytes=max_bytes))
        source.check_unchanged()
    return report


def _row(parsed: Parsed, entry) -> TensorRow:
    s = entry.spec
    stored = s.values.name if s.bits is None else ("int8" if s.bits == 8 else f"int{s.bits} (int8 codes)")
    return TensorRow(s.name, s.shape, s.dtype.name, stored, s.numel, s.nnz, s.encoding,
                     tuple(r.codec for r in entry.streams), entry.stored_size, spec_bound_bits(s))
