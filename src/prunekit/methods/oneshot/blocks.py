"""Blocks: find a model's repeated blocks, and feed each block exactly what the pruned model feeds it.

Finding them (:func:`find_blocks`) is structural: a ``ModuleList`` (or a
``Sequential`` of two or more) whose children are all of one type, each a
composite module holding prunable layers, and not nested inside another such
list. GPT-2's ``transformer.h``, Llama/Qwen2/Mistral/Phi/Gemma's ``model.layers``,
OPT's ``model.decoder.layers``, BERT/ViT's ``encoder.layer``, T5's
``encoder.block`` and ``decoder.block``, the stages of a CNN.

Feeding them (:class:`BlockFeeder`): one traced forward per sample (cache
disabled) records every block's inputs and outputs. Each input leaf of block
``p`` (a tensor, or anything else inside its args/kwargs) is then explained by
object identity: an output of block ``p-1`` (the hidden states; T5's position
bias), an input of an earlier block (masks, rotary ``position_embeddings``,
position ids, the encoder's output for every decoder block), or a plain constant.
A block with an input explained by none of these (the first block of a list
after another list: a decoder's embeddings, or anything computed between two
blocks) and the very first block get their inputs from a fresh forward of the
whole (partly pruned) model, stopped at that block. Every other block is re-run
on inputs rebuilt from those sources, with the pruned previous block. KV-cache
objects are replaced by ``None``. The result: block ``p`` is calibrated on what
the final pruned model feeds it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import call_model
from .layers import layer_kind

__all__ = ["BlockFeeder", "find_blocks", "resolve_blocks"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum, slice,
          type(Ellipsis))


def _solvable(module: nn.Module) -> bool:
    return layer_kind(module) not in (None, "unsupported")


def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children())
    if isinstance(module, nn.Sequential):
        if len(children) < 2:
            return False
    elif not isinstance(module, nn.ModuleList) or not children:
        return False
    if len({type(c) for c in children}) != 1:
        return False
    # blocks are composites (attention + MLP, a residual unit); a list of bare layers (heads) is not
    return all(not _solvable(c) and any(_solvable(m) for m in c.modules()) for c in children)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's block lists (outermost first-found), found by structure; ``[]`` if none.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2))
        >>> [name for name, _ in find_blocks(Net())]
        ['layers']
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            continue  # nested inside a block list already found (MoE experts, sub-layers)
        if _is_block_list(module):
            found.append((name, module))
    return found


def resolve_blocks(model: nn.Module, blocks: Any) -> list[tuple[str, nn.Module]] | None:
    """The blocks to process, as ``[(name, module)]``; ``None`` for one pass (``blocks=False``).

    ``blocks``: ``None`` (find them), ``False``, the name of a ``ModuleList``/``Sequential``
    (its children), or a list of module names / modules (a ``ModuleList`` entry
    stands for its children).

    Raises:
        ValueError / TypeError: nothing found, or a bad ``blocks`` value.
    """
    if blocks is False:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    if blocks is None:
        lists = find_blocks(model)
        if not lists:
            raise ValueError(
                f"prune_oneshot: found no repeated blocks in {type(model).__name__} (a ModuleList of same-type "
                "modules holding Linear/Conv layers); pass blocks=[names or modules of the blocks] (in the order "
                "the forward runs them), blocks='<name of a ModuleList>', or blocks=False to calibrate every "
                "layer in one pass on the dense model's inputs")
        return [(f"{n}.{i}" if n else str(i), c) for n, lst in lists for i, c in enumerate(lst.children())]
    if isinstance(blocks, str):
        found = _get(model, blocks)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(f"prune_oneshot: blocks={blocks!r} must name a non-empty ModuleList or Sequential, "
                             f"got {type(found).__name__}")
        return [(f"{blocks}.{i}", c) for i, c in enumerate(found.children())]
    if not isinstance(blocks, Sequence) or not blocks:
        raise TypeError(f"prune_oneshot: blocks must be None, False, a module name or a non-empty list of module "
                        f"names/modules, got {blocks!r}")
    out: list[tuple[str, nn.Module]] = []
    for entry in blocks:
        module = _get(model, entry) if isinstance(entry, str) else entry
        if not isinstance(module, nn.Module) or id(module) not in names:
            raise ValueError(f"prune_oneshot: blocks entry {entry!r} is not a submodule of the model")
        name = names[id(module)]
        if isinstance(module, nn.ModuleList):
            out += [(f"{name}.{i}", c) for i, c in enumerate(module.children())]
        else:
            out.append((name, module))
    _check_disjoint(out)
    return out


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"prune_oneshot: blocks={name!r} is not a submodule of the model") from None


def _check_disjoint(blocks: list[tuple[str, nn.Module]]) -> None:
    inside: dict[int, str] = {}
    for name, block in blocks:
        for m in block.modules():
            if id(m) in inside:
                raise ValueError(f"prune_oneshot: blocks '{inside[id(m)]}' and '{name}' overlap; pass disjoint blocks")
            inside[id(m)] = name


# -- flattening of block inputs and outputs -------------------------------------------------------------


def _is_cache(x: Any) -> bool:
    """A KV cache object (transformers ``Cache`` or look-alike): never reused across calibration calls."""
    return any(c.__name__.endswith("Cache") for c in type(x).__mro__[:-1]) and not isinstance(x, torch.Tensor)


def flatten(x: Any, leaves: list[Any]) -> Any:
    """Append ``x``'s leaves to ``leaves``; return a spec (nested tuples) that :func:`rebuild` inverts."""
    if isinstance(x, torch.Tensor) or _is_cache(x):
        leaves.append(None if _is_cache(x) else x)
        return "."
    if isinstance(x, Mapping):
        keys = list(x.keys())
        return ("map", type(x), tuple(keys), tuple(flatten(x[k], leaves) for k in keys))
    if isinstance(x, (tuple, list)):
        return ("seq", type(x), tuple(flatten(v, leaves) for v in x))
    leaves.append(x)
    return "."


def rebuild(spec: Any, leaves: Any) -> Any:
    """The structure of ``spec`` filled from the iterator ``leaves``."""
    if spec == ".":
        return next(leaves)
    kind, cls, *rest = spec
    if kind == "map":
        keys, subs = rest
        items = {k: rebuild(s, leaves) for k, s in zip(keys, subs)}
        return items if cls is dict else _construct(cls, items)
    values = [rebuild(s, leaves) for s in rest[0]]
    if cls in (tuple, list):
        return cls(values)
    return cls(*values) if hasattr(cls, "_fields") else cls(values)


def _construct(cls: type, items: dict[str, Any]) -> Any:
    try:
        return cls(**items)
    except TypeError:
        return dict(items)


# -- plans ------------------------------------------------------------------------------------------------

FULL = None  # a block whose inputs come from a forward of the whole model


@dataclass
class _Trace:
    order: list[int] = field(default_factory=list)            # block indices in call order
    inputs: dict[int, tuple[Any, list[Any]]] = field(default_factory=dict)  # spec, leaves
    outputs: dict[int, list[Any]] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass at the block it waits for."""


def _trace(model: nn.Module, blocks: list[nn.Module], sample: Any) -> _Trace:
    trace, handles = _Trace(), []

    def pre(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            trace.calls[index] = trace.calls.get(index, 0) + 1
            if trace.calls[index] == 1:
                trace.order.append(index)
                leaves: list[Any] = []
                trace.inputs[index] = (flatten((tuple(args), dict(kwargs)), leaves), leaves)
        return hook

    def post(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if trace.calls[index] == 1:
                leaves: list[Any] = []
                flatten(output, leaves)
                trace.outputs[index] = leaves
        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(block.register_forward_hook(post(i)))
        call_model(model, sample)
    finally:
        for h in handles:
            h.remove()
    return trace


def _plan(trace: _Trace, position: int) -> tuple[Any, tuple[Any, ...]] | None:
    """``(spec, sources)`` for the block at ``position`` in call order, or ``FULL``.

    Sources: ``("out", idx)`` (an output leaf of the previous block), ``("in", q, idx)``
    (an input leaf of the block at position ``q``), ``("const", value)``.
    """
    if position == 0:
        return FULL
    order = trace.order
    known: dict[int, tuple[Any, ...]] = {}
    for q in range(position):  # later positions override: the most recent source wins
        for idx, leaf in enumerate(trace.inputs[order[q]][1]):
            if leaf is not None and not isinstance(leaf, _PLAIN):
                known[id(leaf)] = ("in", q, idx)
    for idx, leaf in enumerate(trace.outputs.get(order[position - 1], [])):
        if leaf is not None and not isinstance(leaf, _PLAIN):
            known[id(leaf)] = ("out", idx)
    spec, leaves = trace.inputs[order[position]]
    sources = []
    for leaf in leaves:
        if isinstance(leaf, _PLAIN):
            sources.append(("const", leaf))
        elif id(leaf) in known:
            sources.append(known[id(leaf)])
        else:
            return FULL
    return spec, tuple(sources)


def _same_plan(a: Any, b: Any) -> bool:
    if a is FULL or b is FULL:
        return a is b
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


Inputs = tuple[tuple[Any, ...], dict[str, Any]]


class BlockFeeder:
    """Runs blocks in the model's call order, each on what the partly pruned model feeds it.

    Args:
        model: the model (its earlier blocks are pruned while :meth:`run` goes on).
        blocks: ``[(name, module)]`` from :func:`resolve_blocks`, any order.
        samples: calibration inputs, as :func:`~prunekit.methods.oneshot.calibration.call_model` takes them.

    Raises:
        ValueError: a block the forward never calls or calls twice (shared weights).

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4)))
        >>> feeder = BlockFeeder(net, [("1", net[1]), ("0", net[0])], [torch.randn(2, 4)])
        >>> [name for name, _ in feeder.order], feeder.full_captures
        (['0', '1'], [0])
    """

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], samples: list[Any]) -> None:
        self.model, self.samples = model, samples
        modules = [m for _, m in blocks]
        plans: list[Any] | None = None
        order: list[int] | None = None
        self._first: list[Inputs] = []
        with torch.no_grad():
            for sample in samples:
                trace = _trace(model, modules, sample)
                self._check_calls(trace, blocks)
                if order is None:
                    order = trace.order
                elif trace.order != order:
                    raise ValueError("prune_oneshot: the blocks run in a different order for different calibration "
                                     "samples; pass blocks= in one fixed order")
                mine = [_plan(trace, p) for p in range(len(order))]
                plans = mine if plans is None else [a if _same_plan(a, b) else FULL for a, b in zip(plans, mine)]
                spec, leaves = trace.inputs[order[0]]
                self._first.append(rebuild(spec, iter(leaves)))
                del trace
        self.order = [blocks[i] for i in order]
        self.plans = plans
        self.full_captures = [p for p, plan in enumerate(plans) if plan is FULL]
        self._last_use = self._references()

    @staticmethod
    def _check_calls(trace: _Trace, blocks: list[tuple[str, nn.Module]]) -> None:
        never = [blocks[i][0] for i in range(len(blocks)) if i not in trace.calls]
        if never:
            raise ValueError(f"prune_oneshot: the calibration forward never runs block(s) {', '.join(never)}; give "
                             "samples that run them (an encoder-decoder needs decoder inputs too) or pass blocks= "
                             "with only the blocks that run")
        twice = [blocks[i][0] for i, n in trace.calls.items() if n > 1]
        if twice:
            raise ValueError(f"prune_oneshot: block(s) {', '.join(twice)} run more than once per forward (shared "
                             "weights); one-shot cannot calibrate them per call; pass blocks=False")

    def _references(self) -> dict[tuple[Any, ...], int]:
        """``{stored value key: last position that reads it}``."""
        last: dict[tuple[Any, ...], int] = {}
        for p, plan in enumerate(self.plans):
            if plan is FULL:
                continue
            for src in plan[1]:
                if src[0] == "in":
                    last[("in", src[1], src[2])] = p
                elif src[0] == "out":
                    last[("out", p - 1, src[1])] = p
        return last

    def _capture(self, position: int) -> list[Inputs]:
        """Inputs of the block at ``position`` from forwards of the whole model, stopped at that block."""
        if position == 0:
            return self._first
        captured: list[Inputs] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            leaves: list[Any] = []
            spec = flatten((tuple(args), dict(kwargs)), leaves)  # caches become None
            captured.append(rebuild(spec, iter(leaves)))
            raise _Stop

        handle = self.order[position][1].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for sample in self.samples:
                try:
                    call_model(self.model, sample)
                except _Stop:
                    continue
                raise ValueError(f"prune_oneshot: a calibration forward did not reach block {self.order[position][0]}")
        finally:
            handle.remove()
        return captured

    def _assemble(self, position: int, values: list[dict[tuple[Any, ...], Any]]) -> list[Inputs]:
        spec, sources = self.plans[position]
        out = []
        for store in values:
            leaves = [src[1] if src[0] == "const" else
                      store[("in", src[1], src[2])] if src[0] == "in" else store[("out", position - 1, src[1])]
                      for src in sources]
            out.append(rebuild(spec, iter(leaves)))
        return out

    @torch.no_grad()
    def run(self, process: Callable[[int, str, nn.Module, list[Inputs]], None]) -> None:
        """For each block in call order: ``process(position, name, block, inputs)`` (it prunes the block), then
        run the pruned block on the same inputs where a later block reads its outputs."""
        values: list[dict[tuple[Any, ...], Any]] = [{} for _ in self.samples]
        wanted = self._last_use
        for p, (name, block) in enumerate(self.order):
            inputs = self._capture(p) if self.plans[p] is FULL else self._assemble(p, values)
            for store, (args, kwargs) in zip(values, inputs):
                leaves: list[Any] = []
                flatten((args, kwargs), leaves)
                store.update({("in", p, i): v for i, v in enumerate(leaves) if ("in", p, i) in wanted})
            process(p, name, block, inputs)
            if any(key[0] == "out" and key[1] == p for key in wanted):
                for store, (args, kwargs) in zip(values, inputs):
                    leaves = []
                    flatten(block(*args, **kwargs), leaves)
                    store.update({("out", p, i): v for i, v in enumerate(leaves) if ("out", p, i) in wanted})
            for store in values:  # forget what no later block reads
                for key in [k for k in store if wanted[k] <= p]:
                    del store[key]
