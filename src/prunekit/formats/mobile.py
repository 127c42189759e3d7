"""Export a (pruned, stripped) model to the phone runtimes: ExecuTorch ``.pte`` and LiteRT ``.tflite``.

Neither runtime exploits weight sparsity, so what pays off on a phone is a structurally smaller
network (:func:`prunekit.prune_channels`, :class:`prunekit.StructuredPruner`), int8, and a file
that is small on the wire. Both exporters take a fixed-shape example input (the file runs at
exactly those shapes), optionally quantize to int8 with the PT2E flow (static, symmetric,
per-channel weights, activations calibrated on ``calibration``), run the written file in its own
runtime's Python bindings against torch, and write atomically.

* :func:`export_executorch`: ``torch.export`` -> ``to_edge_transform_and_lower`` with the XNNPACK
  partitioner -> ``.pte``; int8 with ``XNNPACKQuantizer``. Checked with ``executorch.runtime``.
* :func:`export_litert`: ``litert_torch.convert`` -> ``.tflite``; int8 with litert-torch's
  ``PT2EQuantizer``. Checked with the LiteRT ``Interpreter`` (``ai_edge_litert``).

Parity: fp32 files must match torch within ``rtol`` (default 1e-4) of ``max|torch output|``.
An int8 file is compared with the quantized torch graph it was lowered from (the PT2E reference,
fp32 arithmetic on quantize/dequantize pairs); it must match within ``INT8_RTOL`` (5%: a few
output quanta of requantization rounding), and its distance from the fp32 model is reported
(``fp32_rel_error``) but never fails: that is the price of int8, measured as accuracy on data by
the caller.

Needs the ``mobile`` extra (``pip install 'prunekit[mobile]'``: ExecuTorch); LiteRT needs
``litert-torch`` installed with ``--no-deps`` (see :data:`LITERT_INSTALL`).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_bytes
from .._modes import in_mode

__all__ = [
    "EXECUTORCH_INSTALL", "INT8_RTOL", "LITERT_INSTALL", "MobileExport", "evaluate_mobile", "export_executorch",
    "export_litert", "format_mobile_files", "interleaved_latency", "load_executorch", "load_litert", "load_mobile",
    "mobile_file_info", "mobile_files_beside", "runtime_available",
]

INT8_RTOL = 0.05
EXECUTORCH_INSTALL = "pip install 'prunekit[mobile]'  (executorch==1.5.1)"
# xdsl==0.28.0 (needed by litert-converter) pins typing-extensions<4.13, which would downgrade packages
# torch and pydantic use; it works with the newer one, so the LiteRT packages go in with --no-deps.
LITERT_INSTALL = ("pip install 'prunekit[mobile]' && pip install --no-deps litert-torch==0.10.0 "
                  "ai-edge-litert==2.3.0 ai-edge-quantizer==0.10.0 litert-converter==0.5.0 "
                  "litert-lm-builder==0.18.1 xdsl==0.28.0")
_MAGIC = {"executorch": b"ET12", "litert": b"TFL3"}  # file identifiers at bytes 4..8 of each flatbuffer
_MODULES = {"executorch": ("executorch", "torchao"), "litert": ("litert_torch", "ai_edge_litert", "torchao")}
_INSTALL = {"executorch": EXECUTORCH_INSTALL, "litert": LITERT_INSTALL}

Inputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class MobileExport:
    """What :func:`export_executorch` or :func:`export_litert` wrote.

    Attributes:
        path: the file.
        runtime: ``"executorch"`` or ``"litert"``.
        bytes: its size.
        gzip_bytes: its size gzipped (level 9): what it costs on the wire.
        quantized: ``"int8"`` or ``None``.
        max_rel_error: ``max|file - reference| / max|reference|`` over the check inputs, where the
            reference is the torch model (fp32) or the PT2E-quantized torch graph (int8); ``None``
            when ``check=False``.
        fp32_rel_error: the same against the fp32 torch model (equal to ``max_rel_error`` for fp32).
    """

    path: Path
    runtime: str
    bytes: int
    gzip_bytes: int
    quantized: str | None
    max_rel_error: float | None
    fp32_rel_error: float | None


def runtime_available(runtime: str) -> bool:
    """Whether the Python packages of ``runtime`` (``"executorch"`` or ``"litert"``) are importable.

    Example:
        >>> runtime_available("executorch") in (True, False)
        True
    """
    return all(importlib.util.find_spec(name) is not None for name in _MODULES[runtime])


def _require(runtime: str, caller: str) -> None:
    missing = [name for name in _MODULES[runtime] if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{caller}: needs {', '.join(missing)} (the 'mobile' extra); install with: "
                          f"{_INSTALL[runtime]}")


def export_executorch(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor],
                      path: str | os.PathLike[str], *, quantize: str | None = None,
                      calibration: Any = None, check: bool = True, rtol: float = 1e-4) -> MobileExport:
    """Export ``model`` to an ExecuTorch ``.pte`` (XNNPACK delegate), checked in ExecuTorch, written atomically.

    Call :func:`prunekit.strip` (and, for real speed, structural pruning) first.

    Args:
        model: the model, exported in eval mode (each submodule's train/eval flag is restored).
        example_input: a tensor or tuple of tensors; the file runs at exactly these shapes.
        path: destination ``.pte`` file.
        quantize: ``None`` (fp32) or ``"int8"``: PT2E static quantization with ``XNNPACKQuantizer``
            (symmetric, per-channel weights, int8 activations).
        calibration: inputs whose activation ranges set the int8 scales: a tensor (for a
            one-input model; cut into batches of the example's batch size, a remainder dropped)
            or an iterable of inputs shaped like ``example_input``. ``None``: the example itself.
        check: run the written program in ``executorch.runtime`` and compare with torch.
        rtol: largest accepted fp32 ``max|pte - torch| / max|torch|``; int8 uses :data:`INT8_RTOL`
            against the quantized torch graph.

    Returns:
        A :class:`MobileExport`.

    Raises:
        ImportError: ExecuTorch is missing (the message gives the pip command).
        TypeError, ValueError: bad arguments.
        RuntimeError: the file's outputs differ from the reference by more than the tolerance;
            nothing is written then.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> export_executorch(net, torch.randn(2, 8), "net.pte").max_rel_error < 1e-4  # doctest: +SKIP
        True
    """
    return _export("executorch", "export_executorch", model, example_input, path, quantize, calibration, check,
                   rtol)


def export_litert(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor],
                  path: str | os.PathLike[str], *, quantize: str | None = None,
                  calibration: Any = None, check: bool = True, rtol: float = 1e-4) -> MobileExport:
    """Export ``model`` to a LiteRT ``.tflite`` with ``litert-torch``, checked in LiteRT, written atomically.

    Same arguments as :func:`export_executorch`; int8 uses litert-torch's ``PT2EQuantizer``
    (symmetric, per-channel weights, static int8 activations). The LiteRT interpreter runs the
    file (its default XNNPACK delegate included).

    Raises:
        ImportError: litert-torch or ai-edge-litert is missing (the message gives the pip command).
        TypeError, ValueError: bad arguments.
        RuntimeError: the file's outputs differ from the reference by more than the tolerance.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> export_litert(net, torch.randn(2, 8), "net.tflite").bytes > 0  # doctest: +SKIP
        True
    """
    return _export("litert", "export_litert", model, example_input, path, quantize, calibration, check, rtol)


def _export(runtime: str, caller: str, model: nn.Module, example: Any, path: Any, quantize: str | None,
            calibration: Any, check: bool, rtol: float) -> MobileExport:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    if quantize not in (None, "int8"):
        raise ValueError(f"{caller}: quantize must be None or 'int8', got {quantize!r}")
    inputs = _as_inputs(caller, example)
    _require(runtime, caller)
    with in_mode(model, training=False), torch.no_grad(), _quiet():
        batches = _calibration_batches(caller, calibration, inputs) if quantize else []
        lower = _lower_executorch if runtime == "executorch" else _lower_litert
        data, reference = lower(model, inputs, batches)
        errors = _parity(runtime, data, model, reference, inputs, batches) if check else (None, None)
    error, fp32_error = errors
    limit = INT8_RTOL if quantize else rtol
    if error is not None and error > limit:
        raise RuntimeError(f"{caller}: the {runtime} file's output differs from the torch reference by "
                           f"{error:.2e} (relative), more than {limit:g}; nothing written")
    atomic_write_bytes(path, data)
    return MobileExport(Path(path), runtime, len(data), len(gzip.compress(data, 9)), quantize, error, fp32_error)


def _as_inputs(caller: str, example: Any) -> Inputs:
    inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example) \
        if isinstance(example, (list, tuple)) else ()
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"{caller}: example_input must be a tensor or a non-empty tuple of tensors")
    return tuple(t.detach() for t in inputs)


def _calibration_batches(caller: str, calibration: Any, inputs: Inputs) -> list[Inputs]:
    """Calibration inputs as tuples shaped exactly like ``inputs`` (the exported graph is static)."""
    if calibration is None:
        return [inputs]
    if isinstance(calibration, torch.Tensor):
        if len(inputs) != 1:
            raise ValueError(f"{caller}: a calibration tensor needs a one-input model; pass an iterable of tuples")
        n = inputs[0].shape[0]
        items: Iterable[Any] = [calibration[i:i + n] for i in range(0, calibration.shape[0] - n + 1, n)]
    else:
        items = calibration
    batches = [_as_inputs(caller, item) for item in items]
    shapes = [tuple(t.shape) for t in inputs]
    for batch in batches:
        if [tuple(t.shape) for t in batch] != shapes:
            raise ValueError(f"{caller}: calibration input of shapes {[tuple(t.shape) for t in batch]}; the "
                             f"export is static, give inputs shaped like example_input {shapes}")
    if not batches:
        raise ValueError(f"{caller}: calibration holds no batch of the example's batch size "
                         f"{inputs[0].shape[0]}")
    return batches


def _pt2e(model: nn.Module, inputs: Inputs, batches: list[Inputs], quantizer: Any, fold: bool) -> nn.Module:
    """The PT2E-quantized graph of ``model``: export, insert observers, calibrate, convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(torch.export.export(model, inputs).module(), quantizer)
    for batch in batches:
        prepared(*batch)
    return convert_pt2e(prepared, fold_quantize=fold)


def _lower_executorch(model: nn.Module, inputs: Inputs, batches: list[Inputs]) -> tuple[bytes, nn.Module]:
    """``.pte`` bytes and the torch module they must match (the model, or its quantized graph)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    reference = model
    if batches:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer, get_symmetric_quantization_config)

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        reference = _pt2e(model, inputs, batches, quantizer, fold=True)
    program = torch.export.export(reference, inputs)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return bytes(edge.to_executorch().buffer), reference


def _lower_litert(model: nn.Module, inputs: Inputs, batches: list[Inputs]) -> tuple[bytes, nn.Module]:
    """``.tflite`` bytes and the torch module they must match."""
    import litert_torch

    if not batches:
        return litert_torch.convert(model, inputs).model_content(), model
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    reference = _pt2e(model, inputs, batches, quantizer, fold=False)
    converted = litert_torch.convert(reference, inputs, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    return converted.model_content(), reference


def _parity(runtime: str, data: bytes, model: nn.Module, reference: nn.Module, inputs: Inputs,
            batches: list[Inputs]) -> tuple[float, float]:
    """(error against ``reference``, error against ``model``) over the check inputs.

    fp32 checks the example and a random input of the same shapes; int8 checks the example and the
    first calibration batch (random inputs outside the calibrated ranges say nothing about int8).
    """
    check_inputs = [inputs, batches[0]] if batches else [inputs, tuple(torch.randn_like(t) for t in inputs)]
    run = (load_executorch if runtime == "executorch" else load_litert)(data)
    error = fp32_error = 0.0
    for batch in check_inputs:
        got = run(batch)
        error = max(error, _rel_error(got, _outputs(reference(*batch))))
        fp32_error = max(fp32_error, _rel_error(got, _outputs(model(*batch))))
    return error, fp32_error


def _outputs(output: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(output)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _rel_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    if len(got) != len(want):
        raise RuntimeError(f"the exported file returns {len(got)} outputs, torch {len(want)}")
    worst = 0.0
    for g, w in zip(got, want):
        w = w.detach().float()
        g = torch.as_tensor(np.asarray(g)).float().reshape(w.shape)
        worst = max(worst, float((g - w).abs().max()) / max(float(w.abs().max()), 1e-12))
    return worst


def _check_magic(runtime: str, data: bytes) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[4:8]) != _MAGIC[runtime]:
        suffix = ".pte" if runtime == "executorch" else ".tflite"
        raise ValueError(f"not a {runtime} {suffix} file (no {_MAGIC[runtime].decode()} identifier at byte 4)")


def _read(runtime: str, source: bytes | str | os.PathLike[str]) -> bytes:
    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    _check_magic(runtime, data)
    return bytes(data)


def load_executorch(source: bytes | str | os.PathLike[str], *, threads: int | None = None
                    ) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """Load a ``.pte`` (bytes or path) in ``executorch.runtime``; return ``inputs -> outputs`` for its ``forward``.

    Args:
        source: the program's bytes or its path.
        threads: size of ExecuTorch's (process-wide) threadpool, ``None`` to leave it.

    Example:
        >>> run = load_executorch("net.pte", threads=1)  # doctest: +SKIP
        >>> run([torch.randn(2, 8)])[0].shape  # doctest: +SKIP
        torch.Size([2, 2])
    """
    _require("executorch", "load_executorch")
    data = _read("executorch", source)
    from executorch.runtime import Runtime

    if threads is not None:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))
    program = Runtime.get().load_program(data)  # reads ``data`` in place: both must outlive the method
    method = program.load_method("forward")

    def run(inputs: Sequence[torch.Tensor], _keep: tuple = (data, program)) -> list[torch.Tensor]:
        return list(method.execute(list(inputs)))

    return run


def load_litert(source: bytes | str | os.PathLike[str], *, threads: int | None = None
                ) -> Callable[[Sequence[torch.Tensor]], list[np.ndarray]]:
    """Load a ``.tflite`` (bytes or path) in the LiteRT interpreter; return ``inputs -> outputs`` (signature order).

    Example:
        >>> run = load_litert("net.tflite", threads=1)  # doctest: +SKIP
        >>> run([torch.randn(2, 8)])[0].shape  # doctest: +SKIP
        (2, 2)
    """
    _require("litert", "load_litert")
    data = _read("litert", source)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data, num_threads=threads)
    signature = interpreter.get_signature_list()["serving_default"]
    runner = interpreter.get_signature_runner("serving_default")

    ins, outs = runner.get_input_details(), runner.get_output_details()

    def run(inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
        feed = {name: _to_litert(t.detach().numpy(), ins[name]) for name, t in zip(signature["inputs"], inputs)}
        out = runner(**feed)
        return [_from_litert(out[name], outs[name]) for name in signature["outputs"]]

    return run


def _to_litert(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An fp32 input as the file wants it: quantized with the input's scale and zero point for int8 inputs."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu" and array.dtype.kind == "f":
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        array = np.clip(np.round(array / scale) + zero, info.min, info.max)
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def _from_litert(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An output in fp32: dequantized for int8 outputs."""
    scale, zero = detail.get("quantization", (0.0, 0))
    if array.dtype.kind in "iu" and scale:
        return ((array.astype(np.float32) - zero) * scale).astype(np.float32)
    return array


def _runtime_of(path: Any, data: bytes) -> str:
    runtime = next((name for name, magic in _MAGIC.items() if data[4:8] == magic), None)
    if runtime is None:
        raise ValueError(f"{path}: neither an ExecuTorch .pte nor a LiteRT .tflite file")
    return runtime


def mobile_file_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Kind and sizes (raw and gzipped, level 9) of a ``.pte`` or ``.tflite`` file, read from its identifier.

    Example:
        >>> mobile_file_info("net.pte")  # doctest: +SKIP
        {'path': 'net.pte', 'runtime': 'executorch', 'bytes': 1234, 'gzip_bytes': 987}
    """
    data = Path(path).read_bytes()
    return {"path": str(path), "runtime": _runtime_of(path, data), "bytes": len(data),
            "gzip_bytes": len(gzip.compress(data, 9))}


def load_mobile(path: str | os.PathLike[str], *, threads: int | None = None
                ) -> Callable[[Sequence[torch.Tensor]], list[Any]]:
    """:func:`load_executorch` or :func:`load_litert`, whichever runtime the file's identifier names.

    Example:
        >>> run = load_mobile("net.tflite", threads=1)  # doctest: +SKIP
    """
    data = Path(path).read_bytes()
    load = load_executorch if _runtime_of(path, data) == "executorch" else load_litert
    return load(data, threads=threads)


def evaluate_mobile(path: str | os.PathLike[str], X: torch.Tensor, y: torch.Tensor, *,
                    threads: int | None = 1) -> dict[str, float]:
    """Test loss (mean cross-entropy) and accuracy of a batch-1 ``.pte``/``.tflite`` file, run in its own runtime.

    Each sample of ``X`` goes through the file on its own (the file's input has batch 1, as
    ``prunekit export`` and the recipe's export stage write it); ``y`` holds class indices.

    Example:
        >>> evaluate_mobile("runs/demo-device/pruned_int8.pte", X_test, y_test)  # doctest: +SKIP
        {'loss': 0.0951, 'accuracy': 0.97}
    """
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"evaluate_mobile: X and y must hold the same positive number of samples, got {len(X)} "
                         f"and {len(y)}")
    run = load_mobile(path, threads=threads)
    logits = torch.cat([torch.as_tensor(np.asarray(run([X[i:i + 1]])[0])).float().reshape(1, -1)
                        for i in range(len(X))])
    loss = float(nn.functional.cross_entropy(logits, y.long()))
    return {"loss": loss, "accuracy": float((logits.argmax(1) == y).float().mean())}


def interleaved_latency(runs: dict[str, Callable[[Sequence[torch.Tensor]], Any]], inputs: Sequence[torch.Tensor],
                        *, reps: int = 15, seconds: float = 0.05) -> dict[str, list[float]]:
    """Milliseconds per call of each loaded file, timed in turn ``reps`` times (load hits all alike).

    Each timing repeats the call for about ``seconds`` (the count is set by the first run).
    Returns ``{name: [ms per call, one per repetition]}``; take medians and ratios per repetition.

    Example:
        >>> times = interleaved_latency({"dense": load_mobile("d.pte"), "pruned": load_mobile("p.pte")},
        ...                             [x])  # doctest: +SKIP
    """
    def timed(run: Callable, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            run(list(inputs))
        return (time.perf_counter() - start) / calls * 1e3

    first = next(iter(runs.values()))
    calls = max(1, int(seconds * 1e3 / max(timed(first, 3), 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            samples[name].append(timed(run, calls))
    return samples


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the converters' progress prints, log lines and warnings (errors still raise)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def mobile_files_beside(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """:func:`mobile_file_info` of ``path`` if it is a ``.pte``/``.tflite``, else of the ``.pte`` and ``.tflite``
    files of the same name beside it (those that exist).

    Example:
        >>> mobile_files_beside("no/such/model.pkt")
        []
    """
    path = Path(path)
    if path.suffix in (".pte", ".tflite"):
        return [mobile_file_info(path)]
    return [mobile_file_info(p) for p in (path.with_suffix(".pte"), path.with_suffix(".tflite")) if p.is_file()]


def format_mobile_files(files: Sequence[dict[str, Any]]) -> str:
    """A small table of :func:`mobile_file_info` rows.

    Example:
        >>> print(format_mobile_files([{"path": "m.pte", "runtime": "executorch", "bytes": 31528,
        ...                             "gzip_bytes": 26052}]))
        file   runtime         bytes   gzipped
        m.pte  executorch     31,528    26,052
    """
    width = max([len("file")] + [len(f["path"]) for f in files])
    lines = [f"{'file':<{width}}  {'runtime':<10}  {'bytes':>9}  {'gzipped':>8}"]
    lines += [f"{f['path']:<{width}}  {f['runtime']:<10}  {f['bytes']:>9,}  {f['gzip_bytes']:>8,}" for f in files]
    return "\n".join(lines)
