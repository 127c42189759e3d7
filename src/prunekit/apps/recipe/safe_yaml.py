"""The one YAML loader used for recipes: safe tags only, and bounded in size, depth and aliases.

``yaml.safe_load`` never constructs Python objects, but it still accepts three
things a recipe must not be: a document whose aliases expand to billions of
nodes ("billion laughs": a 1 KB file that hangs whatever walks the result), one
nested deeper than Python's recursion limit (a traceback), and a mapping with a
key given twice (the last one silently wins). :class:`RecipeLoader` refuses all
three while composing, before anything is constructed, with a one-line
:class:`RecipeYAMLError` that gives the line and column.

Bounds (recipes are a few dozen lines; these are orders of magnitude above that):

* :data:`MAX_RECIPE_BYTES`: the size of the file (checked before it is read).
* :data:`MAX_NODES`: scalars + sequences + mappings of the document *with every
  alias expanded*, counted as if each alias were a copy of its anchor's node.
* :data:`MAX_INT_CHARS`: the length of an integer scalar (YAML 1.1's base-60
  integers such as ``1:2:3`` cost time quadratic in their length to convert).
* :data:`MAX_DEPTH`: levels of the node tree, also with aliases expanded (the
  top-level mapping is level 1, its keys and values level 2). An alias inside the node it names (a
  recursive structure) is refused too.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = ["MAX_RECIPE_BYTES", "MAX_NODES", "MAX_DEPTH", "MAX_INT_CHARS", "RecipeYAMLError", "RecipeLoader",
           "load_yaml", "describe_yaml_error"]

MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 32
MAX_INT_CHARS = 64


class RecipeYAMLError(yaml.YAMLError):
    """A YAML document beyond the recipe loader's bounds, or with a duplicate key (one line, with its position)."""


def _where(node_or_mark: Any) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return f"line {mark.line + 1}, column {mark.column + 1}"


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that bounds expanded size and depth and rejects duplicate mapping keys.

    Each composed node gets its expanded size and height, computed from its
    children's (an alias counts as its anchor's whole node), so the cost is
    linear in the text, however the aliases multiply.

    Example:
        >>> yaml.load("a: &x [1, 2]\\nb: *x", Loader=RecipeLoader)
        {'a': [1, 2], 'b': [1, 2]}
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        # id(node) -> (expanded size, expanded height); every node stays alive (in its parent) while composing.
        self._measured: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # noqa: D102 (yaml's hook)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._measured:
                raise RecipeYAMLError(f"alias *{event.anchor} at {_where(event)} is inside the node it names "
                                      "(a recursive structure); recipes must be trees")
            node = super().compose_node(parent, index)  # the anchor's node (or yaml's undefined-alias error)
            self._check_depth(self._depth + self._measured[id(node)][1], event)
            return node
        self._check_depth(self._depth + 1, self.peek_event())
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._measure(node)
        return node

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:  # noqa: D102 (yaml's hook)
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], Node] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode):
                continue  # complex keys are never valid recipe keys; validation names them
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                raise RecipeYAMLError(f"duplicate key {key.value!r} at {_where(key)} (first at {_where(first)}); "
                                      "give each key once")
        return node

    def _measure(self, node: Node) -> None:
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        stats = [self._measured[id(c)] for c in children]
        size = 1 + sum(s for s, _ in stats)
        height = 1 + max((h for _, h in stats), default=0) if children else 1
        if size > MAX_NODES:
            raise RecipeYAMLError(f"the node at {_where(node)} expands to {size:,} nodes (aliases counted as copies); "
                                  f"recipes are limited to {MAX_NODES:,}")
        self._measured[id(node)] = (size, height)

    def construct_yaml_int(self, node: ScalarNode) -> int:  # noqa: D102 (yaml's hook)
        if len(node.value) > MAX_INT_CHARS:
            raise RecipeYAMLError(f"an integer of {len(node.value):,} characters at {_where(node)}; "
                                  f"recipes allow at most {MAX_INT_CHARS}")
        return super().construct_yaml_int(node)

    def _check_depth(self, depth: int, event: Any) -> None:
        if depth > MAX_DEPTH:
            raise RecipeYAMLError(f"nesting deeper than {MAX_DEPTH} levels at {_where(event)} "
                                  "(aliases counted as copies); flatten the recipe")


RecipeLoader.add_constructor("tag:yaml.org,2002:int", RecipeLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """Parse one YAML document with :class:`RecipeLoader`.

    Raises:
        yaml.YAMLError: invalid YAML (:class:`RecipeYAMLError` for the loader's own checks).

    Example:
        >>> load_yaml("a: 1\\na: 2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        prunekit.apps.recipe.safe_yaml.RecipeYAMLError: duplicate key 'a' at line 2, column 1 (first at line 1, ...
    """
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: the problem and where (yaml's own messages span several lines).

    Example:
        >>> try:
        ...     load_yaml("a: [1")
        ... except yaml.YAMLError as exc:
        ...     print(describe_yaml_error(exc))
        expected ',' or ']', but got '<stream end>' at line 1, column 6 (while parsing a flow sequence)
    """
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = f" at {_where(exc.problem_mark)}" if exc.problem_mark is not None else ""
        context = f" ({exc.context})" if exc.context else ""
        return f"{exc.problem}{where}{context}"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
