"""Physical removal: replace layers by smaller ones of the same kind, under the same names.

:func:`shrink` rebuilds every layer that loses an index with its registered
surgery and puts the new layer where the old one was, so module names and
``state_dict`` keys stay the same. The new per-layer shapes are returned as a
plain JSON-able dict; :func:`apply_shapes` rebuilds that architecture on a
freshly constructed (unpruned) model, e.g. before :func:`prunekit.load`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .layers import slice_inplace
from .registry import Keep, Surgery, find_surgery

__all__ = ["shrink", "apply_shapes", "Shapes"]

Shapes = dict[str, dict[str, list[int]]]


def shrink(model: nn.Module, keep: Mapping[str, Keep],
           surgeries: Mapping[str, Surgery] | None = None) -> tuple[nn.Module, Shapes]:
    """Rebuild the layers named in ``keep`` (``{path: {tensor: {dim: kept indices}}}``) smaller.

    Returns the model (a new object only when the model itself is the layer
    rebuilt) and ``{path: {tensor: shape}}`` of every rebuilt layer. Layers with
    a built-in surgery are sliced in place (same object, same type); a module
    without a surgery only ever loses entries of its own parameters (a layer
    scale multiplied in its ``forward``), sliced in place too. ``surgeries``
    (by path) take precedence over the registered ones (the graph's RMS norms).
    """
    shapes: Shapes = {}
    for path, layer_keep in keep.items():
        module = model.get_submodule(path)
        surgery = (surgeries or {}).get(path) or find_surgery(type(module))
        if surgery is None:
            if any("." in name for name in layer_keep):
                raise TypeError(f"cannot rebuild '{path}' ({type(module).__name__}): no surgery registered")
            slice_inplace(module, layer_keep)  # a parameter used directly (layer scale, bias)
            shapes[path] = {name: list(getattr(module, name).shape) for name in layer_keep}
            continue
        new = surgery.rebuild(module, layer_keep)
        if not isinstance(new, nn.Module):
            raise TypeError(f"the surgery for {type(module).__name__} returned {type(new).__name__}, not a module")
        model = _put(model, path, new)
        shapes[path] = {name: list(t.shape) for name, t in new.state_dict().items()}
    return model, shapes


def _put(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    if not path:
        return new
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def apply_shapes(model: nn.Module, shapes: Mapping[str, Mapping[str, object]]) -> nn.Module:
    """Give a freshly built model the pruned architecture described by ``shapes``.

    Args:
        model: the unpruned model, as its factory builds it.
        shapes: the ``shapes`` of a :class:`~prunekit.methods.structural.StructuralReport`
            (``{path: {tensor: shape}}``), or a pruned model's state_dict
            (``{"path.tensor": tensor}``), e.g. from :func:`prunekit.load`.

    RMS norms whose width shrinks (hidden-size pruning) get their ``eps``
    rescaled as :func:`prune_channels` did; their weights come with the state.

    Returns:
        The model with smaller layers (weights uninitialized-ish: load them next).

    Raises:
        ValueError: a path that is not in the model, or a shape larger than the layer's.

    Example:
        >>> model = apply_shapes(build_model(), report.shapes)  # doctest: +SKIP
        >>> prunekit.load("pruned.pkt", model)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_shapes: model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(v, torch.Tensor) for v in shapes.values()):
        shapes = _shapes_of_state(model, shapes)
    keep: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for path, tensors in shapes.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"apply_shapes: no module {path!r} in {type(model).__name__}") from None
        own = module.state_dict() if find_surgery(type(module)) is not None else dict(
            [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)])
        for name, shape in tensors.items():
            if name not in own:
                raise ValueError(f"apply_shapes: '{path}' has no tensor {name!r}")
            old = tuple(own[name].shape)
            shape = tuple(int(s) for s in shape)
            if len(shape) != len(old) or any(s > o or s < 1 for s, o in zip(shape, old)):
                raise ValueError(f"apply_shapes: '{path}.{name}' of shape {old} cannot become {shape}")
            for dim, (s, o) in enumerate(zip(shape, old)):
                if s != o:
                    keep.setdefault(path, {}).setdefault(name, {})[dim] = torch.arange(s)
    model = shrink(model, keep, _rms_surgeries(model, keep))[0]
    from .hf import sync_transformers

    sync_transformers(model)
    return model


def _rms_surgeries(model: nn.Module, keep: Mapping[str, Keep]) -> dict[str, Surgery]:
    """RMS norms whose weight shrinks: only hidden-size pruning does that, and it rescaled their eps."""
    from .rmsnorm import rms_norm_info, rms_surgery

    found = {}
    for path in keep:
        module = model.get_submodule(path)
        info = rms_norm_info(module) if find_surgery(type(module)) is None else None
        if info is not None:
            found[path] = rms_surgery(info)
    return found


def _shapes_of_state(model: nn.Module, state: Mapping[str, object]) -> Shapes:
    shapes: Shapes = {}
    for path, module in _outermost_layers(model):
        prefix = f"{path}." if path else ""
        own = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        new = {name: tuple(state[prefix + name].shape) if isinstance(state.get(prefix + name), torch.Tensor)
               else shape for name, shape in own.items()}
        if new != own:
            shapes[path] = {name: list(shape) for name, shape in new.items()}
    inside = [p for p, _ in _outermost_layers(model)]
    for path, module in model.named_modules():
        if any(path == p or path.startswith(f"{p}.") or not p for p in inside):
            continue
        prefix = f"{path}." if path else ""
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            other = state.get(prefix + name)
            if isinstance(other, torch.Tensor) and tuple(other.shape) != tuple(t.shape):
                shapes.setdefault(path, {})[name] = list(other.shape)
    return shapes


def _outermost_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with a surgery that are not inside another such module (those are rebuilt whole)."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        inside = any(path.startswith(f"{p}.") or not p for p, _ in found)
        if not inside and find_surgery(type(module)) is not None:
            found.append((path, module))
    return found
