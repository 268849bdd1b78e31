"""YAML a user wrote, read so that no mistake passes silently and no small file makes unbounded work.

Safe tags only; a key given twice in one mapping is an error naming both lines (PyYAML keeps the last one
silently); the file is UTF-8 text (lorakit.text) of bounded size; aliases may not expand the document beyond MAX_NODES nodes
or MAX_DEPTH levels (an "alias bomb" of a few hundred bytes otherwise expands to billions of nodes).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lorakit import text

MAX_BYTES = 1 << 20  # recipes are a few KiB; a megabyte is a mistake (a data file given as the recipe)
MAX_NODES = 100_000  # nodes once every alias is expanded; a large recipe has a few hundred
MAX_DEPTH = 100  # nesting levels; a recipe has four


class YamlProblem(ValueError):
    """What is wrong and on which line (1-based; None when it is the whole file)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" merges a mapping in; its keys may be overridden here, as YAML intends
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if first is not None:
                lines = f"on line {line}" if first == line else f"on lines {first} and {line}"
                raise YamlProblem(f"key {key!r} is given twice, {lines} (the second would silently replace the "
                                  "first); keep one", line)
        return super().construct_mapping(node, deep)


def load(source: str) -> Any:
    """The YAML document in ``source``: safe, duplicate keys refused, expansion bounded (YamlProblem, or
    yaml.YAMLError for plain syntax errors)."""
    loader = _UniqueKeyLoader(source)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlProblem(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
        if node is None:
            return None
        nodes, depth = _expanded_size(node, {})
        if depth > MAX_DEPTH:
            raise YamlProblem(f"nested too deeply ({depth} levels, at most {MAX_DEPTH})")
        if nodes > MAX_NODES:
            raise YamlProblem(f"aliases (*name) expand it to {nodes:,} values, more than the {MAX_NODES:,} a "
                              "recipe may hold; write the values out or reuse fewer")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_file_bytes(data: bytes, what: str) -> Any:
    if len(data) > MAX_BYTES:
        raise YamlProblem(f"{what} is {len(data):,} bytes, more than a recipe can be ({MAX_BYTES:,}); is it the "
                          "right file?")
    return load(text.decode(data, what))


def _expanded_size(node: Node, memo: dict) -> tuple[int, int]:
    """(nodes, depth) of ``node`` with every alias expanded; shared nodes are counted once per use but computed
    once, so this costs the size of the file, not of the expansion."""
    key = id(node)
    if key in memo:
        if memo[key] is None:
            raise YamlProblem("an alias refers to the mapping or list that contains it (a loop)",
                              node.start_mark.line + 1)
        return memo[key]
    memo[key] = None
    if isinstance(node, ScalarNode):
        children: list[Node] = []
    elif isinstance(node, SequenceNode):
        children = node.value
    else:
        children = [n for pair in node.value for n in pair]
    sizes = [_expanded_size(child, memo) for child in children]
    result = (1 + sum(s for s, _ in sizes), 1 + max((d for _, d in sizes), default=0))
    memo[key] = result
    return result
