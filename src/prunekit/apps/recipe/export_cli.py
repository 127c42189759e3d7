"""``prunekit export RUN_DIR|--recipe R.yaml --to FORMAT --out FILE``: export a run's final model.

FORMAT: ``prunekit``, ``int8``, ``onnx``, or a phone runtime's file at batch 1: ``executorch`` (.pte),
``executorch-int8``, ``litert`` (.tflite), ``litert-int8`` (int8 calibrated on 256 training inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .mobile_file import CALIBRATION_SAMPLES, calibration_samples, export_mobile_file

__all__ = ["CALIBRATION_SAMPLES", "FORMATS", "calibration_samples", "export_command",
           "export_mobile_file", "export_run"]

FORMATS = ("prunekit", "int8", "onnx", "executorch", "executorch-int8", "litert", "litert-int8")


def export_run(run_dir: Path | None, recipe: Path | None, to: str, out: Path, runs: Path = Path("runs")) -> int:
    """Write the final model of a run to ``out`` in format ``to``; return the bytes written.

    Example:
        >>> export_run(Path("runs/demo-3f2a9c0b1d4e"), None, "int8", Path("model_int8.pkt"))  # doctest: +SKIP
        11873
    """
    from ...formats import export_onnx, save
    from .build import load_data
    from .run import resolve_run
    from .stages import load_final_model

    config, run = resolve_run(run_dir, recipe, runs)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; give a file name")
    model = load_final_model(config, run)
    if to == "onnx":
        example = load_data(config.data).X_test[:8]
        return export_onnx(model, example, out).bytes
    if to.startswith(("executorch", "litert")):
        return export_mobile_file(model, load_data(config.data), to, out).bytes
    return save(model, out, quantize="int8" if to == "int8" else None)


def export_command(run_dir: Path | None, recipe: Path | None, to: str, out: Path, runs: Path = Path("runs")) -> int:
    """:func:`export_run`, then say what was written; the exit code.

    Example:
        >>> export_command(Path("runs/demo-3f2a9c0b1d4e"), None, "int8", Path("m.pkt"))  # doctest: +SKIP
        wrote m.pkt (11,873 bytes, int8)
        0
    """
    written = export_run(run_dir, recipe, to, out, runs)
    print(f"wrote {out} ({written:,} bytes, {to})")
    return 0
