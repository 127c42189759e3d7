"""The dependency graph: trace a model, follow its channels, record who owns which slice.

:func:`build_graph` traces the model with ``torch.fx`` (layers with a registered
surgery, and parameter-free torch layers, stay whole), runs the traced graph on
the example input, and propagates :class:`~prunekit.structural.flow.Flow`
values node by node. Layer rules (see :mod:`prunekit.structural.layers`) and op
rules (:mod:`prunekit.structural.ops`) create atoms, unite them and record
*members*: ``(module path, parameter, dim, one atom per index)``. Groups of
coupled units are read from the result (:mod:`prunekit.structural.groups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .flow import Flow, GraphError, UnionFind

__all__ = ["Member", "Context", "DependencyGraph", "build_graph"]


@dataclass(frozen=True)
class Member:
    """Slice ownership: index ``i`` of ``param`` along ``dim`` in module ``path`` belongs to ``atoms[i]``."""

    path: str
    param: str
    dim: int
    atoms: tuple[int, ...]


class Context:
    """What a layer's coupling rule sees and may do (see :func:`~prunekit.structural.register_surgery`).

    Attributes:
        path: the module's path in the model (``""`` for the model itself).
        module: the module.
        node: the ``torch.fx`` node of the call.
        value: the module's real output on the example input.
    """

    def __init__(self, graph: "DependencyGraph", node: fx.Node, path: str, module: nn.Module, value: Any) -> None:
        self.graph, self.node, self.path, self.module, self.value = graph, node, path, module, value

    def new_atoms(self, n: int) -> tuple[int, ...]:
        """``n`` fresh channels (e.g. a layer's output channels)."""
        return self.graph.uf.new(n)

    def unite(self, left: Sequence[int], right: Sequence[int]) -> None:
        """Couple ``left[i]`` with ``right[i]``: they are kept or removed together."""
        self.graph.uf.unite(left, right)

    def unite_all(self, atoms: Sequence[int]) -> None:
        """Make ``atoms`` one unit (e.g. all channels of a convolution group)."""
        self.graph.uf.unite_all(atoms)

    def freeze(self, atoms: Sequence[int], reason: str) -> None:
        """Never prune ``atoms``; ``reason`` shows in :meth:`DependencyGraph.frozen_reasons`."""
        self.graph.uf.freeze(atoms, f"{self.path or '<model>'}: {reason}")

    def input_atoms(self, flow: Flow, dim: int, size: int) -> tuple[int, ...]:
        """The atoms of input ``flow`` along ``dim`` (negative counts from the end), ``size`` of them.

        An untracked input gets fresh frozen atoms: its channels cannot change.
        """
        if not isinstance(flow, Flow) or not flow.is_tensor:
            self.fail(f"expected a tensor input, got {flow!r:.60}")
        dim = dim % len(flow.shape)
        if flow.shape[dim] != size:
            self.fail(f"expected {size} channels along dim {dim} of the input, got shape {flow.shape}")
        if not flow.tracked:
            atoms = self.new_atoms(size)
            self.freeze(atoms, "input channels come from a tensor whose shape cannot change")
            return atoms
        if flow.dim != dim:
            self.fail(f"its input carries channels on dim {flow.dim}, the layer reads them on dim {dim}")
        return flow.atoms

    def member(self, param: str, dim: int, atoms: Sequence[int]) -> None:
        """Record that index ``i`` of ``param`` (dotted, relative to the module) along ``dim`` is ``atoms[i]``."""
        tensor = _tensor(self.module, param)
        if tensor.shape[dim] != len(atoms):
            self.fail(f"{param} has {tensor.shape[dim]} entries along dim {dim}, {len(atoms)} atoms given")
        self.graph.add_member(Member(self.path, param, dim % tensor.ndim, tuple(atoms)))

    def out(self, atoms: Sequence[int], dim: int, index: int | None = None) -> Flow:
        """The Flow of the output (or of output element ``index``) carrying ``atoms`` along ``dim``."""
        value = self.value if index is None else self.value[index]
        shape = tuple(value.shape)
        dim = dim % len(shape)
        if shape[dim] != len(atoms):
            self.fail(f"output has {shape[dim]} channels along dim {dim}, {len(atoms)} atoms given")
        return Flow(shape, dim, tuple(atoms))

    def untracked(self, index: int | None = None) -> Any:
        """Flow(s) for an output (or output element ``index``) whose shape never changes."""
        return untracked_flow(self.value if index is None else self.value[index])

    def fail(self, message: str) -> None:
        """Raise :class:`GraphError` naming this module and its type."""
        raise GraphError(f"cannot prune through '{self.path}' ({type(self.module).__name__}): {message}")


class DependencyGraph:
    """The traced model: union-find over channel atoms plus member slices.

    Build with :func:`build_graph`. ``members`` lists every recorded slice;
    :meth:`unit_of` maps an atom to its unit (or ``None`` when frozen).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.uf = UnionFind()
        self.members: list[Member] = []
        self._by_key: dict[tuple[str, str, int], Member] = {}

    def add_member(self, member: Member) -> None:
        """Record a member; a layer called twice (shared weights) couples its two calls' channels."""
        key = (member.path, member.param, member.dim)
        if key in self._by_key:
            self.uf.unite(self._by_key[key].atoms, member.atoms)
            return
        self._by_key[key] = member
        self.members.append(member)

    def unit_of(self, atom: int) -> int | None:
        """The unit (class representative) of ``atom``, or ``None`` if its class is frozen."""
        return None if self.uf.frozen_reason(atom) is not None else self.uf.find(atom)

    def frozen_reasons(self) -> dict[str, str]:
        """``{"path.param[dim]": reason}`` for every member slice that is frozen (first reason per slice)."""
        out: dict[str, str] = {}
        for m in self.members:
            for atom in m.atoms:
                reason = self.uf.frozen_reason(atom)
                if reason is not None:
                    out.setdefault(f"{m.path}.{m.param}[{m.dim}]", reason)
                    break
        return out

    def module(self, path: str) -> nn.Module:
        """The module at ``path``."""
        return self.model.get_submodule(path)


def untracked_flow(value: Any) -> Any:
    """Flows (nested like ``value``) for values whose shape never changes."""
    return tree_map(lambda v: Flow(tuple(v.shape)) if isinstance(v, torch.Tensor) else Flow(None), value)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    tensor = getattr(module.get_submodule(owner) if owner else module, leaf, None)
    if not isinstance(tensor, torch.Tensor):
        raise GraphError(f"internal: {type(module).__name__} has no tensor {name!r}")
    return tensor


def flow_leaves(obj: Any) -> list[Flow]:
    """Every Flow inside a nested structure of args."""
    leaves, _ = tree_flatten(obj, is_leaf=lambda x: isinstance(x, Flow))
    return [x for x in leaves if isinstance(x, Flow)]


class _Tracer(fx.Tracer):
    def __init__(self, leaf: Callable[[nn.Module, str], bool]) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D102
        return self._leaf(m, qualname) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaf: Callable[[nn.Module, str], bool]) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` keeping the modules ``leaf(module, path)`` selects whole."""
    try:
        graph = _Tracer(leaf).trace(model)
    except Exception as exc:  # fx raises many types: report one, with the fix
        raise GraphError(f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
                         "Data-dependent control flow must sit inside a layer with a registered surgery "
                         "(prunekit.structural.register_surgery) or a module passed in ignore=") from None
    return fx.GraphModule(model, graph)


class _Runner(fx.Interpreter):
    """Runs the traced graph on the example input, turning each node into Flows."""

    def __init__(self, gm: fx.GraphModule, propagate: Callable[[fx.Node, Any, Any, Any], Any]) -> None:
        super().__init__(gm)
        self.flows: dict[fx.Node, Any] = {}
        self._propagate = propagate

    def run_node(self, n: fx.Node) -> Any:  # noqa: D102
        value = super().run_node(n)
        args = fx.node.map_arg(n.args, lambda a: self.flows[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.flows[a])
        self.flows[n] = self._propagate(n, value, args, kwargs)
        return value


def build_graph(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor],
                ignore: Iterable[str | type] | None = None) -> DependencyGraph:
    """Trace ``model`` on ``example_input`` and return its :class:`DependencyGraph`.

    Args:
        model: the model (not modified; run once in eval mode under ``no_grad``).
        example_input: a tensor or a tuple of tensors, as passed to ``model(...)``.
        ignore: module paths or types whose channels are never pruned; they are
            also traced as black boxes, so an unsupported layer can be listed here.

    Raises:
        GraphError: an op or layer the graph cannot follow (the message names
            the op, the module path and how to register a surgery).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> g = build_graph(net, torch.randn(1, 3, 8, 8))
        >>> sorted({m.path for m in g.members})
        ['0', '2']
    """
    from .propagate import Propagator

    if not isinstance(model, nn.Module):
        raise TypeError(f"build_graph: model must be an nn.Module, got {type(model).__name__}")
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("build_graph: example_input must be a tensor or a non-empty tuple of tensors")
    graph = DependencyGraph(model)
    propagator = Propagator(graph, ignore)
    gm = trace(model, propagator.is_leaf)
    runner = _Runner(gm, propagator)
    was_training = model.training
    model.eval()  # running statistics must not move
    try:
        with torch.no_grad():
            runner.run(*inputs)
    finally:
        model.train(was_training)
    return graph
