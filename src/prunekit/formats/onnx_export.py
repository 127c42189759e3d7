"""Export a (pruned, stripped) model to ONNX and check it against onnxruntime.

Uses torch's ``torch.export``-based exporter (``dynamo=True``, the default and
recommended one since torch 2.9; the TorchScript exporter is deprecated). It
works offline, exports ``nn.LSTM`` as an ONNX ``LSTM`` node, and needs
``onnxscript``. Optional dynamic int8 quantization uses onnxruntime's
``quantize_dynamic`` (symmetric int8 weights, so pruned zeros stay zero).
Needs the ``onnx`` extra: ``pip install 'prunekit[onnx]'``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .._io import atomic_write_bytes

__all__ = ["OnnxExport", "export_onnx"]


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        bytes: its size.
        quantized: whether weights were dynamically quantized to int8.
        max_rel_error: ``max|onnx - torch| / max|torch|`` over the check inputs and
            outputs (``None`` when ``check=False``).
    """

    path: Path
    bytes: int
    quantized: bool
    max_rel_error: float | None


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    quantize_dynamic: bool = False,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
) -> OnnxExport:
    """Export ``model`` to ONNX at ``path``, verified with onnxruntime, written atomically.

    Call :func:`prunekit.strip` first so the pruned weights are plain zeros.

    Args:
        model: the model (exported in eval mode; its mode is restored afterwards).
        example_input: a tensor or a tuple of tensors, as passed to ``model(...)``.
        path: destination ``.onnx`` file.
        quantize_dynamic: quantize weights to int8 with onnxruntime (activations are
            quantized on the fly at run time).
        opset: ONNX opset; ``None`` for the exporter's default.
        dynamic_batch: let dim 0 of every input vary (use an example batch of >= 2,
            since a batch of 1 specializes the graph).
        check: run onnxruntime on the example and on a random input of the same
            shape, and compare with torch.
        rtol: the largest ``max|onnx - torch| / max|torch|`` accepted for an
            unquantized export (quantized exports report the error but never fail on it).

    Returns:
        An :class:`OnnxExport`.

    Raises:
        TypeError: ``model`` or ``example_input`` of the wrong kind.
        RuntimeError: onnxruntime's outputs differ from torch's by more than ``rtol``
            (nothing is written then).
        ImportError: ``onnx``, ``onnxscript`` or ``onnxruntime`` is missing.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> export_onnx(net, torch.randn(2, 8), "net.onnx").max_rel_error < 1e-4  # doctest: +SKIP
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be an nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_input)
    was_training = model.training
    model.eval()
    try:
        data = _export(model, inputs, opset, dynamic_batch)
        if quantize_dynamic:
            data = _quantize(data)
        error = _check(model, inputs, data) if check else None
    finally:
        model.train(was_training)
    if error is not None and not quantize_dynamic and error > rtol:
        raise RuntimeError(f"export_onnx: onnxruntime output differs from torch by {error:.2e} (relative), "
                           f"more than rtol={rtol:g}; nothing written")
    atomic_write_bytes(path, data)
    return OnnxExport(Path(path), len(data), quantize_dynamic, error)


def _as_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example, torch.Tensor):
        inputs: tuple = (example,)
    else:
        inputs = tuple(example) if isinstance(example, (list, tuple)) else ()
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("export_onnx: example_input must be a tensor or a non-empty tuple of tensors")
    return inputs


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, log lines and deprecation warnings."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    previous_disable = logging.root.manager.disable
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    logging.disable(logging.WARNING)  # onnxruntime.quantization logs its advice on the root logger
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous_disable)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int | None, dynamic_batch: bool) -> bytes:
    dynamic = tuple({0: torch.export.Dim.AUTO} if t.ndim else None for t in inputs) if dynamic_batch else None
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                                    verbose=False)
    return program.model_proto.SerializeToString()


def _quantize(data: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="prunekit-onnx-") as tmp:
        src, dst = Path(tmp, "model.onnx"), Path(tmp, "model.int8.onnx")
        src.write_bytes(data)
        with _quiet():
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def _check(model: nn.Module, inputs: tuple[torch.Tensor, ...], data: bytes) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    shuffled = tuple(torch.randn(t.shape, generator=generator).to(t.dtype) if t.is_floating_point() else t
                     for t in inputs)
    worst = 0.0
    for batch in (inputs, shuffled):
        with torch.no_grad():
            expected = _leaves(model(*batch))
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), batch)}
        got = session.run(None, feeds)
        if len(got) != len(expected):
            raise RuntimeError(f"export_onnx: the ONNX model has {len(got)} outputs, torch returns {len(expected)}")
        for ref, out in zip(expected, got):
            ref = ref.detach().cpu().double()
            if tuple(out.shape) != tuple(ref.shape):
                raise RuntimeError(f"export_onnx: ONNX output of shape {out.shape} where torch gives {tuple(ref.shape)}")
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            diff = float((torch.from_numpy(out).double() - ref).abs().max()) if ref.numel() else 0.0
            worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _leaves(output: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor)]
