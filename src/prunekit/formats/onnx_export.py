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
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .._hf import cache_disabled
from .._io import atomic_write_bytes
from .._modes import in_mode

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
    example_input: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
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
        model: the model, exported in eval mode; afterwards every submodule gets its own
            train/eval flag back. A transformers model's ``config.use_cache`` (and
            ``generation_config.use_cache``) is ``False`` during the export, since a KV cache is no
            ONNX output, and restored after; a model whose output still holds a non-tensor object
            is refused.
        example_input: a tensor or a tuple of tensors, as passed to ``model(...)``, or a mapping
            ``{argument name: tensor}`` passed as ``model(**example_input)`` (e.g. ``input_ids`` and
            ``attention_mask`` of a transformers model; the ONNX inputs keep those names).
        path: destination ``.onnx`` file.
        quantize_dynamic: quantize weights to int8 with onnxruntime (activations are
            quantized on the fly at run time).
        opset: ONNX opset; ``None`` for the exporter's default.
        dynamic_batch: let dim 0 of every input vary (use an example batch of >= 2,
            since a batch of 1 specializes the graph).
        check: run onnxruntime on the example and on a random input of the same
            shapes (random floats; for the first integer input, random token ids over the whole
            vocabulary of the model's input embedding; later integer inputs such as attention
            masks as given), and compare with torch.
        rtol: the largest ``max|onnx - torch| / max|torch|`` accepted for an
            unquantized export (quantized exports report the error but never fail on it).

    Returns:
        An :class:`OnnxExport`.

    Raises:
        TypeError: ``model`` or ``example_input`` of the wrong kind.
        RuntimeError: the output holds a cache or other non-tensor object, the exporter
            fails (the message's first line names the innermost cause) or onnxruntime's
            outputs differ from torch's by more than ``rtol``; nothing is written then.
        ImportError: ``onnx``, ``onnxscript`` or ``onnxruntime`` is missing.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> export_onnx(net, torch.randn(2, 8), "net.onnx").max_rel_error < 1e-4  # doctest: +SKIP
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be an nn.Module, got {type(model).__name__}")
    inputs, names = _as_inputs(example_input)
    with in_mode(model, training=False), cache_disabled(model):
        _refuse_caches(model, inputs, names)
        data = _export(model, inputs, names, opset, dynamic_batch)
        if quantize_dynamic:
            data = _quantize(data)
        error = _check(model, inputs, data, names) if check else None
    if error is not None and not quantize_dynamic and error > rtol:
        raise RuntimeError(f"export_onnx: onnxruntime output differs from torch by {error:.2e} (relative), "
                           f"more than rtol={rtol:g}; nothing written")
    atomic_write_bytes(path, data)
    return OnnxExport(Path(path), len(data), quantize_dynamic, error)


_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def _call(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...] | None) -> Any:
    return model(*inputs) if names is None else model(**dict(zip(names, inputs)))


def _refuse_caches(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...] | None) -> None:
    """Run ``model`` once; raise a one-line error if its output holds anything but tensors (e.g. a KV cache)."""
    with torch.no_grad():
        output = _call(model, inputs, names)
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(output)
    for key, leaf in leaves:
        if not isinstance(leaf, _PLAIN):
            where = torch.utils._pytree.keystr(key) or "the output"
            raise RuntimeError(f"export_onnx: {type(model).__name__}'s output holds a {type(leaf).__name__} at "
                               f"{where}, which ONNX cannot return (a KV cache?); export a model that returns "
                               "tensors only: set its config.use_cache=False or call use_cache=False in a "
                               "wrapper's forward")


def _cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost exception in ``exc``'s chain (the exporters wrap the real cause)."""
    seen = set()
    while id(exc) not in seen and (exc.__cause__ or exc.__context__) is not None:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    first = lines[0] if lines else "(no message)"
    return f"{type(exc).__name__}: {first[:300]}"


def _as_inputs(example: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """The example's tensors, and their keyword names (``None`` for positional inputs)."""
    names = None
    if isinstance(example, torch.Tensor):
        inputs: tuple = (example,)
    elif isinstance(example, Mapping):
        names = tuple(example)
        inputs = tuple(example.values()) if all(isinstance(n, str) for n in names) else ()
    else:
        inputs = tuple(example) if isinstance(example, (list, tuple)) else ()
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("export_onnx: example_input must be a tensor, a non-empty tuple of tensors or a mapping "
                        "{argument name: tensor}")
    return inputs, names


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


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...] | None,
            opset: int | None, dynamic_batch: bool) -> bytes:
    dynamic: Any = tuple({0: torch.export.Dim.AUTO} if t.ndim else None for t in inputs) if dynamic_batch else None
    args, kwargs = (inputs, None) if names is None else ((), dict(zip(names, inputs)))
    if dynamic is not None and names is not None:
        dynamic = dict(zip(names, dynamic))
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic, verbose=False)
    except ImportError:
        raise
    except Exception as exc:
        raise RuntimeError(f"export_onnx: torch.onnx.export failed on {type(model).__name__}: {_cause(exc)}") from exc
    return program.model_proto.SerializeToString()


def _quantize(data: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="prunekit-onnx-") as tmp:
        src, dst = Path(tmp, "model.onnx"), Path(tmp, "model.int8.onnx")
        src.write_bytes(data)
        with _quiet():
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, reduce_range=_needs_reduce_range())
        return dst.read_bytes()


def _needs_reduce_range() -> bool:
    """Whether int8 weights should use 7 bits: x86 CPUs without VNNI.

    onnxruntime multiplies u8 activations by s8 weights with AVX2's ``vpmaddubsw``, whose
    int16 pair sums saturate at full 8-bit range (measured here: 0.12 relative error on a
    256-512-10 MLP at 80% sparsity, 0.01 with 7-bit weights); VNNI instructions do not saturate.
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return not any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _feeds(session: Any, batch: tuple[torch.Tensor, ...], names: tuple[str, ...] | None) -> dict[str, Any]:
    """onnxruntime inputs: by name for keyword examples (the graph may drop unused ones), else in order."""
    graph = [i.name for i in session.get_inputs()]
    if names is not None and set(graph) <= set(names):
        by_name = dict(zip(names, batch))
        return {n: by_name[n].detach().cpu().numpy() for n in graph}
    return {n: t.detach().cpu().numpy() for n, t in zip(graph, batch)}


def _check(model: nn.Module, inputs: tuple[torch.Tensor, ...], data: bytes,
           names: tuple[str, ...] | None = None) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (inputs, _random_like(model, inputs)):
        with torch.no_grad():
            expected = _leaves(_call(model, batch, names))
        got = session.run(None, _feeds(session, batch, names))
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


def _vocab_size(model: nn.Module) -> int | None:
    """Number of token ids the model's input embedding accepts, if it can be told."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except Exception:  # models that do not implement it raise NotImplementedError
        emb = None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def _random_like(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A second input of the same shapes: random floats; random ids for the first integer input (token ids:
    over the vocabulary, or the example's range when it is unknown); later integer inputs (attention masks,
    token types, positions) and booleans as given, since random values there need not be valid."""
    generator = torch.Generator().manual_seed(0)
    vocab = _vocab_size(model)
    out, first_done = [], False
    for t in inputs:
        if t.is_floating_point():
            out.append(torch.randn(t.shape, generator=generator).to(t.dtype))
        elif t.dtype == torch.bool or t.is_complex() or not t.numel() or first_done:
            out.append(t)
        else:
            low, high = (0, vocab) if vocab is not None else (int(t.min()), int(t.max()) + 1)
            out.append(torch.randint(low, high, t.shape, generator=generator).to(t.dtype))
            first_done = True
    return tuple(out)


def _leaves(output: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor)]
