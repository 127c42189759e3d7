"""What :func:`prunekit.accelerate` chose per layer, and why; printable and JSON-ready."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .modules import FORMATS

__all__ = ["AccelerationReport", "LayerChoice"]


@dataclass
class LayerChoice:
    """The decision for one replaceable layer (``nn.Linear`` / ``nn.Conv2d`` or subclass, transformers ``Conv1D``).

    Attributes:
        name: module name in the model.
        in_features, out_features: the layer's weight as a matrix (a convolution's
            ``in_features`` is ``in_channels * kh * kw``).
        input_shape: shape of the layer's input during ``example_input`` (``None`` if never called).
        sparsity: fraction of exact zeros in the weight.
        format: one of :data:`prunekit.runtime.modules.FORMATS` — what the accelerated model runs.
        blocksize: BSR block edge when ``format == "bsr"``, rows per block when
            ``format == "prunekit-rows"``, else ``None``.
        pattern: ``"n:m"`` when ``format == "prunekit-nm"``, else ``None``.
        timings_ms: median milliseconds per call for every timed candidate (empty if not timed).
        notes: why candidates were skipped (below ``min_sparsity``, not blocky, unavailable, a subclass
            whose own forward is not reproduced, ...).
        kind: the layer's class name (``"Linear"``, ``"Conv2d"``, ``"Conv1D"``, a subclass's name).
    """

    name: str
    in_features: int
    out_features: int
    input_shape: tuple[int, ...] | None
    sparsity: float
    format: str
    blocksize: int | None = None
    pattern: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    kind: str = "Linear"

    @property
    def speedup(self) -> float | None:
        """Dense time / chosen format's time, when both were timed."""
        dense, chosen = self.timings_ms.get("dense"), self.timings_ms.get(self.format)
        if dense is None or not chosen:
            return None
        return dense / chosen


@dataclass
class AccelerationReport:
    """Per-layer choices plus the end-to-end check against the dense-with-zeros oracle.

    Attributes:
        layers: one :class:`LayerChoice` per replaceable layer, in model order.
        max_relative_error: ``max|y - y_dense| / max|y_dense|`` over the model's outputs on ``example_input``.
        repeats: timed calls per candidate.
        threads: ``torch.get_num_threads()`` during timing.
        notes: model-wide notes (e.g. sparse formats unavailable on this platform).
    """

    layers: list[LayerChoice]
    max_relative_error: float
    repeats: int
    threads: int
    notes: list[str] = field(default_factory=list)

    @property
    def choices(self) -> dict[str, str]:
        """``{layer name: format}``."""
        return {layer.name: layer.format for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict."""
        out = asdict(self)
        for layer, row in zip(self.layers, out["layers"]):
            row["input_shape"] = None if layer.input_shape is None else list(layer.input_shape)
            row["speedup"] = layer.speedup
        return out

    def table(self) -> str:
        """Markdown table, one row per layer."""
        formats = sorted({f for layer in self.layers for f in layer.timings_ms},
                         key=lambda f: FORMATS.index(f) if f in FORMATS else len(FORMATS))
        head = ["layer", "shape", "input", "sparsity", "chosen", *[f"{f} ms" for f in formats], "speedup", "notes"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 6) + ["---"]) + "|"]
        for layer in self.layers:
            chosen = layer.format + _block_label(layer)
            times = [f"{layer.timings_ms[f]:.4f}" if f in layer.timings_ms else "–" for f in formats]
            speed = f"{layer.speedup:.2f}×" if layer.speedup is not None else "–"
            shape = f"{layer.out_features}×{layer.in_features}"
            inp = "–" if layer.input_shape is None else "×".join(map(str, layer.input_shape))
            lines.append("| " + " | ".join([layer.name, shape, inp, f"{layer.sparsity:.1%}", chosen, *times, speed,
                                             "; ".join(layer.notes)]) + " |")
        footer = [f"max relative error vs dense oracle: {self.max_relative_error:.2e}; "
                  f"{self.repeats} interleaved repeats, {self.threads} threads"]
        footer += self.notes
        return "\n".join(lines) + "\n\n" + "\n".join(footer)

    def __str__(self) -> str:
        return self.table()


def _block_label(layer: LayerChoice) -> str:
    if layer.pattern:
        return f" {layer.pattern}"
    if not layer.blocksize:
        return ""
    b = layer.blocksize
    return f" {b}x1 rows" if layer.format == "prunekit-rows" else f" {b}x{b}"
