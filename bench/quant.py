"""Int8 baselines and helpers shared by the runtime and whole-model benches (not a benchmark itself).

- :func:`ort_int8`: onnxruntime's own int8 of an fp32 ONNX file, the way its docs
  recommend on x86: ``quantize_static`` in QDQ format with per-channel int8 weights,
  uint8 activations calibrated (MinMax) on given inputs, or ``quantize_dynamic``
  (per-channel int8 weights, activations quantized per call).
- :func:`prunekit_int8`: every ``nn.Linear`` of a model as
  :class:`prunekit.runtime.int8.Int8Linear` in one fixed format, static activation
  scales from the same calibration inputs (no selection: the kernel column).
- :class:`OrtModel`: an ``InferenceSession`` called like a module (tensors or a
  mapping of tensors in, the first output out).
- :func:`time_interleaved`: the benches' timing loop.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Calls in a row per variant per round; the first after a switch is not counted. Per-call alternation
# would time every variant with caches cold from the others, which is not how a model is served.
BLOCK = 4


class OrtModel:
    """An onnxruntime session called like a torch module: ``m(x)`` or ``m(**inputs)`` -> first output."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle ORT threads must not spin: they would steal the cores from the torch variants interleaved with them.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        feed = dict(zip(self.inputs, args)) | {k: v for k, v in kwargs.items() if k in self.inputs}
        return torch.from_numpy(self.session.run(None, {k: v.numpy() for k, v in feed.items()})[0])


def _feeds(names: list[str], calibration: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    feeds = []
    for item in calibration:
        if isinstance(item, Mapping):
            feeds.append({k: np.ascontiguousarray(v.numpy()) for k, v in item.items() if k in names})
        else:
            feeds.append({names[0]: np.ascontiguousarray(item.numpy())})
    return feeds


def ort_int8(src: Path, dst: Path, mode: str, calibration: Sequence[Any] = ()) -> Path:
    """Write onnxruntime's int8 version of ``src`` to ``dst``: ``mode`` ``"static"`` (QDQ) or ``"dynamic"``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():  # onnxruntime.quantization logs advice ("consider pre-processing") per call
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)
        else:
            _quantize_static(src, dst, calibration)
    return dst


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_static(src: Path, dst: Path, calibration: Sequence[Any]) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(_feeds(names, calibration))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def static_scales(model: nn.Module, calibration: Sequence[Any]) -> dict[str, float]:
    """``{linear name: calibrate_scale of its inputs on every calibration input}``."""
    from prunekit.runtime.int8 import calibrate_scale

    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.inference_mode():
            for item in calibration:
                model(**item) if isinstance(item, Mapping) else model(item)
    finally:
        for h in hooks:
            h.remove()
    return {n: calibrate_scale(xs) for n, xs in seen.items()}


def prunekit_int8(model: nn.Module, fmt: str, calibration: Sequence[Any], blocksize: int | None = None,
                  pattern: tuple[int, int] | None = None) -> nn.Module:
    """A copy of ``model`` with every called ``nn.Linear`` an ``Int8Linear(fmt)``, static activations."""
    import copy

    from prunekit.runtime.int8 import Int8Linear

    scales = static_scales(model, calibration)
    out = copy.deepcopy(model)
    for name, scale in scales.items():
        parent, _, child = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        lin = getattr(holder, child)
        setattr(holder, child, Int8Linear.from_linear(lin, fmt, blocksize=blocksize, pattern=pattern,
                                                      activations="static", act_scale=scale))
    return out


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int, block: int = BLOCK) -> dict[str, float]:
    """Median ms per call of each zero-argument ``calls[name]``: ``block`` calls in a row per variant per round,
    rotating order, the first after a switch not counted (steady state); about ``repeats`` counted each."""
    names = list(calls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            calls[n]()
            calls[n]()
        for r in range(max(repeats // (block - 1), 1)):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                for i in range(block):
                    t0 = time.perf_counter_ns()
                    calls[n]()
                    if i:
                        samples[n].append((time.perf_counter_ns() - t0) / 1e6)
    return {n: statistics.median(v) for n, v in samples.items()}
