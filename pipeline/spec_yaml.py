"""The YAML reader of spec files and `--set` values: PyYAML's safe loader, bounded.

A spec is a few hundred YAML nodes. What the reader refuses, each as one `SpecYAMLError` line:
- aliases that expand past `MAX_YAML_NODES` (a billion-laughs file is a few hundred bytes, and
  every copy of the document would expand it): each node's expanded size is counted while the
  document is composed, an alias adding its anchor's size without copying anything;
- an alias inside its own anchor (a recursive document), and nesting deeper than `MAX_YAML_DEPTH`;
- a key given twice in one mapping (PyYAML keeps the last silently), naming the key and both lines;
- a scalar its tag cannot be read as (`2001-02-30`, `!!int x`): PyYAML raises bare ValueErrors there.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from exitflow.stages.core.allowed import MAX_YAML_DEPTH, MAX_YAML_NODES

MERGE_TAG = "tag:yaml.org,2002:merge"


class SpecYAMLError(ValueError):
    """YAML a spec cannot be read from; `str()` is one line, with the line and column. `malformed`:
    not YAML at all (else YAML this reader refuses: see the module)."""

    def __init__(self, reason: str, malformed: bool) -> None:
        super().__init__(reason)
        self.malformed = malformed


class _Refused(ConstructorError):
    """Valid YAML that a spec may not hold (raised while composing or constructing)."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures what it composes and refuses duplicate keys (see the module)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its node count with every alias expanded
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)  # the anchored node itself, not a copy
            if id(node) not in self._sizes:  # still being composed: the alias lies inside its anchor
                raise _Refused(None, None, f"alias *{event.anchor} lies inside its own anchor: a spec cannot "
                               "refer to itself", event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in _children(node))
        if self._sizes[id(node)] > MAX_YAML_NODES:
            raise _Refused(None, None, f"more than {MAX_YAML_NODES} values once aliases are expanded (a spec "
                           "holds a few hundred; an alias bomb, billions)", node.start_mark)
        return node

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            _refuse_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError) as e:  # PyYAML's scalar constructors
            value = node.value if isinstance(node, ScalarNode) else node.id
            raise ConstructorError(None, None, f"cannot read {value!r} as {node.tag.rsplit(':', 1)[-1]}: {e}",
                                   node.start_mark) from None


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _refuse_duplicate_keys(loader: _BoundedLoader, node: MappingNode) -> None:
    """A key written twice in `node` (before `<<` merges, whose keys a mapping may override)."""
    seen: dict[Any, int] = {}  # key -> the line it was first written on
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML's own error says so
            continue
        if first is not None:
            raise _Refused(None, None, f"duplicate key {key!r} (first at line {first + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line


def load_yaml(text: str) -> Any:
    """`text` as plain Python values (PyYAML's safe types), within the bounds above."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses unprintable characters
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise SpecYAMLError(one_line(e), malformed=not isinstance(e, _Refused)) from None
    except RecursionError:  # below MAX_YAML_DEPTH only on a tiny stack: say the same
        raise SpecYAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep", malformed=False) from None
    finally:
        if loader is not None:
            loader.dispose()


def one_line(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: `problem at line L, column C` (after its context, if any)."""
    if isinstance(e, yaml.reader.ReaderError):
        c = e.character
        return f"character {f'#x{c:04x}' if isinstance(c, int) else repr(c)} at position {e.position}: {e.reason}"
    if not isinstance(e, yaml.MarkedYAMLError):
        return " ".join(str(e).split())
    parts = [f"{text}{_at(mark)}" for text, mark in ((e.context, e.context_mark), (e.problem, e.problem_mark)) if text]
    if e.note:
        parts.append(e.note)
    return " ".join(": ".join(parts).split())


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
