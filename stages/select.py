"""Stage `select` (SPEC §5): which region of the program the question is about.

`select=question` scores files by the overlap of prompt tokens with symbol names, qualnames, docstrings and
paths (rarer tokens weigh more). `select=zoom` starts from a named symbol and walks the program graph.
"""
from __future__ import annotations

import difflib
from typing import Annotated

import networkx as nx

from pipeline.errors import InputError
from pipeline.stage import Range, Stage
from stages.common.program import is_test_path
from stages.common.scoring import score_windows
from stages.common.text import token_set, tokens
from stages.common.types import ProgramIndex, Selection, Symbol


class QuestionSelect(Stage):
    """Files ranked by their best window's BM25F score against the prompt (stages.common.scoring): the words of
    the question matched against symbol names, signatures, docstrings, paths and source text, rarer words
    weighing more. A file is as relevant as the definition in it that best matches."""

    outputs = {"selection": Selection}

    def __init__(self, top_k: Annotated[int, Range(ge=1)] = 8, name_weight: Annotated[float, Range(ge=0)] = 4.0,
                 doc_weight: Annotated[float, Range(ge=0)] = 0.3, path_weight: Annotated[float, Range(ge=0)] = 0.8,
                 text_weight: Annotated[float, Range(ge=0)] = 0.1, signature_weight: Annotated[float, Range(ge=0)] = 0.0,
                 k1: Annotated[float, Range(ge=0)] = 0.6, b: Annotated[float, Range(ge=0, le=1)] = 0.75,
                 test_weight: Annotated[float, Range(ge=0)] = 0.5):
        self.top_k, self.test_weight = top_k, test_weight
        self.relevance = {"name": name_weight, "doc": doc_weight, "path": path_weight, "text": text_weight,
                          "signature": signature_weight, "k1": k1, "b": b}

    def run(self, index: ProgramIndex, prompt: str) -> dict:
        windows = score_windows(index, prompt, self.relevance)
        scores: dict[str, float] = {}
        for i, value in windows.items():
            path = index.windows[i].path
            if is_test_path(path):
                value *= self.test_weight  # a test mentions what it tests: the definition should come first
            scores[path] = max(value, scores.get(path, 0.0))
        matched = [p for p, v in scores.items() if v > 0]
        ranked = sorted(matched, key=lambda p: (-scores[p], p))
        if not ranked:
            # nothing in the program matches the words of the question: fall back to its most central files
            central = nx.in_degree_centrality(index.graph)
            ranked = sorted(index.files, key=lambda p: (-central.get(f"file:{p}", 0) - _module_centrality(index, p, central), p))
        files = ranked[: self.top_k]
        names = set(tokens(prompt))
        symbols = [s.qualname for s in index.symbols if s.path in files and token_set(s.name) & names]
        return {"selection": _selection(index, files, scores, symbols, len(matched))}


def _module_centrality(index: ProgramIndex, path: str, central: dict) -> float:
    module = index.files[path].module
    return central.get(f"mod:{module}", 0.0) if module else 0.0


def _selection(index: ProgramIndex, files: list[str], scores: dict[str, float], symbols: list[str],
               matched: int, nodes: list[str] | None = None) -> Selection:
    modules = [index.files[p].module for p in files if index.files[p].module]
    if nodes is None:
        wanted = set(files)
        nodes = index.callgraph.nodes_with_path(wanted)
    return Selection(files, modules, {p: round(scores.get(p, 0.0), 4) for p in files}, symbols, matched, nodes)


class ZoomSelect(Stage):
    """Seeds = symbols matching `zoom_symbol`; region = graph nodes within `zoom_radius` hops."""

    outputs = {"selection": Selection}

    def __init__(self, zoom_symbol: str, zoom_radius: Annotated[int, Range(ge=0)] = 1,
                 top_k: Annotated[int, Range(ge=1)] = 8):
        self.zoom_symbol, self.zoom_radius, self.top_k = zoom_symbol, zoom_radius, top_k

    def run(self, index: ProgramIndex, prompt: str) -> dict:
        seeds = find_symbols(index, self.zoom_symbol)
        seed_ids = [s.node_id for s in seeds]
        seed_files = list(dict.fromkeys(s.path for s in seeds))
        distance: dict[str, int] = {}
        if self.zoom_radius > 0:
            undirected = nx.Graph(index.graph)  # hops over imports/calls/defines in either direction
            for seed in seed_ids:
                for node, hops in nx.single_source_shortest_path_length(undirected, seed, cutoff=self.zoom_radius).items():
                    distance[node] = min(hops, distance.get(node, hops))
        else:
            distance = {f"file:{p}": 0 for p in seed_files} | {s: 0 for s in seed_ids}
        file_distance: dict[str, int] = {p: 0 for p in seed_files}
        for node, hops in distance.items():
            path = index.graph.nodes[node].get("path")
            if path is not None:
                file_distance[path] = min(hops, file_distance.get(path, hops))
        files = sorted(file_distance, key=lambda p: (file_distance[p], p))[: self.top_k]
        scores = {p: 1.0 / (1 + file_distance[p]) for p in files}
        nodes = sorted(n for n in distance if index.graph.nodes[n].get("path") in set(files))
        return {"selection": _selection(index, files, scores, [s.qualname for s in seeds], len(seed_files), nodes)}


def find_symbols(index: ProgramIndex, wanted: str) -> list[Symbol]:
    """Exact qualname (optionally module-qualified), else bare name; else an error listing close matches."""
    exact = [s for s in index.symbols if s.qualname == wanted or f"{s.module}.{s.qualname}" == wanted]
    if exact:
        return exact
    by_name = [s for s in index.symbols if s.name == wanted]
    if by_name:
        return by_name
    known = sorted({s.qualname for s in index.symbols} | {s.name for s in index.symbols})
    close = difflib.get_close_matches(wanted, known, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; no similar symbol names"
    raise InputError(f"select.zoom_symbol '{wanted}' is not defined in the program{hint}")
