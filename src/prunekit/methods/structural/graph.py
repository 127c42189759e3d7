"""The dependency graph: run a model once, follow its channels, record who owns which slice.

:func:`~prunekit.methods.structural.trace.build_graph` runs the model's real forward on the example input under a
``TorchFunctionMode`` that sees every torch function and tensor method, with
forward hooks on every module: layers with a registered surgery (convolutions,
linear layers, norms, attention, LSTM, custom layers) and ignored modules run as
one opaque call, everything else is followed op by op. No symbolic tracing is
involved, so data-dependent Python control flow (transformers models, vision
backbones) is fine: the path the example input takes is the one recorded.

Each tensor gets a :class:`~prunekit.methods.structural.flow.Flow`; layer rules (see
:mod:`prunekit.methods.structural.layers`) and op rules (:mod:`prunekit.methods.structural.ops`)
create atoms, unite them and record *members*: ``(module path, parameter, dim,
one atom per index)``. Sizes read from a tracked dim (``x.shape[1]``,
``x.size(-1) // groups``) come back as :class:`DimInt`, so a reshape written
with them is known to follow pruning while a literal constant is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .flow import Flow, GraphError, UnionFind

__all__ = ["Member", "Context", "DependencyGraph", "DimInt", "call_model"]


@dataclass(frozen=True)
class Member:
    """Slice ownership: index ``i`` of ``param`` along ``dim`` in module ``path`` belongs to ``atoms[i]``."""

    path: str
    param: str
    dim: int
    atoms: tuple[int, ...]


class DimInt(int):
    """A size read from (or computed from) a tracked channel dim: it follows pruning.

    Example:
        >>> n = DimInt(12)
        >>> type(n // 3).__name__, n // 3
        ('DimInt', 4)
    """

    def __repr__(self) -> str:
        return int.__repr__(self)


def _derived(op: str) -> Callable[..., Any]:
    base = getattr(int, op)

    def method(self: int, *other: Any) -> Any:
        result = base(self, *other)
        return DimInt(result) if type(result) is int else result

    return method


for _op in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
            "__rfloordiv__", "__mod__", "__neg__", "__abs__"):
    setattr(DimInt, _op, _derived(_op))


class Context:
    """What a layer's coupling rule sees and may do (see :func:`~prunekit.methods.structural.register_surgery`).

    Attributes:
        path: the module's path in the model (``""`` for the model itself).
        module: the module.
        value: the module's real output on the example input.
    """

    def __init__(self, graph: "DependencyGraph", path: str, module: nn.Module, value: Any) -> None:
        self.graph, self.path, self.module, self.value = graph, path, module, value

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

    def depends(self, atoms: Sequence[int], reason: str, index: int | None = None) -> Flow:
        """An untracked output that freezes ``atoms`` as soon as anything reads it (or the model returns it)."""
        value = self.value if index is None else self.value[index]
        return Flow(tuple(value.shape), deps=(tuple(atoms), f"{self.path or '<model>'}: {reason}"))

    def fail(self, message: str) -> None:
        """Raise :class:`GraphError` naming this module and its type."""
        raise GraphError(f"cannot prune through '{self.path}' ({type(self.module).__name__}): {message}")


class DependencyGraph:
    """The recorded model: union-find over channel atoms plus member slices.

    Build with :func:`build_graph`. ``members`` lists every recorded slice;
    :meth:`unit_of` maps an atom to its unit (or ``None`` when frozen).
    ``size_attrs`` lists ``(module path, attribute, atoms)``: an int attribute
    the forward uses as a size, to be set to the number of kept atoms.
    ``surgeries`` maps module paths to surgeries found for this model only
    (RMS norms when ``hidden=True``); ``hidden`` tells whether hidden-size
    pruning through RMS norms was asked for.
    """

    def __init__(self, model: nn.Module, hidden: bool = False) -> None:
        self.model = model
        self.hidden = hidden
        self.uf = UnionFind()
        self.members: list[Member] = []
        self.size_attrs: list[tuple[str, str, tuple[int, ...]]] = []
        self.surgeries: dict[str, Any] = {}
        self._by_key: dict[tuple[str, str, int], Member] = {}
        self._by_tensor: dict[tuple[int, int], Member] = {}

    def add_member(self, member: Member) -> None:
        """Record a member; a layer called twice (shared weights) couples its two calls' channels.

        A tensor reached under two names (a token embedding tied to the output
        head) couples its slices too: one parameter is cut one way.
        """
        key = (member.path, member.param, member.dim)
        if key in self._by_key:
            self.uf.unite(self._by_key[key].atoms, member.atoms)
            return
        tensor = _tensor(self.module(member.path), member.param)
        same = self._by_tensor.setdefault((id(tensor), member.dim), member)
        if same is not member and len(same.atoms) == len(member.atoms):
            self.uf.unite(same.atoms, member.atoms)
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


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model(*example_input)``, or ``model(**example_input)`` for a mapping (e.g. tokenizer output)."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, torch.Tensor):
        return model(example_input)
    return model(*example_input)


def check_example_input(fn: str, example_input: Any) -> None:
    """A tensor, a non-empty tuple/list of tensors, or a mapping of keyword arguments."""
    if isinstance(example_input, torch.Tensor):
        return
    if isinstance(example_input, Mapping):
        if example_input and all(isinstance(k, str) for k in example_input):
            return
    elif isinstance(example_input, (tuple, list)) and example_input and all(
            isinstance(t, torch.Tensor) for t in example_input):
        return
    raise TypeError(f"{fn}: example_input must be a tensor, a non-empty tuple of tensors or a dict of "
                    "keyword arguments")
