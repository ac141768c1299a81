"""Stage `rerank` (SPEC §5): reorder the selected files by cheap relevance proxies (`rerank=heuristic|none`)."""
from __future__ import annotations

import dataclasses

from pipeline.stage import Stage
from stages.common.text import token_set
from stages.common.types import ProgramIndex, Selection


class HeuristicRerank(Stage):
    """Weighted sum of: prompt overlap with signatures and docstrings, linked tests, public share, in-degree."""

    outputs = {"selection": Selection}

    def __init__(self, signatures: float = 0.4, docstrings: float = 0.3, tests: float = 0.1,
                 public: float = 0.1, centrality: float = 0.1):
        self.weights = {"signatures": signatures, "docstrings": docstrings, "tests": tests,
                        "public": public, "centrality": centrality}

    def run(self, index: ProgramIndex, selection: Selection, prompt: str) -> dict:
        query = token_set(prompt)
        graph = index.graph
        in_degree = {}
        for path in selection.files:
            module = index.files[path].module
            node = f"mod:{module}" if module else f"file:{path}"
            in_degree[path] = sum(1 for _, _, d in graph.in_edges(node, data=True) if d.get("type") in ("imports", "calls"))
            in_degree[path] += sum(
                1 for s in index.symbols_in(path) for _, _, d in graph.in_edges(s.node_id, data=True) if d.get("type") == "calls"
            )
        top_degree = max(in_degree.values(), default=0) or 1
        scores = {}
        for position, path in enumerate(selection.files):
            symbols = index.symbols_in(path)
            sig = token_set(" ".join(s.signature for s in symbols))
            doc = token_set(" ".join(s.doc for s in symbols))
            tested = sum(1 for s in symbols if any(d.get("type") == "tests" for _, _, d in graph.in_edges(s.node_id, data=True)))
            proxies = {
                "signatures": len(query & sig) / len(query) if query else 0.0,
                "docstrings": len(query & doc) / len(query) if query else 0.0,
                "tests": tested / len(symbols) if symbols else 0.0,
                "public": sum(s.is_public for s in symbols) / len(symbols) if symbols else 0.0,
                "centrality": in_degree[path] / top_degree,
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
