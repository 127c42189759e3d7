"""Calibration: feed inputs to a model, find its block list, capture block inputs, gather layer statistics.

The statistic of a ``Linear`` layer is the Gram matrix ``H = X Xᵀ / tokens`` of
its inputs (``X``: one column per token, every leading dimension flattened),
accumulated in float64. Its diagonal gives Wanda's squared input norms; the
whole matrix is SparseGPT's Hessian and measures the reconstruction error of
any pruned weight. Memory: ``in_features²`` float64 per hooked layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "GramAccumulator", "call_model", "capture_block_inputs", "find_blocks", "first_output", "gather_grams",
    "replace_hidden", "to_device",
]

BlockInput = tuple[tuple[Any, ...], dict[str, Any]]


def to_device(sample: Any, device: torch.device) -> Any:
    """``sample`` with every tensor inside it (nested dicts, lists, tuples) moved to ``device``."""
    if isinstance(sample, torch.Tensor):
        return sample.to(device)
    if isinstance(sample, Mapping):
        return {k: to_device(v, device) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(to_device(v, device) for v in sample)
    return sample


def call_model(model: nn.Module, sample: Any) -> Any:
    """``model(**sample)`` for a mapping, ``model(*sample)`` for a tuple/list, else ``model(sample)``.

    Example:
        >>> call_model(nn.Identity(), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if isinstance(sample, Mapping):
        return model(**sample)
    if isinstance(sample, (list, tuple)):
        return model(*sample)
    return model(sample)


class GramAccumulator:
    """Forward hook summing ``X Xᵀ`` over the tokens a ``Linear`` layer sees.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> acc = GramAccumulator(layer)
        >>> _ = layer(torch.ones(4, 3)); acc.remove()
        >>> acc.gram().tolist(), acc.tokens
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], 4)
    """

    def __init__(self, layer: nn.Linear) -> None:
        self.sum = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64,
                               device=layer.weight.device)
        self.tokens = 0
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def gram(self) -> torch.Tensor:
        """The mean ``X Xᵀ`` over tokens (zeros if the layer saw none)."""
        return self.sum / max(self.tokens, 1)

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()


def _linear_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the ``ModuleList`` of same-type modules holding the most ``Linear`` layers.

    For a Hugging Face BERT this is ``encoder.layer``; for a GPT-2 ``h``.
    ``None`` if no such list exists.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(2))
        >>> find_blocks(Net())[0]
        'layers'
    """
    best: tuple[str, nn.ModuleList] | None = None
    best_count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or _linear_count(module[0]) == 0:
            continue
        count = _linear_count(module)
        if count > best_count:
            best, best_count = (name, module), count
    return best


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first: nn.Module, calibration: Iterable[Any]) -> list[BlockInput]:
    """The ``(args, kwargs)`` the block ``first`` receives for each calibration sample.

    The forward pass of each sample stops as soon as ``first`` is reached, so
    nothing after it runs.
    """
    captured: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in calibration:
            try:
                call_model(model, sample)
            except _Stop:
                continue
            raise ValueError("prune_oneshot: a calibration sample ran through the model without reaching its "
                             "first block; pass blocks=False to calibrate all Linear layers in one pass")
    finally:
        handle.remove()
    return captured


def first_output(output: Any) -> torch.Tensor:
    """A block's hidden states: the output itself, or the first element of a tuple/list."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_hidden(inputs: BlockInput, hidden: torch.Tensor) -> BlockInput:
    """``inputs`` with the hidden states (first positional argument, else ``hidden_states=``) replaced."""
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise ValueError("prune_oneshot: cannot tell which input of the block is its hidden state (no positional "
                     "argument and no 'hidden_states' keyword); pass blocks=False")


@torch.no_grad()
def gather_grams(run: Any, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Hook ``layers``, call ``run()`` (which feeds calibration data through them), return their mean Gram matrices."""
    accumulators = {name: GramAccumulator(layer) for name, layer in layers.items()}
    try:
        run()
    finally:
        for acc in accumulators.values():
            acc.remove()
    empty = [name for name, acc in accumulators.items() if acc.tokens == 0]
    if empty:
        raise ValueError(f"prune_oneshot: the calibration data never reached {', '.join(empty)}; "
                         "exclude these layers or check the inputs")
    return {name: acc.gram() for name, acc in accumulators.items()}
