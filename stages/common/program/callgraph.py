"""The program's typed graph as arrays (docs/behaviour.md §1): nodes file:/mod:/sym:, edges defines|imports|calls|tests.

A big tree has ~500 k call-site edges: as a networkx multigraph that costs seconds to build and hundreds of MB to
hold, and most stages only count edges. So the index keeps this compact form (node table + int32 edge arrays,
saved with the index without pickling) and builds the networkx graph only when a stage asks for graph
algorithms (``to_networkx``, once per index, same nodes, attributes and edge order as before).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

KINDS = ("file", "module", "symbol")
EDGE_TYPES = ("defines", "imports", "calls", "tests")


class GraphBuilder:
    """Collects nodes (first insertion fixes the order, a later one updates the attributes, as networkx does) and
    edges in insertion order."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.kinds: list[int] = []
        self.paths: list[str] = []
        self.src: list[int] = []
        self.dst: list[int] = []
        self.types: list[int] = []

    def node(self, node_id: str, kind: str, path: str) -> int:
        at = self.ids.get(node_id)
        if at is None:
            at = self.ids[node_id] = len(self.kinds)
            self.kinds.append(KINDS.index(kind))
            self.paths.append(path)
        else:
            self.kinds[at], self.paths[at] = KINDS.index(kind), path
        return at

    def edge(self, src: str, dst: str, edge_type: str) -> None:
        self.src.append(self.ids[src])
        self.dst.append(self.ids[dst])
        self.types.append(EDGE_TYPES.index(edge_type))

    def build(self) -> CallGraph:
        return CallGraph(list(self.ids), np.asarray(self.kinds, np.int8), self.paths,
                         np.asarray(self.src, np.int32), np.asarray(self.dst, np.int32), np.asarray(self.types, np.int8))


class CallGraph:
    """Nodes by position (``ids``, ``kinds``, ``paths``) and edges as parallel arrays ``src``, ``dst``, ``types``."""

    def __init__(self, ids: list[str], kinds: np.ndarray, paths: list[str], src: np.ndarray, dst: np.ndarray,
                 types: np.ndarray):
        self.ids, self.kinds, self.paths = ids, kinds, paths
        self.src, self.dst, self.types = src, dst, types
        self._position: dict[str, int] | None = None
        self._degrees: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        self._nx: Any = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])

    def position(self, node_id: str) -> int | None:
        if self._position is None:
            self._position = {node: i for i, node in enumerate(self.ids)}
        return self._position.get(node_id)

    def count(self, edge_type: str) -> int:
        return int(np.count_nonzero(self.types == EDGE_TYPES.index(edge_type)))

    def degrees(self, direction: str, types: tuple[str, ...]) -> np.ndarray:
        """Per node, the number of its in- (``direction='in'``) or out-edges of the given types."""
        key = (direction, types)
        if key not in self._degrees:
            mask = np.isin(self.types, [EDGE_TYPES.index(t) for t in types])
            ends = self.dst if direction == "in" else self.src
            self._degrees[key] = np.bincount(ends[mask], minlength=len(self.ids))
        return self._degrees[key]

    def degree(self, node_id: str, direction: str, types: tuple[str, ...]) -> int:
        at = self.position(node_id)
        return 0 if at is None else int(self.degrees(direction, types)[at])

    def nodes_with_path(self, paths: set[str]) -> list[str]:
        """Node ids whose ``path`` is one of ``paths``, in node order."""
        return [node for node, path in zip(self.ids, self.paths) if path in paths]

    def edges(self, types: tuple[str, ...] | None = None, touching: set[str] | None = None) -> Iterator[tuple[str, str, str]]:
        """``(src, dst, type)`` in insertion order, of the given types, with an end in ``touching`` when given."""
        mask = np.ones(self.num_edges, bool) if types is None else np.isin(self.types, [EDGE_TYPES.index(t) for t in types])
        if touching is not None:
            wanted: np.ndarray = np.zeros(len(self.ids), bool)
            wanted[[i for i in (self.position(n) for n in touching) if i is not None]] = True
            mask &= wanted[self.src] | wanted[self.dst]
        ids = self.ids
        for s, d, t in zip(self.src[mask].tolist(), self.dst[mask].tolist(), self.types[mask].tolist()):
            yield ids[s], ids[d], EDGE_TYPES[t]

    def to_networkx(self):
        """The same graph as a networkx MultiDiGraph (built once, on the first call)."""
        with self._lock:
            if self._nx is None:
                import networkx as nx

                g = nx.MultiDiGraph()
                for node, kind, path in zip(self.ids, self.kinds.tolist(), self.paths):
                    if kind == 2:
                        g.add_node(node, kind="symbol", path=path, qualname=node.rpartition("::")[2])
                    else:
                        g.add_node(node, kind=KINDS[kind], path=path)
                attrs = [{"type": t} for t in EDGE_TYPES]  # shared dicts, as the index always added them
                ids = self.ids
                g.add_edges_from((ids[s], ids[d], attrs[t]) for s, d, t in
                                 zip(self.src.tolist(), self.dst.tolist(), self.types.tolist()))
                self._nx = g
            return self._nx

    @classmethod
    def from_networkx(cls, g: Any) -> CallGraph:
        """A graph made with networkx (nodes with ``kind`` and ``path``, edges with ``type``), e.g. by a test."""
        builder = GraphBuilder()
        for node, data in g.nodes(data=True):
            builder.node(node, data.get("kind", "file"), data.get("path", ""))
        for src, dst, data in g.edges(data=True):
            builder.edge(src, dst, data.get("type", "calls"))
        return builder.build()

    # ------------------------------------------------------------------ storage (plain arrays, no pickle)
    def arrays(self) -> dict[str, np.ndarray]:
        return {"node_ids": pack_strings(self.ids), "node_kinds": self.kinds, "node_paths": pack_strings(self.paths),
                "edge_src": self.src, "edge_dst": self.dst, "edge_types": self.types}

    @classmethod
    def from_arrays(cls, data: Any) -> CallGraph:
        ids, paths = unpack_strings(data["node_ids"]), unpack_strings(data["node_paths"])
        kinds, src, dst, types = (np.asarray(data[k]) for k in ("node_kinds", "edge_src", "edge_dst", "edge_types"))
        n = len(ids)
        if not (len(paths) == kinds.shape[0] == n and src.shape == dst.shape == types.shape):
            raise ValueError("graph arrays of different lengths")
        if src.size and (min(int(src.min()), int(dst.min())) < 0 or max(int(src.max()), int(dst.max())) >= n):
            raise ValueError("graph edge refers to no node")
        if (kinds.size and (int(kinds.min()) < 0 or int(kinds.max()) >= len(KINDS))) or \
                (types.size and (int(types.min()) < 0 or int(types.max()) >= len(EDGE_TYPES))):
            raise ValueError("graph node kind or edge type out of range")
        return cls(ids, kinds.astype(np.int8), paths, src.astype(np.int32), dst.astype(np.int32), types.astype(np.int8))


SEPARATOR = "\x00"  # never inside a parsed Python file (ast refuses NUL) nor a path


def pack_strings(values: list[str]) -> np.ndarray:
    """A list of strings as one uint8 array (UTF-8, NUL-separated, a NUL inside a value becomes U+FFFD)."""
    joined = SEPARATOR.join(v.replace(SEPARATOR, "\ufffd") if SEPARATOR in v else v for v in values)
    return np.frombuffer((joined + SEPARATOR if values else "").encode("utf-8", "surrogatepass"), dtype=np.uint8)


def unpack_strings(array: np.ndarray) -> list[str]:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError("a string column is not a 1-D uint8 array")
    text = array.tobytes().decode("utf-8", "surrogatepass")
    if not text:
        return []
    if not text.endswith(SEPARATOR):
        raise ValueError("a string column is truncated")
    return text[:-1].split(SEPARATOR)
