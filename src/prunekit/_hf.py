"""Helpers for transformers models that never import transformers (duck-typed on their configs)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

__all__ = ["cache_disabled", "cache_configs"]


def cache_configs(model: nn.Module) -> list[Any]:
    """The distinct config objects of ``model`` that set ``use_cache``.

    Every module's ``config`` and ``generation_config`` (read from the module's
    own ``__dict__``, so no property runs), and their nested sub-configs
    (``text_config``, ``decoder``, … of composite models).

    Example:
        >>> cache_configs(nn.Linear(2, 2))
        []
    """
    seen: dict[int, Any] = {}
    for module in model.modules():
        for attr in ("config", "generation_config"):
            for cfg in _with_subconfigs(module.__dict__.get(attr)):
                if isinstance(getattr(cfg, "use_cache", None), bool):
                    seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _with_subconfigs(config: Any) -> list[Any]:
    if config is None or not hasattr(config, "to_dict"):
        return []
    return [config, *(v for v in vars(config).values() if hasattr(v, "to_dict") and v is not config)]


@contextlib.contextmanager
def cache_disabled(model: nn.Module) -> Iterator[None]:
    """``use_cache = False`` on every config of ``model`` inside the block; the values are restored after.

    A KV cache is no ONNX output, and a cache object captured during
    calibration would be reused by the next forward.

    Example:
        >>> with cache_disabled(nn.Linear(2, 2)):
        ...     pass
    """
    saved = [(cfg, cfg.use_cache) for cfg in cache_configs(model)]
    for cfg, _ in saved:
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg, value in saved:
            cfg.use_cache = value
