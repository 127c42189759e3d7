"""What :func:`prunekit.accelerate` chose per layer, and why; printable and JSON-ready."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .modules import FORMATS

__all__ = ["AccelerationReport", "LayerChoice", "INT8_CANDIDATES"]

# Candidate names of the int8 executions (:class:`prunekit.runtime.int8.Int8Linear` formats, prefixed).
INT8_CANDIDATES = ("int8-dense", "int8-csr", "int8-nm", "int8-rows")
_ORDER = FORMATS + INT8_CANDIDATES


@dataclass
class LayerChoice:
    """The decision for one replaceable layer (``nn.Linear`` / ``nn.Conv2d`` or subclass, transformers ``Conv1D``).

    Attributes:
        name: module name in the model.
        in_features, out_features: the layer's weight as a matrix (a convolution's
            ``in_features`` is ``in_channels * kh * kw``).
        input_shape: shape of the layer's input during ``example_input`` (``None`` if never called).
        sparsity: fraction of exact zeros in the weight.
        format: one of :data:`prunekit.runtime.modules.FORMATS`, or with ``quantize="int8"`` one of
            :data:`INT8_CANDIDATES` (``Int8Linear`` in that format) — what the accelerated model runs.
        blocksize: BSR block edge when ``format == "bsr"``, rows per block when
            ``format == "prunekit-rows"``, else ``None``.
        pattern: ``"n:m"`` when ``format == "prunekit-nm"``, else ``None``.
        timings_ms: median milliseconds per call for every timed candidate (empty if not timed).
        notes: why candidates were skipped (below ``min_sparsity``, not blocky, unavailable, a subclass
            whose own forward is not reproduced, ...).
        kind: the layer's class name (``"Linear"``, ``"Conv2d"``, ``"Conv1D"``, a subclass's name).
        precision: ``"fp32"`` or ``"int8"``: the arithmetic of the chosen format.
        int8_errors: per int8 candidate, its ``max|y - y_fp32| / max|y_fp32|`` against the fp32 layer on the
            captured input (empty without ``quantize="int8"``).
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
    precision: str = "fp32"
    int8_errors: dict[str, float] = field(default_factory=dict)

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
        quantize: ``None`` or ``"int8"``, as passed to :func:`~prunekit.accelerate`.
        activations: how int8 layers quantize their input (``"dynamic per-token"``, ``"static (N calibration
            inputs)"``), ``None`` without ``quantize``.
        calibration_relative_error: the largest end-to-end ``max|y - y_fp32| / max|y_fp32|`` over the
            calibration inputs (``None`` without calibration).
        top1_agreement: for classifier outputs (a 2-D tensor, or ``logits`` of one), the fraction of rows whose
            argmax equals the fp32 model's, over the calibration inputs (else ``example_input``); ``None`` for
            other outputs.
    """

    layers: list[LayerChoice]
    max_relative_error: float
    repeats: int
    threads: int
    notes: list[str] = field(default_factory=list)
    quantize: str | None = None
    activations: str | None = None
    calibration_relative_error: float | None = None
    top1_agreement: float | None = None

    @property
    def choices(self) -> dict[str, str]:
        """``{layer name: format}``."""
        return {layer.name: layer.format for layer in self.layers}

    @property
    def precisions(self) -> dict[str, str]:
        """``{layer name: "fp32" | "int8"}``."""
        return {layer.name: layer.precision for layer in self.layers}

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
                         key=lambda f: _ORDER.index(f) if f in _ORDER else len(_ORDER))
        head = ["layer", "shape", "input", "sparsity", "chosen", "precision", *[f"{f} ms" for f in formats],
                "speedup", "notes"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 6 + ["---:"] * (len(head) - 7) + ["---"]) + "|"]
        for layer in self.layers:
            chosen = layer.format + _block_label(layer)
            times = [f"{layer.timings_ms[f]:.4f}" if f in layer.timings_ms else "–" for f in formats]
            speed = f"{layer.speedup:.2f}×" if layer.speedup is not None else "–"
            shape = f"{layer.out_features}×{layer.in_features}"
            inp = "–" if layer.input_shape is None else "×".join(map(str, layer.input_shape))
            lines.append("| " + " | ".join([layer.name, shape, inp, f"{layer.sparsity:.1%}", chosen, layer.precision,
                                             *times, speed, "; ".join(layer.notes)]) + " |")
        footer = [f"max relative error vs dense oracle: {self.max_relative_error:.2e}; "
                  f"{self.repeats} interleaved repeats, {self.threads} threads"]
        footer += self._quantize_lines() + self.notes
        return "\n".join(lines) + "\n\n" + "\n".join(footer)

    def _quantize_lines(self) -> list[str]:
        if self.quantize is None:
            return []
        n_int8 = sum(layer.precision == "int8" for layer in self.layers)
        lines = [f"quantize={self.quantize!r}: {n_int8} of {len(self.layers)} layers run int8 "
                 f"({self.activations} activations), the others fp32"]
        change = [f"max relative error {self.max_relative_error:.2e} on example_input"]
        if self.calibration_relative_error is not None:
            change.append(f"{self.calibration_relative_error:.2e} over the calibration inputs")
        if self.top1_agreement is not None:
            change.append(f"top-1 agreement {self.top1_agreement:.1%}")
        lines.append("output change vs the fp32 model: " + ", ".join(change))
        return lines

    def __str__(self) -> str:
        return self.table()


def _block_label(layer: LayerChoice) -> str:
    if layer.pattern:
        return f" {layer.pattern}"
    if not layer.blocksize:
        return ""
    b = layer.blocksize
    return f" {b}x1 rows" if layer.format in ("prunekit-rows", "int8-rows") else f" {b}x{b}"
