"""Stage `rerank` (SPEC §5): reorder the selected files by cheap relevance proxies (`rerank=heuristic|none`)."""
from __future__ import annotations

import dataclasses
from typing import Annotated

from pipeline.stage import Range, Stage
from stages.common.scoring import terms, window_fields
from stages.common.types import ProgramIndex, Selection


def _symbol_terms(index: ProgramIndex) -> dict[str, list[tuple[set[str], set[str]]]]:
    """Per file, each symbol's (signature terms, docstring terms), computed once per index."""
    out: dict[str, list[tuple[set[str], set[str]]]] = {}
    for sym in index.symbols:
        out.setdefault(sym.path, []).append((set(terms(sym.signature)), set(terms(sym.doc))))
    return out


def _in_degrees(index: ProgramIndex) -> dict[str, int]:
    """Import and call edges into each file's module and symbols."""
    graph, degree = index.callgraph, {}
    for path, record in index.files.items():
        node = f"mod:{record.module}" if record.module else f"file:{path}"
        count = graph.degree(node, "in", ("imports", "calls"))
        count += sum(graph.degree(s.node_id, "in", ("calls",)) for s in index.symbols_in(path))
        degree[path] = count
    return degree


def _priors(index: ProgramIndex) -> dict[str, tuple[float, float]]:
    """Per file, the question-independent proxies (share of tested symbols, share of public symbols)."""
    out = {}
    for path in index.files:
        symbols = index.symbols_in(path)
        tested = sum(1 for s in symbols if index.callgraph.degree(s.node_id, "in", ("tests",)))
        out[path] = (tested / len(symbols), sum(s.is_public for s in symbols) / len(symbols)) if symbols else (0.0, 0.0)
    return out


class HeuristicRerank(Stage):
    """Weighted sum of: select's own score, the prompt's overlap with the best-matching signature and docstring,
    the share of tested and of public symbols, in-degree. Overlaps are idf-weighted shares of the prompt's terms,
    taken per symbol (the best one in the file), so a long file does not win by having every word somewhere."""

    outputs = {"selection": Selection}

    def __init__(self, signatures: float = 0.4, docstrings: float = 0.3, tests: float = 0.1,
                 public: float = 0.1, centrality: float = 0.1, selection: Annotated[float, Range(ge=0)] = 1.0):
        self.weights = {"signatures": signatures, "docstrings": docstrings, "tests": tests,
                        "public": public, "centrality": centrality, "selection": selection}

    def run(self, index: ProgramIndex, selection: Selection, prompt: str) -> dict:
        idf = window_fields(index).idf
        query = {t: idf.get(t, 0.0) for t in terms(prompt)}
        total = sum(query.values()) or 1.0
        symbols = index.derived("rerank.symbol_terms", lambda: _symbol_terms(index))
        degree = index.derived("rerank.in_degree", lambda: _in_degrees(index))
        priors = index.derived("rerank.priors", lambda: _priors(index))
        top_degree = max((degree[p] for p in selection.files), default=0) or 1
        top_score = max((selection.scores.get(p, 0.0) for p in selection.files), default=0.0) or 1.0

        def overlap(field: int, path: str) -> float:
            return max((sum(w for t, w in query.items() if t in sym[field]) / total for sym in symbols.get(path, [])),
                       default=0.0)

        scores = {}
        for path in selection.files:
            tested, public = priors[path]
            proxies = {
                "signatures": overlap(0, path),
                "docstrings": overlap(1, path),
                "tests": tested,
                "public": public,
                "centrality": degree[path] / top_degree,
                "selection": selection.scores.get(path, 0.0) / top_score,
            }
            scores[path] = sum(self.weights[k] * v for k, v in proxies.items())
        order = sorted(selection.files, key=lambda p: (-scores[p], selection.files.index(p)))
        reranked = dataclasses.replace(
            selection, files=order, scores={p: round(scores[p], 4) for p in order},
            modules=[index.files[p].module for p in order if index.files[p].module],
        )
        return {"selection": reranked}


class KeepOrder(Stage):
    """`rerank=none`: the selection passes through in select's order (same ports as every rerank)."""

    outputs = {"selection": Selection}

    def run(self, index: ProgramIndex, selection: Selection, prompt: str) -> dict:
        return {"selection": selection}
