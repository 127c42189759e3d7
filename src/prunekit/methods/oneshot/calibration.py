"""Calibration: feed inputs to a model (without a KV cache), gather layer statistics.

The statistic of a layer is the Gram matrix ``H = X Xᵀ / rows`` of its inputs
as rows of its matrix problem (``X``: one column per token, every leading
dimension flattened; for a convolution one column per output position, its
im2col patch), accumulated in float64. Its diagonal gives Wanda's squared input norms; the
whole matrix is SparseGPT's Hessian and measures the reconstruction error of
any pruned weight. Memory: ``(in·k)²`` float64 per hooked layer (per group).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .layers import Layer

__all__ = ["GramAccumulator", "SharedProduct", "call_model", "gather_grams", "to_device"]


def to_device(sample: Any, device: torch.device) -> Any:
    """``sample`` with every tensor inside it (nested dicts, lists, tuples) moved to ``device``."""
    if isinstance(sample, torch.Tensor):
        return sample.to(device)
    if isinstance(sample, Mapping):
        return {k: to_device(v, device) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(to_device(v, device) for v in sample)
    return sample


_CACHE_ARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _accepts_use_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: nn.Module, sample: Any) -> Any:
    """``model(**sample)`` for a mapping, ``model(*sample)`` for a tuple/list, else ``model(sample)``.

    A model whose forward takes ``use_cache`` gets ``use_cache=False``: calibration
    never builds a KV cache, so no cache captured in a block's inputs can carry
    keys from one calibration call into the next.

    Raises:
        ValueError: a sample carries a cache (``past_key_values=``/``cache=``).

    Example:
        >>> call_model(nn.Identity(), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    extra = {"use_cache": False} if _accepts_use_cache(model) else {}
    if isinstance(sample, Mapping):
        given = [k for k in _CACHE_ARGS if sample.get(k) is not None]
        if given:
            raise ValueError(f"prune_oneshot: calibration samples must not carry a cache ({given[0]}=...): "
                             "calibration runs each sample from scratch; drop it from the samples")
        return model(**{**sample, **extra})
    if isinstance(sample, (list, tuple)):
        return model(*sample, **extra)
    return model(sample, **extra)


class GramAccumulator:
    """Forward hook summing ``X Xᵀ`` over the rows of a layer's matrix problem (tokens, or conv patches).

    The first call also checks that the layer computes ``rows(x) @ M.T + b``
    (:meth:`Layer.verify`), so a layer whose forward does something else is refused.
    A grouped convolution gets one Gram matrix per group: ``(groups, in·k, in·k)``.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> acc = GramAccumulator(layer)
        >>> _ = layer(torch.ones(4, 3)); acc.remove()
        >>> acc.gram().tolist(), acc.tokens
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], 4)
    """

    def __init__(self, layer: nn.Module | Layer, name: str = "", shared: SharedProduct | None = None) -> None:
        self.layer = layer if isinstance(layer, Layer) else Layer.of(name or type(layer).__name__, layer)
        d = self.layer.columns
        self.sum = torch.zeros(self.layer.groups, d, d, dtype=torch.float64, device=self.layer.weight.device)
        self.tokens = 0
        self._shared = shared
        self._handle = self.layer.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.tokens == 0:
            self.layer.verify(args, output)
        rows, product = self._product(args) if self._shared is None else self._shared.get(self.layer, args,
                                                                                           self._product)
        self.sum.add_(product)
        self.tokens += rows

    def _product(self, args: tuple[Any, ...]) -> tuple[int, torch.Tensor]:
        x = self.layer.input_rows(args).double()
        x = x.reshape(x.shape[0], self.layer.groups, -1)
        return x.shape[0], torch.einsum("tgi,tgj->gij", x, x)

    def gram(self) -> torch.Tensor:
        """The mean ``X Xᵀ`` over rows (zeros if the layer saw none): ``(in, in)``, or ``(groups, in, in)``."""
        mean = self.sum / max(self.tokens, 1)
        return mean[0] if self.layer.groups == 1 else mean

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()


class SharedProduct:
    """The last ``X Xᵀ`` computed, kept for the next ``Linear`` fed the very same input tensor.

    In a transformer block q/k/v read one tensor, and so do gate/up: one product serves
    them all, the same bits as computing it for each (the same tensor, unmodified: same
    object and version, same width).

    Example:
        >>> shared, q, k = SharedProduct(), nn.Linear(4, 4), nn.Linear(4, 2)
        >>> accs = [GramAccumulator(m, shared=shared) for m in (q, k)]
        >>> x = torch.randn(3, 4); _ = q(x), k(x)
        >>> shared.computed, torch.equal(accs[0].gram(), accs[1].gram())
        (1, True)
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._value: tuple[int, torch.Tensor] | None = None
        self.computed = 0

    def get(self, layer: Layer, args: tuple[Any, ...], compute: Any) -> tuple[int, torch.Tensor]:
        """``compute(args)``, or the last result when ``layer`` is a Linear fed the same input as the last one."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not isinstance(layer.module, nn.Linear):
            return compute(args)
        key = (x, x._version, layer.columns, layer.groups)
        if self._key is None or self._key[0] is not x or self._key[1:] != key[1:]:
            self._key, self._value = key, compute(args)
            self.computed += 1
        return self._value

    def clear(self) -> None:
        """Drop the kept input and product."""
        self._key = self._value = None


@torch.no_grad()
def gather_grams(run: Any, layers: dict[str, Layer], *, share: bool = True) -> dict[str, torch.Tensor]:
    """Hook ``layers``, call ``run()`` (which feeds calibration data through them), return their mean Gram matrices.

    With ``share``, Linear layers fed the same input tensor (q/k/v, gate/up) compute its product
    once (:class:`SharedProduct`; bit-identical to ``share=False``).
    """
    shared = SharedProduct() if share else None
    accumulators = {name: GramAccumulator(layer, shared=shared) for name, layer in layers.items()}
    try:
        run()
    finally:
        for acc in accumulators.values():
            acc.remove()
        if shared is not None:
            shared.clear()
    empty = [name for name, acc in accumulators.items() if acc.tokens == 0]
    if empty:
        raise ValueError(f"prune_oneshot: the calibration data never reached {', '.join(empty)} (their forward "
                         "was never called, e.g. a weight used through a functional call); pass "
                         f"exclude={empty!r} or check the inputs")
    return {name: acc.gram() for name, acc in accumulators.items()}
