"""Stage `rerank` (docs/behaviour.md §5): reorder the selected files by cheap relevance proxies (`rerank=heuristic`), or not
(`rerank=none`, and `rerank=lm`, whose LM work runs at the `rescore` node: stages/rescore.py)."""
from __future__ import annotations

import dataclasses
from typing import Annotated

from pipeline.engine.stage import Range, Stage
from stages.common.retrieval.scoring import terms, window_fields
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
        symbols = [s for s in index.symbols_in(path) if s.is_definition]
        tested = sum(1 for s in symbols if index.callgraph.degree(s.node_id, "in", ("tests",)))
        out[path] = (tested / len(symbols), sum(s.is_public for s in symbols) / len(symbols)) if symbols else (0.0, 0.0)
    return out


class HeuristicRerank(Stage):
    """Weighted sum of: select's own score, the prompt's overlap with the best-matching signature and docstring,
    the share of tested and of public symbols, in-degree. Overlaps are idf-weighted shares of the prompt's terms,
    taken per symbol (the best one in the file), so a long file does not win by having every word somewhere."""

    outputs = {"selection": Selection}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        signatures: float = 0.4  # the prompt's overlap with the best-matching signature
        docstrings: float = 0.3  # ... with the best-matching docstring
        tests: float = 0.1  # share of the file's symbols that a test calls
        public: float = 0.1  # share of public symbols
        centrality: float = 0.1  # import and call edges into the file, over the most any selected file has
        selection: Annotated[float, Range(ge=0)] = 1.0  # select's own score, over the selection's best

    config: Config

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

        c = self.config
        scores = {}
        for path in selection.files:
            tested, public = priors[path]
            scores[path] = (c.signatures * overlap(0, path) + c.docstrings * overlap(1, path) + c.tests * tested
                            + c.public * public + c.centrality * (degree[path] / top_degree)
                            + c.selection * (selection.scores.get(path, 0.0) / top_score))
        order = sorted(selection.files, key=lambda p: (-scores[p], selection.files.index(p)))
        reranked = dataclasses.replace(
            selection, files=order, scores={p: round(scores[p], 4) for p in order},
            modules=[m for m in (index.files[p].module for p in order) if m],
        )
        return {"selection": reranked}


class NoRerank(Stage):
    """`rerank=none` and `rerank=lm`: the selection passes through in select's order (same ports as every rerank)."""

    outputs = {"selection": Selection}

    def run(self, index: ProgramIndex, selection: Selection, prompt: str) -> dict:
        return {"selection": selection}
