"""The run directory: config hash, tensors and per-round results, written atomically.

Layout::

    run/
      config.json            what the run computes, and its hash
      init.safetensors       initial weights (theta_0)
      rewind.safetensors     weights at the rewind iteration k of round 0 (IMP runs)
      round_00/ round_01/ ...
        mask.safetensors     keep masks (bool), by parameter name
        weights.safetensors  weights at the end of the round's training (IMP runs)
        metrics.json         written last: a round is finished iff this file exists

Every file is written to a temporary name, fsynced and renamed, so a killed
process leaves either the old file or the new one. ``metrics.json`` records
the SHA-256 of the round's tensor files, and reading a finished round checks
them, then checks names, shapes and dtypes before any tensor is used. Nothing
is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from ..._io import atomic_write_bytes, atomic_write_json

__all__ = ["RunStore", "tensor_digest", "Spec"]

_FORMAT = "prunekit.lottery.run"  # a file format marker: unchanged when the package moved
_VERSION = 1
Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)
_METRICS_KEYS = ("round", "config_hash", "files", "remaining", "early_stop_iteration", "early_stop")


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and values, independent of any file format.

    Example:
        >>> tensor_digest({"a": torch.zeros(2)}) == tensor_digest({"a": torch.zeros(2)})
        True
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def spec_of(tensors: Mapping[str, torch.Tensor]) -> Spec:
    """``{name: (shape, dtype)}`` of ``tensors``."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunStore:
    """Reads and writes one run directory (see the module docstring for the layout).

    Args:
        root: the run directory (created on first write).

    Example:
        >>> store = RunStore("runs/ticket")  # doctest: +SKIP
        >>> store.bind({"kind": "imp", "config": {...}})  # doctest: +SKIP
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hash: str | None = None

    # -- identity ---------------------------------------------------------------------------

    def bind(self, identity: Mapping[str, Any]) -> str:
        """Record ``identity`` (what the run computes) or check it against the recorded one.

        Returns:
            The SHA-256 of the canonical JSON of ``identity``.

        Raises:
            ValueError: the directory holds a run with a different identity, or
                an unreadable ``config.json``.
        """
        identity = json.loads(json.dumps(identity, sort_keys=True))  # canonical, JSON-only values
        digest = _sha256(json.dumps(identity, sort_keys=True).encode())
        path = self.root / "config.json"
        if path.exists():
            saved = self._read_json(path)
            if saved.get("format") != _FORMAT or saved.get("version") != _VERSION:
                raise ValueError(f"{path}: not a prunekit lottery run (format {saved.get('format')!r}, "
                                 f"version {saved.get('version')!r})")
            if saved.get("hash") != digest:
                raise ValueError(f"{self.root}: holds a run with a different configuration "
                                 f"({_differences(saved.get('identity'), identity)}); use another directory, "
                                 "or delete this one to start over")
        else:
            atomic_write_json(path, {"format": _FORMAT, "version": _VERSION, "hash": digest, "identity": identity})
        self.hash = digest
        return digest

    # -- tensors ----------------------------------------------------------------------------

    def write_tensors(self, relpath: str, tensors: Mapping[str, torch.Tensor]) -> str:
        """Write ``tensors`` as safetensors at ``root/relpath`` atomically; return the file's SHA-256."""
        data = safetensors_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
        atomic_write_bytes(self.root / relpath, data)
        return _sha256(data)

    def read_tensors(self, relpath: str, spec: Spec, sha256: str | None = None) -> dict[str, torch.Tensor]:
        """Read ``root/relpath``, checking its SHA-256 (if given), names, shapes and dtypes.

        Raises:
            ValueError: the file is missing, altered, or does not match ``spec``.
        """
        path = self.root / relpath
        if not path.is_file():
            raise ValueError(f"{path}: missing")
        data = path.read_bytes()
        if sha256 is not None and _sha256(data) != sha256:
            raise ValueError(f"{path}: SHA-256 differs from the one recorded when it was written (file altered)")
        try:
            tensors = safetensors_load(data)
        except Exception as exc:  # safetensors raises its own error types on malformed headers
            raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None
        if set(tensors) != set(spec):
            raise ValueError(f"{path}: tensors {sorted(tensors)} do not match the expected {sorted(spec)}")
        for name, (shape, dtype) in spec.items():
            if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
                raise ValueError(f"{path}: '{name}' is {tensors[name].dtype} {tuple(tensors[name].shape)}, "
                                 f"expected {dtype} {shape}")
        return tensors

    # -- rounds -----------------------------------------------------------------------------

    def round_path(self, round_index: int, name: str = "") -> str:
        """Relative path of ``name`` inside round ``round_index``'s directory."""
        return f"round_{round_index:02d}/{name}" if name else f"round_{round_index:02d}"

    def is_finished(self, round_index: int) -> bool:
        """Whether round ``round_index`` finished (its ``metrics.json`` exists)."""
        return (self.root / self.round_path(round_index, "metrics.json")).is_file()

    def write_metrics(self, round_index: int, metrics: Mapping[str, Any]) -> None:
        """Write the round's ``metrics.json``: the last write of a round, which marks it finished."""
        atomic_write_json(self.root / self.round_path(round_index, "metrics.json"), dict(metrics))

    def read_metrics(self, round_index: int) -> dict[str, Any]:
        """Read a finished round's metrics, checking that they belong to this run and round.

        Raises:
            ValueError: unreadable, or written by another run or for another round.
        """
        path = self.root / self.round_path(round_index, "metrics.json")
        metrics = self._read_json(path)
        if metrics.get("config_hash") != self.hash or metrics.get("round") != round_index:
            raise ValueError(f"{path}: belongs to another run or round (round {metrics.get('round')!r}, "
                             f"config hash {str(metrics.get('config_hash'))[:12]}...); delete the round directory")
        missing = [key for key in _METRICS_KEYS if key not in metrics]
        if missing or not isinstance(metrics["files"], dict):
            raise ValueError(f"{path}: incomplete metrics (missing {missing or ['files']}); delete the round directory")
        return metrics

    def recorded_sha(self, round_index: int, metrics: Mapping[str, Any], name: str) -> str:
        """The SHA-256 that ``metrics`` recorded for file ``name``.

        Raises:
            ValueError: none was recorded.
        """
        sha = metrics["files"].get(name)
        if not isinstance(sha, str):
            raise ValueError(f"{self.root / self.round_path(round_index, 'metrics.json')}: no checksum for {name}")
        return sha

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return data


def _differences(old: Any, new: Mapping[str, Any], prefix: str = "") -> str:
    """A short description of which fields differ between two identities."""
    if not isinstance(old, Mapping):
        return "unreadable saved identity"
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs.append(_differences(a, b, prefix=f"{prefix}{key}."))
        elif a != b:
            shown = f"{a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 80 else "changed"
            diffs.append(f"{prefix}{key}: {shown}")
    return "; ".join(d for d in diffs if d and d != "none") or "none"
