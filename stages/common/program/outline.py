"""A map of the program for people (docs/howto/outline.md): its files, classes, functions and values with their
spans and one-line summaries, ranked by how central they are in the call graph (a repo map, as Aider's).

Centrality is PageRank over the index's `calls` and `imports` edges, computed on the edge arrays with numpy (the
graph of a big tree has ~500 k edges: no networkx graph is built, no scipy needed); a file ranks by the sum of
its nodes (the file, its module, its symbols). A summary is the docstring's first line, else the signature.
Used by the `outline` stage (the command and its report section) and by the scaffold's `map_tokens`.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from stages.common.program.callgraph import EDGE_TYPES
from stages.common.types import ProgramIndex, Symbol

RANKED_EDGES = ("calls", "imports")
KIND_WORDS = {"function": "def", "method": "def", "class": "class", "constant": "const", "attribute": "attr"}
MAX_SUMMARY = 100  # characters of a summary line


@dataclasses.dataclass(frozen=True)
class Entry:
    """One symbol of the map."""

    kind: str
    name: str  # qualname
    path: str
    start: int
    end: int
    summary: str
    score: float

    def line(self, indent: str = "  ") -> str:
        head = f"{indent}{KIND_WORDS.get(self.kind, self.kind)} {self.name}  {self.start}-{self.end}"
        return f"{head}  {self.summary}" if self.summary else head

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "path": self.path, "start": self.start, "end": self.end,
                "summary": self.summary, "score": round(self.score, 6)}


@dataclasses.dataclass(frozen=True)
class FileSection:
    path: str
    lines: int
    summary: str
    score: float
    entries: tuple[Entry, ...]
    more: int = 0  # entries of the file left out (symbols_per_file)

    def text_lines(self) -> list[str]:
        head = f"{self.path}  1-{self.lines}" + (f"  {self.summary}" if self.summary else "")
        return [head, *(e.line() for e in self.entries)] + ([f"  … {self.more} more"] if self.more else [])

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "lines": self.lines, "summary": self.summary, "score": round(self.score, 6),
                "entries": [e.as_dict() for e in self.entries], "more": self.more}


def pagerank(index: ProgramIndex, damping: float = 0.85, tol: float = 1e-9, max_iter: int = 200) -> np.ndarray:
    """Per callgraph node, its PageRank over the `calls` and `imports` edges (one edge per call site), summing to 1;
    a node without out-edges spreads its rank evenly (the usual dangling rule). Kept per index."""
    def compute() -> np.ndarray:
        graph = index.callgraph
        n = len(graph)
        if n == 0:
            return np.zeros(0)
        mask = np.isin(graph.types, [EDGE_TYPES.index(t) for t in RANKED_EDGES])
        src, dst = graph.src[mask].astype(np.int64), graph.dst[mask].astype(np.int64)
        out = np.bincount(src, minlength=n).astype(np.float64)
        dangling = out == 0
        weight = 1.0 / np.where(dangling, 1.0, out)
        rank = np.full(n, 1.0 / n)
        for _ in range(max_iter):
            flow = np.bincount(dst, weights=(rank * weight)[src], minlength=n)
            new = (1.0 - damping) / n + damping * (flow + rank[dangling].sum() / n)
            done = np.abs(new - rank).sum() < tol
            rank = new
            if done:
                break
        return rank / rank.sum()
    return index.derived(f"outline:pagerank:{damping}", compute)


def summary_of(symbol: Symbol) -> str:
    """The docstring's first line, else the signature without the name the entry already shows."""
    text = " ".join((symbol.doc or _signature_tail(symbol)).split())
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 1] + "…"


def _signature_tail(symbol: Symbol) -> str:
    signature = symbol.signature or ""
    for head in (f"class {symbol.name}", f"async def {symbol.name}", symbol.name):
        if signature.startswith(head):
            return signature[len(head):].strip()
    return signature


def _file_summary(index: ProgramIndex, path: str) -> str:
    """The first line of a Python file's module docstring (read from its first lines, not parsed), else ''."""
    if not path.endswith(".py") or path not in index.texts:
        return ""
    for line in index.texts[path][:4000].splitlines()[:40]:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        for quote in ('"""', "'''"):
            for prefix in ("", "r", "R"):
                if text.startswith(prefix + quote):
                    body = text[len(prefix) + 3:].split(quote)[0].strip()
                    return body if len(body) <= MAX_SUMMARY else body[:MAX_SUMMARY - 1] + "…"
        return ""
    return ""


def symbol_scores(index: ProgramIndex, damping: float = 0.85) -> dict[str, float]:
    """node_id -> PageRank of every symbol (0 for one the graph lacks). Kept per index."""
    def compute() -> dict[str, float]:
        rank, graph = pagerank(index, damping).tolist(), index.callgraph
        out = {}
        for sym in index.symbols:
            at = graph.position(sym.node_id)
            out[sym.node_id] = rank[at] if at is not None else 0.0
        return out
    return index.derived(f"outline:symbol_scores:{damping}", compute)


def file_scores(index: ProgramIndex, damping: float = 0.85) -> dict[str, float]:
    """path -> the summed rank of the file's nodes (the file, its module, its symbols). Kept per index."""
    def compute() -> dict[str, float]:
        rank, graph = pagerank(index, damping), index.callgraph
        paths = sorted(index.files)
        code = {p: i for i, p in enumerate(paths)}
        at = np.fromiter((code.get(p, -1) for p in graph.paths), dtype=np.int64, count=len(graph))
        known = at >= 0
        sums = np.bincount(at[known], weights=rank[known], minlength=len(paths)) if len(paths) else np.zeros(0)
        return dict(zip(paths, sums.tolist()))
    return index.derived(f"outline:file_scores:{damping}", compute)


def build_map(index: ProgramIndex, damping: float = 0.85, files: int = 0, symbols_per_file: int = 0,
              only: set[str] | None = None) -> list[FileSection]:
    """The map: files by rank (the first ``files``; 0: all, or those of ``only``), each with its symbols by rank
    (the first ``symbols_per_file``; 0: all); ties keep the file order and the line order."""
    by_file = file_scores(index, damping)
    sym_score = symbol_scores(index, damping)
    order = sorted(by_file, key=lambda p: (-by_file[p], p))
    if only is not None:
        order = [p for p in order if p in only]
    if files:
        order = order[:files]
    sections = []
    for path in order:
        symbols = sorted(index.symbols_in(path), key=lambda s: (-sym_score[s.node_id], s.start))
        kept = symbols[:symbols_per_file] if symbols_per_file else symbols
        entries = tuple(Entry(s.kind, s.qualname, s.path, s.start, s.end, summary_of(s), sym_score[s.node_id])
                        for s in kept)
        sections.append(FileSection(path, index.files[path].lines, _file_summary(index, path), by_file[path], entries,
                                    len(symbols) - len(kept)))
    return sections


def map_text(index: ProgramIndex, sections: list[FileSection]) -> str:
    head = (f"map of {index.location}: {len(index.files)} files, {len(index.symbols)} symbols "
            f"(most central first: PageRank over calls and imports)")
    return "\n".join([head, *(line for s in sections for line in s.text_lines())])


# ------------------------------------------------------------------------------------------ one symbol


def lookup(index: ProgramIndex, name: str) -> list[Symbol]:
    """The symbols ``name`` names: by qualname, else by short name, else by a dotted suffix (`mod.func`)."""
    exact = [s for s in index.symbols if s.qualname == name]
    if exact:
        return exact
    short = [s for s in index.symbols if s.name == name]
    if short:
        return short
    return [s for s in index.symbols if f"{s.module}.{s.qualname}".endswith(f".{name}") or
            f"{s.path}::{s.qualname}" == name]


def closest(index: ProgramIndex, name: str, n: int = 3) -> list[str]:
    names = sorted({s.qualname for s in index.symbols} | {s.name for s in index.symbols})
    found = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if not found:  # a different case or a part of a name
        low = name.lower()
        found = [q for q in names if low in q.lower()][:n]
    return found


def neighbours(index: ProgramIndex, symbol: Symbol, direction: str) -> list[tuple[str, int]]:
    """The callers (``direction='in'``) or callees (``'out'``) of ``symbol`` over `calls` edges, as (node id, call
    sites), most sites first."""
    graph = index.callgraph
    at = graph.position(symbol.node_id)
    if at is None:
        return []
    mask = graph.types == EDGE_TYPES.index("calls")
    mine, other = (graph.dst, graph.src) if direction == "in" else (graph.src, graph.dst)
    counts = Counter(other[mask & (mine == at)].tolist())
    # a call of an overloaded name is an edge per overload, and the overloads of one name share one node
    shared = index.derived("outline:overloads", lambda: Counter(s.node_id for s in index.symbols))
    sites = {i: -(-c // max(shared[graph.ids[at if direction == "in" else i]], 1)) for i, c in counts.items()}
    return [(graph.ids[i], c) for i, c in sorted(sites.items(), key=lambda item: (-item[1], graph.ids[item[0]]))]


def _node_entry(index: ProgramIndex, node: str, scores: dict[str, float]) -> Entry:
    by_id = index.derived("outline:symbols_by_id", lambda: {s.node_id: s for s in index.symbols})
    sym = by_id.get(node)
    if sym is not None:
        return Entry(sym.kind, sym.qualname, sym.path, sym.start, sym.end, summary_of(sym), scores.get(node, 0.0))
    path = node.split(":", 1)[1]
    module_path = index.modules.get(path, path)
    lines = index.files[module_path].lines if module_path in index.files else 0
    return Entry("module", "(module level)", module_path, 1, lines, "", 0.0)


def symbol_view(index: ProgramIndex, name: str, damping: float = 0.85) -> list[dict[str, Any]]:
    """For each symbol ``name`` names: its entry, its callers and callees (with call-site counts) and its file's
    section of the map. Raises LookupError with the closest names when there is none."""
    found = list({s.node_id: s for s in lookup(index, name)}.values())  # overloads share a node: the last
    if not found:
        raise LookupError(name)
    scores = symbol_scores(index, damping)
    views = []
    for sym in found:
        entry = _node_entry(index, sym.node_id, scores)
        views.append({"symbol": entry.as_dict(),
                      "callers": [{**_node_entry(index, n, scores).as_dict(), "sites": c}
                                  for n, c in neighbours(index, sym, "in")],
                      "callees": [{**_node_entry(index, n, scores).as_dict(), "sites": c}
                                  for n, c in neighbours(index, sym, "out")],
                      "file": build_map(index, damping, only={sym.path})[0].as_dict()})
    return views


def _ref(item: dict[str, Any]) -> str:
    sites = f"  ({item['sites']} call sites)" if item.get("sites", 1) > 1 else ""
    kind = KIND_WORDS.get(item["kind"], item["kind"])
    text = f"  {item['path']}:{item['start']}-{item['end']}  {kind} {item['name']}{sites}"
    return f"{text}  {item['summary']}" if item["summary"] else text


def symbol_text(views: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for view in views:
        sym = view["symbol"]
        lines += [""] * bool(lines)  # a blank line between the symbols a name matched
        lines.append(f"{KIND_WORDS.get(sym['kind'], sym['kind'])} {sym['name']}  {sym['path']}:{sym['start']}-"
                     f"{sym['end']}" + (f"  {sym['summary']}" if sym["summary"] else ""))
        for title, key in (("called by", "callers"), ("calls", "callees")):
            lines.append(f"{title} ({len(view[key])}):" if view[key] else f"{title}: none in the program")
            lines += [_ref(item) for item in view[key]]
        f = view["file"]
        lines.append(f"file {f['path']}  1-{f['lines']}" + (f"  {f['summary']}" if f["summary"] else ""))
        lines += [Entry(**e).line() for e in f["entries"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ a budget


def trimmed_map(index: ProgramIndex, count: Callable[[list[str]], list[int]], budget: int,
                damping: float = 0.85, title: str = "[program map]") -> str:
    """The map's first lines (title included) whose tokens, as ``count`` gives them per line, fit in ``budget``;
    '' when not even the title and one file fit. Lines are counted in chunks: a big tree is never tokenized whole."""
    if budget <= 0:
        return ""
    kept: list[str] = []
    used = 0
    lines = [title]
    for section in index.derived(f"outline:sections:{damping}", lambda: build_map(index, damping)):
        lines += section.text_lines()
        if len(lines) < 64:
            continue
        used, full = _take(lines, count, budget, kept, used)
        lines = []
        if full:
            break
    else:
        _take(lines, count, budget, kept, used)
    return "\n".join(kept) if len(kept) >= 2 else ""


def _take(lines: list[str], count: Callable[[list[str]], list[int]], budget: int, kept: list[str],
          used: int) -> tuple[int, bool]:
    for line, n in zip(lines, count([line + "\n" for line in lines])):
        if used + n > budget:
            return used, True
        kept.append(line)
        used += n
    return used, False


def map_block(tokenizer: Any, index: ProgramIndex | None, budget: int) -> str:
    """The scaffold's `map_tokens`: the map trimmed to ``budget`` tokens of ``tokenizer`` (program text as data);
    '' when the budget is 0 or there is no index."""
    if index is None or budget <= 0:
        return ""
    from stages.common.tokens import encode_texts

    return trimmed_map(index, lambda lines: [len(ids) for ids in encode_texts(tokenizer, lines)], budget)
