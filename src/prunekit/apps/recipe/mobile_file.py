"""Phone-runtime files of a recipe's model: one code path for ``prunekit export`` and the recipe's export stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CALIBRATION_SAMPLES", "calibration_samples", "export_mobile_file"]

CALIBRATION_SAMPLES = 256  # int8 phone files: activation ranges from the first 256 training inputs


def export_mobile_file(model: Any, data: Any, to: str, out: Path) -> Any:
    """Write ``model`` as a .pte or .tflite at batch 1; ``to`` is one of the ``executorch``/``litert`` FORMATS.

    int8 is calibrated on the first :data:`CALIBRATION_SAMPLES` (256) training inputs of ``data`` (a recipe's :class:`Data`); returns the
    :class:`~prunekit.formats.mobile.MobileExport`. The recipe's export stage can call this too.

    Example:
        >>> export_mobile_file(model, data, "executorch-int8", Path("model_int8.pte")).bytes  # doctest: +SKIP
        9216
    """
    from ...formats.mobile import export_executorch, export_litert

    runtime, _, quantize = to.partition("-")
    export = export_executorch if runtime == "executorch" else export_litert
    calibration = data.X_train[:CALIBRATION_SAMPLES] if quantize else None
    return export(model, data.X_test[:1], out, quantize=quantize or None, calibration=calibration)


def calibration_samples(data: Any, to: str) -> int:
    """How many training inputs :func:`export_mobile_file` calibrates format ``to`` on (0 for fp32).

    Example:
        >>> from types import SimpleNamespace
        >>> calibration_samples(SimpleNamespace(X_train=range(100)), "litert-int8")
        100
    """
    return min(CALIBRATION_SAMPLES, len(data.X_train)) if to.endswith("-int8") else 0
