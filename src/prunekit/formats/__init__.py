"""Ship pruned models small: compressed, checksummed files, int8 weights, ONNX export, inspection.

* :func:`save` / :func:`load` (and :func:`dumps` / :func:`loads` for bytes): a
  safetensors file with a JSON manifest; each tensor in its smallest encoding.
* :func:`quantize_int8`: symmetric per-output-channel int8 that keeps zeros zero.
* :func:`export_onnx`: ONNX export checked against onnxruntime, optionally int8.
* :func:`inspect_file` / ``prunekit inspect FILE``: where the bytes go (and a full integrity check).
* :func:`size_summary`: fp32, gzip, prunekit, prunekit+int8 and the entropy bound.
* :class:`FormatError`: the one error a reader raises for a bad file.
* :class:`UnsupportedTensorError`: what ``save`` raises for a tensor it cannot store.

A reader's memory is the restored tensors plus a constant (``max_bytes``
bounds their total; see :mod:`.container` for the exact bounds), tensor names
are printable text (:mod:`.names`), and writes are atomic.

Example:
    >>> import prunekit
    >>> prunekit.save(model, "model.pkt", quantize="int8")  # doctest: +SKIP
    >>> state = prunekit.load("model.pkt", model)  # doctest: +SKIP
"""

from .container import DEFAULT_MAX_BYTES, UnsupportedTensorError, dumps, load, loads, save
from .errors import FormatError
from .inspect import FileReport, TensorRow, inspect_bytes, inspect_file
from .onnx_export import OnnxExport, export_onnx
from .quantize import QuantizedTensor, dequantize, quantize_int8
from .stats import entropy_bound_bits, size_summary

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FileReport",
    "FormatError",
    "OnnxExport",
    "QuantizedTensor",
    "TensorRow",
    "UnsupportedTensorError",
    "dequantize",
    "dumps",
    "entropy_bound_bits",
    "export_onnx",
    "inspect_bytes",
    "inspect_file",
    "load",
    "loads",
    "quantize_int8",
    "save",
    "size_summary",
]
