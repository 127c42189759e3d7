"""Node-by-node dispatch: layers with a surgery, parameter-free layers, functions and methods."""

from __future__ import annotations

from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from . import layers  # noqa: F401  (registers the built-in surgeries)
from .flow import GraphError
from .graph import Context, DependencyGraph, flow_leaves, untracked_flow
from .ops import FUNCTIONS, METHODS, module_rule
from .registry import find_surgery


class Propagator:
    """Turns each traced node into Flows, recording members and couplings in ``graph``."""

    def __init__(self, graph: DependencyGraph, ignore: Iterable[str | type] | None) -> None:
        self.graph = graph
        self.uf = graph.uf
        self.ignore_paths, self.ignore_types = _split_ignore(graph.model, ignore)

    def ignored(self, module: nn.Module, path: str) -> bool:
        """Whether ``module`` at ``path`` is kept whole and never pruned."""
        return path in self.ignore_paths or isinstance(module, self.ignore_types)

    def is_leaf(self, module: nn.Module, path: str) -> bool:
        """Trace ``module`` as one call (it has a surgery, a rule, or is ignored)."""
        return self.ignored(module, path) or find_surgery(type(module)) is not None or module_rule(module) is not None

    def where(self, node: fx.Node) -> str:
        """``"'path' (Type)"`` of the module a node runs in, for messages."""
        stack = node.meta.get("nn_module_stack") or {}
        if node.op == "call_module":
            return f"'{node.target}' ({type(self.graph.module(str(node.target))).__name__})"
        if not stack:
            return f"the model's forward ({type(self.graph.model).__name__})"
        path, kind = list(stack.values())[-1]
        return f"'{path}' ({getattr(kind, '__name__', kind)})"

    def fail(self, node: fx.Node, message: str) -> None:
        """Raise :class:`GraphError` naming the op and the module it runs in."""
        raise GraphError(f"cannot prune through {_op_name(node)} in {self.where(node)}: {message}")

    def __call__(self, node: fx.Node, value: Any, args: Any, kwargs: Any) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return untracked_flow(value)
        if node.op == "output":
            for flow in flow_leaves(args):
                if flow.tracked:
                    self.uf.freeze(flow.atoms, "model output")
            return None
        if node.op == "call_module":
            return self._module(node, value, args, kwargs)
        rule = FUNCTIONS.get(node.target) if node.op == "call_function" else METHODS.get(str(node.target))
        if rule is not None:
            return rule(self, node, value, args, kwargs)
        return self._unknown(node, value, args, kwargs)

    def _module(self, node: fx.Node, value: Any, args: Any, kwargs: Any) -> Any:
        path = str(node.target)
        module = self.graph.module(path)
        if self.ignored(module, path):
            for flow in flow_leaves((args, kwargs)):
                if flow.tracked:
                    self.uf.freeze(flow.atoms, f"'{path}' is in ignore")
            return untracked_flow(value)
        surgery = find_surgery(type(module))
        if surgery is not None:
            return surgery.couple(module, Context(self.graph, node, path, module, value), *args, **kwargs)
        rule = module_rule(module)
        if rule is not None:
            return rule(self, node, value, args, kwargs)
        return self._unknown(node, value, args, kwargs)

    def _unknown(self, node: fx.Node, value: Any, args: Any, kwargs: Any) -> Any:
        if not any(f.tracked for f in flow_leaves((args, kwargs))):
            return untracked_flow(value)
        if node.op == "call_module":
            kind = type(self.graph.module(str(node.target))).__name__
            raise GraphError(f"cannot prune through '{node.target}' ({kind}): register surgery with "
                             f"prunekit.structural.register_surgery({kind}, couple, rebuild), "
                             f"or pass ignore=['{node.target}'] to leave its channels alone")
        self.fail(node, "this op is not supported; wrap it in a layer and register surgery with "
                        "prunekit.structural.register_surgery(Layer, couple, rebuild), or pass that module in ignore=")


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    prefix = "torch" if module.startswith("torch") and "functional" not in module else module
    return f"{prefix}.{name}" if prefix else name


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
