"""The capture: module hooks and op dispatch that turn one real forward into Flows.

Modules with a registered surgery and ignored modules are *opaque*: their
inputs' Flows are taken when they are called, their internal ops are not
recorded, and their output Flows come from the surgery's ``couple`` rule.
Every other module is followed op by op through :mod:`prunekit.methods.structural.ops`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .flow import Flow, GraphError
from .graph import Context, DependencyGraph, DimInt, flow_leaves, untracked_flow
from .ops import rule_for
from .registry import find_surgery


class Capture:
    """Turns each recorded call into Flows, recording members and couplings in ``graph``."""

    def __init__(self, graph: DependencyGraph, ignore: Iterable[str | type] | None) -> None:
        self.graph = graph
        self.uf = graph.uf
        self.ignore_paths, self.ignore_types = _split_ignore(graph.model, ignore)
        self.opaque = 0
        self.stack: list[tuple[str, nn.Module]] = []
        self._flows: dict[int, tuple[torch.Tensor, Flow]] = {}  # id -> (tensor kept alive, flow)
        self._pending: list[tuple[Any, Any] | None] = []
        self._sources = {}
        for path, module in graph.model.named_modules():
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if t is not None:
                    self._sources.setdefault(id(t), (t, (path, name)))

    # -- bookkeeping ---------------------------------------------------------------------------------

    def rms_surgeries(self) -> dict[str, Any]:
        """Surgeries for the model's RMS norms (probed now, before the recorded forward)."""
        from .rmsnorm import rms_norm_info, rms_surgery

        found = {}
        for path, module in self.graph.model.named_modules():
            if not self.ignored(module, path):
                info = rms_norm_info(module)
                if info is not None:
                    found[path] = rms_surgery(info)
        return found

    def surgery(self, module: nn.Module, path: str) -> Any:
        """The surgery for ``module`` at ``path``: one found for this model, else the registered one."""
        return self.graph.surgeries.get(path) or find_surgery(type(module))

    def ignored(self, module: nn.Module, path: str) -> bool:
        """Whether ``module`` at ``path`` is kept whole and never pruned."""
        return path in self.ignore_paths or isinstance(module, self.ignore_types)

    def flow(self, value: Any) -> Any:
        """The Flow of a tensor (untracked when never seen); other values as they are."""
        if not isinstance(value, torch.Tensor):
            return value
        found = self._flows.get(id(value))
        if found is not None and found[0] is value:
            return found[1]
        source = self._sources.get(id(value))
        return Flow(tuple(value.shape), source=source[1] if source and source[0] is value else None)

    def set_flow(self, value: Any, flow: Any) -> None:
        """Attach ``flow`` (nested like ``value``) to the tensors of ``value``."""
        if isinstance(value, torch.Tensor):
            if isinstance(flow, Flow) and (flow.tracked or flow.deps is not None):
                self._flows[id(value)] = (value, flow)
            else:
                self._flows.pop(id(value), None)
        elif isinstance(value, (tuple, list)) and isinstance(flow, (tuple, list)):
            for v, f in zip(value, flow):
                self.set_flow(v, f)
        elif isinstance(value, dict) and isinstance(flow, dict):
            for key in value:
                if key in flow:
                    self.set_flow(value[key], flow[key])

    def where(self, *_: Any) -> str:
        """``"'path' (Type)"`` of the module running now, for messages."""
        if not self.stack or not self.stack[-1][0]:
            return f"the model's forward ({type(self.graph.model).__name__})"
        path, module = self.stack[-1]
        return f"'{path}' ({type(module).__name__})"

    def fail(self, func: Any, message: str) -> None:
        """Raise :class:`GraphError` naming the op and the module it runs in, and the two ways out."""
        path, module = self.stack[-1] if self.stack else ("", self.graph.model)
        kind = type(module).__name__
        skip = f"pass ignore=['{path}'] to leave its channels alone" if path else \
            "pass the enclosing module in ignore="
        if any(True for _ in module.parameters(recurse=False)):
            raise GraphError(f"cannot prune through '{path}' ({kind}): register surgery with "
                             f"prunekit.register_surgery({kind}, couple, rebuild), or {skip} "
                             f"({op_name(func)}: {message})")
        raise GraphError(f"cannot prune through {op_name(func)} in {self.where()}: {message}; wrap it in a layer "
                         f"and register surgery with prunekit.register_surgery(Layer, couple, rebuild), "
                         f"or {skip}")

    def release(self, flows: Any) -> None:
        """Freeze what depends on values that are read now (``Flow.deps``)."""
        for flow in flow_leaves(flows):
            if flow.deps is not None:
                self.uf.freeze(*flow.deps)

    # -- ops -----------------------------------------------------------------------------------------

    def on_op(self, func: Any, value: Any, args: tuple, kwargs: dict) -> Any:
        """Record one torch call made outside opaque layers; returns the value (sizes as DimInt)."""
        fargs = _map(self.flow, args)
        fkwargs = _map(self.flow, kwargs)
        leaves = flow_leaves((fargs, fkwargs))
        self.release(leaves)
        tracked = [f for f in leaves if f.tracked]
        if not tracked:
            if isinstance(value, torch.Tensor):
                self._flows.pop(id(value), None)  # an in-place op on an untracked tensor
            return value
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a tensor property: x.shape, x.T, x.data ...
            name = getattr(getattr(func, "__self__", None), "__name__", "")
            if not isinstance(value, torch.Tensor):
                return _dim_sizes(value, fargs[0], (), name) if name == "shape" else value
        elif name == "size" and isinstance(args[0], torch.Tensor):
            return _dim_sizes(value, fargs[0], args[1:] or tuple(kwargs.values()), name)
        rule = rule_for(func, name)
        if rule is None:
            self.fail(func, "this op is not supported")
        self.set_flow(value, rule(self, func, value, fargs, fkwargs))
        return value

    # -- modules -------------------------------------------------------------------------------------

    def install(self) -> list[Any]:
        """Forward hooks on every module; returns their handles."""
        handles = []
        for path, module in self.graph.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre(path), with_kwargs=True))
            handles.append(module.register_forward_hook(self._post(path), with_kwargs=True))
        return handles

    def _is_opaque(self, module: nn.Module, path: str) -> bool:
        return self.ignored(module, path) or self.surgery(module, path) is not None

    def _pre(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.stack.append((path, module))
            if self.opaque or not self._is_opaque(module, path):
                self._pending.append(None)
                self.opaque += bool(self.opaque)
                return
            self._pending.append((_map(self.flow, args), _map(self.flow, kwargs)))
            self.opaque += 1
        return hook

    def _post(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            pending = self._pending.pop()
            if self.opaque:
                self.opaque -= 1
            if pending is not None:
                self.set_flow(output, self._layer(path, module, output, *pending))
            self.stack.pop()
        return hook

    def _layer(self, path: str, module: nn.Module, value: Any, fargs: tuple, fkwargs: dict) -> Any:
        self.release((fargs, fkwargs))
        if self.ignored(module, path):
            for flow in flow_leaves((fargs, fkwargs)):
                if flow.tracked:
                    self.uf.freeze(flow.atoms, f"'{path}' is in ignore")
            return untracked_flow(value)
        surgery = self.surgery(module, path)
        return surgery.couple(module, Context(self.graph, path, module, value), *fargs, **fkwargs)

    def finish(self, output: Any) -> None:
        """Freeze every channel of the model's outputs."""
        flows = _map(self.flow, output)
        self.release(flows)
        for flow in flow_leaves(flows):
            if flow.tracked:
                self.uf.freeze(flow.atoms, "model output")


def _map(fn: Any, obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map(fn, o) for o in obj)
    if isinstance(obj, list):
        return [_map(fn, o) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    return obj


def _dim_sizes(value: Any, flow: Flow, args: tuple, name: str) -> Any:
    """Sizes of a tracked tensor: its channel dim comes back as a :class:`DimInt`."""
    if not flow.tracked:
        return value
    if isinstance(value, int):
        dim = args[0] if args else None
        return DimInt(value) if dim is not None and dim % len(flow.shape) == flow.dim else value
    if isinstance(value, torch.Size):
        return torch.Size([DimInt(s) if i == flow.dim else s for i, s in enumerate(value)])
    return value


def op_name(func: Any) -> str:
    """``torch.cumsum``, ``Tensor.view``, ``torch.nn.functional.pad`` ..."""
    name = getattr(func, "__name__", str(func))
    qual = getattr(func, "__qualname__", "")
    if qual.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch._C") or not module or getattr(torch, name, None) is func:
        return f"torch.{name}"
    return f"{module}.{name}"


def _split_ignore(model: nn.Module, ignore: Iterable[str | type] | None) -> tuple[set[str], tuple[type, ...]]:
    if ignore is None:
        return set(), ()
    if isinstance(ignore, (str, type)):
        ignore = [ignore]
    paths, types = set(), []
    names = {name for name, _ in model.named_modules()}
    for item in ignore:
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, str):
            if item not in names:
                raise ValueError(f"ignore: no module named {item!r} in the model")
            paths.add(item)
        else:
            raise TypeError(f"ignore: entries must be module paths or nn.Module types, got {item!r}")
    return paths, tuple(types)
