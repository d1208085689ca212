"""A radix tree over token sequences: where stored sequences end and where checkpoints sit.

Pure Python, no MLX: the pool keeps opaque values in it. A checkpoint at depth d
depends only on the first d tokens, so it lives on the tree path, not on one
sequence, and every sequence sharing that prefix can restore from it.

Each node covers the tokens of the edge from its parent, i.e. depths
(parent.depth, depth]; checkpoints attached to a node have depths in that range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

_BLOCK = 64  # compare tokens this many at a time (C speed) before scanning one by one


def common_prefix_length(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the common prefix of a and b, assuming a[:start] == b[:start]."""
    limit = min(len(a), len(b))
    i = start
    while i + _BLOCK <= limit and a[i : i + _BLOCK] == b[i : i + _BLOCK]:
        i += _BLOCK
    while i < limit and a[i] == b[i]:
        i += 1
    return i


class Node:
    __slots__ = ("parent", "edge", "depth", "children", "checkpoints", "entries", "entry_count", "marks", "namespace")

    def __init__(self, parent: Node | None, edge: list[int], depth: int, namespace: str = ""):
        self.parent = parent
        self.edge = edge
        self.depth = depth
        self.namespace = namespace  # the cache namespace of every path through this node ("" below the root: shared)
        self.children: dict[Any, Node] = {}  # first token of the child's edge (under the root: with its namespace)
        self.checkpoints: dict[int, Any] = {}  # depth -> value
        self.entries: set[Any] = set()  # keys of stored sequences ending at self.depth
        self.entry_count = 0  # entries here and below: kept up to date, so no query walks a subtree
        self.marks: dict[Any, int] = {}  # key -> depth of a position a stored sequence marks in this node's range

    @property
    def start(self) -> int:
        return self.depth - len(self.edge)

    def __repr__(self) -> str:
        return f"Node({self.start}..{self.depth}, children={len(self.children)}, entries={len(self.entries)})"


@dataclass
class Match:
    """How far a token sequence follows the tree."""

    length: int  # tokens matched
    path: list[Node] = field(default_factory=list)  # nodes entered, root excluded; the last may be partial

    def checkpoints(self, max_depth: int) -> Iterator[tuple[int, Any]]:
        """(depth, value) of checkpoints on the matched path at depth <= max_depth, deepest first."""
        limit = min(max_depth, self.length)
        for node in reversed(self.path):
            if node.start >= limit:
                continue
            for depth in sorted(node.checkpoints, reverse=True):
                if depth <= limit:
                    yield depth, node.checkpoints[depth]

    def node_at(self, depth: int) -> Node | None:
        """The path node covering `depth` (0 < depth <= length)."""
        for node in self.path:
            if node.start < depth <= node.depth:
                return node
        return None

    def branch_depth(self, node: Node) -> int:
        """How many tokens a sequence stored under `node` shares with the matched sequence."""
        on_path = set(map(id, self.path))
        while node is not None and id(node) not in on_path:
            node = node.parent
        if node is None:
            return 0
        return min(node.depth, self.length)


class TokenTrie:
    """Token paths, in namespaces: the root's children are keyed by (namespace, first token), so paths
    of different namespaces never share a node, while every depth is still a token position.
    The default namespace "" keys by the token alone."""

    def __init__(self) -> None:
        self.root = Node(None, [], 0)

    def _key(self, parent: Node, token: int, namespace: str) -> Any:
        return (namespace, token) if namespace and parent is self.root else token

    def _child_key(self, node: Node) -> Any:
        return self._key(node.parent, node.edge[0], node.namespace)

    # ------------------------------------------------------------- lookup

    def match(self, tokens: list[int], namespace: str = "") -> Match:
        node, pos, path = self.root, 0, []
        while pos < len(tokens):
            child = node.children.get(self._key(node, tokens[pos], namespace))
            if child is None:
                break
            path.append(child)
            end = common_prefix_length(child.edge, tokens[pos : pos + len(child.edge)])
            pos += end
            if end < len(child.edge):
                break
            node = child
        return Match(pos, path)

    # ------------------------------------------------------------- insertion

    def insert(self, tokens: list[int], namespace: str = "") -> Node:
        """Make the path for `tokens` exist; return the node ending exactly at len(tokens)."""
        node, pos = self.root, 0
        while pos < len(tokens):
            key = self._key(node, tokens[pos], namespace)
            child = node.children.get(key)
            if child is None:
                leaf = Node(node, list(tokens[pos:]), len(tokens), namespace)
                node.children[key] = leaf
                return leaf
            end = common_prefix_length(child.edge, tokens[pos : pos + len(child.edge)])
            if end < len(child.edge):
                child = self._split(child, child.start + end)
            pos += end
            node = child
        return node

    def _split(self, node: Node, depth: int) -> Node:
        """Split `node` so that a new node ends at `depth`; return that upper node."""
        cut = depth - node.start
        upper = Node(node.parent, node.edge[:cut], depth, node.namespace)
        upper.entry_count = node.entry_count
        node.parent.children[self._child_key(upper)] = upper
        node.edge = node.edge[cut:]
        node.parent = upper
        upper.children[node.edge[0]] = node
        for d in [d for d in node.checkpoints if d <= depth]:
            value = upper.checkpoints[d] = node.checkpoints.pop(d)
            if hasattr(value, "node"):
                value.node = upper  # values that know their node are told where they now live
        for key in [k for k, d in node.marks.items() if d <= depth]:
            upper.marks[key] = node.marks.pop(key)
        return upper

    def node_covering(self, node: Node, depth: int) -> Node:
        """The node on the path to `node` whose range holds `depth` (0 < depth <= node.depth)."""
        while node.parent is not None and node.start >= depth:
            node = node.parent
        return node

    def node_ending_at(self, match: Match, depth: int) -> Node:
        """The node ending exactly at `depth` on a (still current) match's path, splitting if needed."""
        if depth == 0:
            return self.root
        node = match.node_at(depth)
        return node if node.depth == depth else self._split(node, depth)

    def attach_entry(self, tokens: list[int], key: Any, namespace: str = "") -> Node:
        node = self.insert(tokens, namespace)
        self.attach_entry_at(node, key)
        return node

    def attach_entry_at(self, node: Node, key: Any) -> None:
        if key in node.entries:
            return
        node.entries.add(key)
        self._count(node, +1)

    def _count(self, node: Node | None, delta: int) -> None:
        while node is not None:
            node.entry_count += delta
            node = node.parent

    def add_checkpoint(self, tokens: list[int], depth: int, value: Any, namespace: str = "") -> Node:
        """Attach a checkpoint at `depth` on the path of `tokens` (which must exist up to depth)."""
        node = self.insert(tokens[:depth], namespace)
        node.checkpoints[depth] = value
        return node

    # ------------------------------------------------------------- removal

    def detach_entry(self, node: Node, key: Any) -> list[Any]:
        """Remove an entry; prune nodes no entry needs any more. Returns the dropped checkpoint values."""
        if key in node.entries:
            node.entries.discard(key)
            self._count(node, -1)
        return self.prune(node)

    def prune(self, node: Node) -> list[Any]:
        dropped: list[Any] = []
        while node is not self.root and not node.entries and not node.children:
            dropped.extend(node.checkpoints.values())
            parent = node.parent
            del parent.children[self._child_key(node)]
            node.parent = None
            node = parent
        return dropped

    def remove_checkpoint(self, node: Node, depth: int) -> Any:
        return node.checkpoints.pop(depth)

    # ------------------------------------------------------------- queries

    def entries_under(self, node: Node) -> Iterator[tuple[Node, Any]]:
        stack = [node]
        while stack:
            n = stack.pop()
            for key in n.entries:
                yield n, key
            stack.extend(n.children.values())

    def entry_count_under(self, node: Node) -> int:
        return node.entry_count

    def nodes(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def path_to(self, node: Node) -> list[Node]:
        path = []
        while node is not None and node is not self.root:
            path.append(node)
            node = node.parent
        return path[::-1]
