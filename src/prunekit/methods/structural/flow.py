"""Channel atoms: the bookkeeping under the dependency graph.

Every channel of every traced tensor is an *atom* (an integer). Operations that
tie channels together (a residual addition, a depthwise convolution, a chunk)
unite atoms in a union-find; what can be removed as one piece is a class of
united atoms, a *unit*. A class that touches something that must keep its
size (the model's input or output, a LayerNorm's statistics, a constant shape
in the code) is *frozen* and never pruned.

A :class:`Flow` describes one traced value: its shape, and for a tensor whose
channels are tracked, the dimension that carries them and one atom per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Flow", "UnionFind", "GraphError"]


class GraphError(ValueError):
    """A model, or a part of it, that structural pruning cannot follow (names the op and module path)."""


@dataclass(frozen=True)
class Flow:
    """A traced value: ``shape`` (``None`` for non-tensors), tracked channel ``dim`` and ``atoms``.

    ``dim``/``atoms`` are ``None`` when no channel of the tensor is tracked: its
    shape never changes under pruning. ``source`` is ``(module path, name)`` when
    the tensor is a parameter or buffer of the model itself; ``deps`` is
    ``(atoms, reason)``: atoms to freeze as soon as this value is read (e.g.
    attention weights averaged over heads).
    """

    shape: tuple[int, ...] | None
    dim: int | None = None
    atoms: tuple[int, ...] | None = None
    source: tuple[str, str] | None = None
    deps: tuple[tuple[int, ...], str] | None = None

    @property
    def tracked(self) -> bool:
        """Whether this tensor's channels along :attr:`dim` are tracked."""
        return self.atoms is not None

    @property
    def is_tensor(self) -> bool:
        """Whether this value is a tensor."""
        return self.shape is not None


class UnionFind:
    """Atoms, their classes, and the reasons a class is frozen.

    Example:
        >>> uf = UnionFind()
        >>> a, b = uf.new(2), uf.new(2)
        >>> uf.unite(a, b)
        >>> uf.find(a[0]) == uf.find(b[0]), uf.find(a[0]) == uf.find(a[1])
        (True, False)
    """

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._frozen: dict[int, str] = {}
        self._more: dict[int, list[str]] = {}  # every other reason a class was frozen for, in order

    def new(self, n: int) -> tuple[int, ...]:
        """``n`` fresh atoms, each in its own class."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        return tuple(range(start, start + n))

    def find(self, atom: int) -> int:
        """The representative of ``atom``'s class."""
        parent = self._parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:  # path compression
            parent[atom], atom = root, parent[atom]
        return root

    def unite(self, left: Sequence[int], right: Sequence[int]) -> None:
        """Unite ``left[i]`` with ``right[i]`` for every ``i`` (equal lengths)."""
        if len(left) != len(right):
            raise GraphError(f"internal: cannot couple {len(left)} channels with {len(right)}")
        for a, b in zip(left, right):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self._parent[rb] = ra
                if rb in self._frozen:
                    self._note(ra, self._frozen.pop(rb))
                    for reason in self._more.pop(rb, ()):
                        self._note(ra, reason)

    def unite_all(self, atoms: Sequence[int]) -> None:
        """Put every atom of ``atoms`` in one class."""
        if atoms:
            self.unite([atoms[0]] * (len(atoms) - 1), atoms[1:])

    def freeze(self, atoms: Sequence[int], reason: str) -> None:
        """Mark the classes of ``atoms`` as never pruned, keeping the first reason given."""
        for atom in atoms:
            self._note(self.find(atom), reason)

    def _note(self, root: int, reason: str) -> None:
        first = self._frozen.setdefault(root, reason)
        more = self._more.setdefault(root, [])
        if reason != first and reason not in more and len(more) < 16:
            more.append(reason)

    def frozen_reason(self, atom: int) -> str | None:
        """Why ``atom``'s class is frozen, or ``None`` if it may be pruned."""
        return self._frozen.get(self.find(atom))

    def all_reasons(self, atom: int) -> list[str]:
        """Every reason ``atom``'s class was frozen for (the first first; at most 17)."""
        root = self.find(atom)
        return [self._frozen[root], *self._more.get(root, ())] if root in self._frozen else []
