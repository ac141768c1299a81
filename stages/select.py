"""Stage `select` (docs/behaviour.md §5): which region of the program the question is about.

`select=question` scores files by the overlap of prompt tokens with symbol names, qualnames, docstrings and
paths (rarer tokens weigh more). `select=hybrid` fuses that ranking with MiniLM sentence vectors of every window.
`select=zoom` starts from a named symbol and walks the program graph.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Annotated

import networkx as nx
import numpy as np

from pipeline.engine.errors import InputError
from pipeline.engine.stage import Range, Stage
from stages.common.program.text import token_set, tokens
from stages.common.program.walk import is_test_path
from stages.common.retrieval import encoder_lora
from stages.common.retrieval.dense import MAX_TOKENS, PACKAGE, encoder, window_vectors
from stages.common.retrieval.focus import focus_windows, parse
from stages.common.retrieval.names import boost, find_names
from stages.common.retrieval.scoring import RELEVANCE, dense_rows, fuse_rows, score_windows
from stages.common.types import ProgramIndex, Selection, Symbol, Window


class QuestionSelect(Stage):
    """Files ranked by their best window's BM25F score against the prompt (stages.common.retrieval.scoring): the words of
    the question matched against symbol names, signatures, docstrings, paths and source text, rarer words
    weighing more. A file is as relevant as the definition in it that best matches."""

    outputs = {"selection": Selection}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        top_k: Annotated[int, Range(ge=1)] = 8
        name_weight: Annotated[float, Range(ge=0)] = RELEVANCE["name"]
        doc_weight: Annotated[float, Range(ge=0)] = RELEVANCE["doc"]
        path_weight: Annotated[float, Range(ge=0)] = RELEVANCE["path"]
        text_weight: Annotated[float, Range(ge=0)] = RELEVANCE["text"]
        signature_weight: Annotated[float, Range(ge=0)] = RELEVANCE["signature"]
        k1: Annotated[float, Range(ge=0)] = RELEVANCE["k1"]
        b: Annotated[float, Range(ge=0, le=1)] = RELEVANCE["b"]
        test_weight: Annotated[float, Range(ge=0)] = 0.5
        focus: str | None = None  # `<file>[:<first>-<last>]`: that file alone, its windows overlapping the lines
        # names the question writes (stages.common.retrieval.names): the window defining one gains this share of the
        # best window's score; 0: names weigh as words only
        name_boost: Annotated[float, Range(ge=0)] = 0.5

        @property
        def relevance(self) -> dict[str, float]:
            """The BM25F weights of stages.common.retrieval.scoring, from this config's keys."""
            return {"name": self.name_weight, "doc": self.doc_weight, "path": self.path_weight, "text": self.text_weight,
                    "signature": self.signature_weight, "k1": self.k1, "b": self.b}

    config: Config

    def precheck(self, prompt: str | None = None, **_) -> None:
        if self.config.focus is not None:  # a malformed focus fails before any model loads
            parse(self.config.focus)

    def run(self, index: ProgramIndex, prompt: str) -> dict:
        scores = score_windows(index, prompt, self.config.relevance)
        found = find_names(index, prompt)
        if not found.windows or not self.config.name_boost:
            return {"selection": self.select(index, prompt, scores)}
        values = np.zeros(len(index.windows), dtype=np.float64)
        for i, value in scores.items():
            values[i] = value
        boosted = boost(values, found, self.config.name_boost)
        # pack shows the named window first: the ranking goes with the selection, as select=hybrid's does
        return {"selection": self.select(index, prompt, {i: float(v) for i, v in enumerate(boosted) if v > 0},
                                         _ranking(index, boosted))}

    def select(self, index: ProgramIndex, prompt: str, windows: dict[int, float],
               ranking: dict[str, list[tuple[float, Window]]] | None = None, tests_weighed: bool = False) -> Selection:
        """Files ranked by their best window's score (window position -> score >= 0; 0 = no match)."""
        if self.config.focus is not None:  # the file and lines the user pointed at, alone
            path, ranked_windows = focus_windows(index, parse(self.config.focus), windows)
            return self._region(index, prompt, [path], {path: ranked_windows[0][0]}, 1, {path: ranked_windows})
        scores: dict[str, float] = {}
        for i, value in windows.items():
            path = index.windows[i].path
            if not tests_weighed and is_test_path(path):
                value *= self.config.test_weight  # a test mentions what it tests: the definition should come first
            scores[path] = max(value, scores.get(path, 0.0))
        matched = [p for p, v in scores.items() if v > 0]
        ranked = sorted(matched, key=lambda p: (-scores[p], p))
        if not ranked:
            # nothing in the program matches the words of the question: fall back to its most central files
            central = nx.in_degree_centrality(index.graph)
            ranked = sorted(index.files, key=lambda p: (-central.get(f"file:{p}", 0) - _module_centrality(index, p, central), p))
        return self._region(index, prompt, ranked[: self.config.top_k], scores, len(matched), ranking)

    def _region(self, index: ProgramIndex, prompt: str, files: list[str], scores: dict[str, float], matched: int,
                ranking: dict[str, list[tuple[float, Window]]] | None) -> Selection:
        names = set(tokens(prompt))
        symbols = [s.qualname for s in index.symbols if s.path in files and token_set(s.name) & names]
        selection = _selection(index, files, scores, symbols, matched)
        selection.window_ranking = ranking
        return selection


class HybridSelect(QuestionSelect):
    """`select=hybrid`: select=question's BM25F window scores fused with the cosine similarity of the question's
    and each window's all-MiniLM-L6-v2 vectors (stages.common.retrieval.dense; window vectors cached per program).

    Fused score: ``dense_weight·z(cosine) + (1 − dense_weight)·z(BM25F)``, each standardised over all windows.
    `encoder_adapter` (a shipped adapter's name or an .npz path; null: MiniLM as it ships) is a LoRA delta of the
    encoder learnt on other programs' docstring/definition pairs (stages.common.retrieval.encoder_lora), merged for
    questions and windows alike. Files are ranked by their best fused window, and the fused ranking of every file's
    windows goes with the selection, so pack shows the windows that made the files win."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(QuestionSelect.Config):
        dense_weight: Annotated[float, Range(ge=0, le=1)] = 0.8
        batch_size: Annotated[int, Range(ge=1)] = 32
        package: str = PACKAGE
        cache_dir: str | None = None
        progress: bool = True
        encoder_adapter: str | None = "minilm_code_search_lora"
        # a milder penalty than select=question's 0.5, which on the fused scale hid the tests that questions were about
        test_weight: Annotated[float, Range(ge=0)] = 0.9
        # a program with more windows than dense_all_windows: only the dense_candidates best by BM25F are embedded and
        # fused (a 10,000-file tree's ~150,000 windows would take an hour); null: every window, whatever the size
        dense_all_windows: Annotated[int, Range(ge=1)] | None = 5000
        dense_candidates: Annotated[int, Range(ge=1)] = 1000

    config: Config

    def precheck(self, prompt: str | None = None, **_) -> None:
        super().precheck(prompt)
        # a missing or bad adapter file fails before any model loads
        if self.config.encoder_adapter:
            encoder_lora.load(self.config.encoder_adapter)

    def run(self, index: ProgramIndex, prompt: str) -> dict:
        c = self.config
        enc = encoder(c.package, c.batch_size, c.encoder_adapter)
        sparse = score_windows(index, prompt, c.relevance)
        rows = dense_rows(len(index.windows), sparse, c.dense_all_windows, c.dense_candidates)
        vectors = window_vectors(index, enc, MAX_TOKENS, Path(c.cache_dir) if c.cache_dir else None, c.progress, rows)
        dense = vectors @ enc.encode([prompt], MAX_TOKENS)[0]
        # tests weigh less on the fused scale itself (z-scores: a share of their lead over the average window), before
        # the shift to >= 0 that would turn test_weight into a much larger penalty
        tests = index.derived("select.test_windows",
                              lambda: np.array([is_test_path(w.path) for w in index.windows], dtype=bool))
        fused = fuse_rows(sparse, dense, rows, len(index.windows), c.dense_weight)
        fused = np.where(tests & (fused > 0), fused * c.test_weight, fused)
        fused = fused - fused.min() if len(fused) else fused
        fused = boost(fused, find_names(index, prompt), c.name_boost)
        return {"selection": self.select(index, prompt, dict(enumerate(fused.tolist())), _ranking(index, fused),
                                         tests_weighed=True)}


def _ranking(index: ProgramIndex, scores: np.ndarray) -> dict[str, list[tuple[float, Window]]]:
    """Per file, its windows best first by ``scores`` (one per window; ties: earlier first)."""
    ranking: dict[str, list[tuple[float, Window]]] = {}
    for i, window in enumerate(index.windows):
        ranking.setdefault(window.path, []).append((round(float(scores[i]), 6), window))
    for ranked in ranking.values():
        ranked.sort(key=lambda item: (-item[0], item[1].start))
    return ranking


def _module_centrality(index: ProgramIndex, path: str, central: dict) -> float:
    module = index.files[path].module
    return central.get(f"mod:{module}", 0.0) if module else 0.0


def _selection(index: ProgramIndex, files: list[str], scores: dict[str, float], symbols: list[str],
               matched: int, nodes: list[str] | None = None) -> Selection:
    modules = [m for m in (index.files[p].module for p in files) if m]
    if nodes is None:
        wanted = set(files)
        nodes = index.callgraph.nodes_with_path(wanted)
    return Selection(files, modules, {p: round(scores.get(p, 0.0), 4) for p in files}, symbols, matched, nodes)


class ZoomSelect(Stage):
    """Seeds = symbols matching `zoom_symbol`; region = graph nodes within `zoom_radius` hops."""

    outputs = {"selection": Selection}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        zoom_symbol: str
        zoom_radius: Annotated[int, Range(ge=0)] = 1
        top_k: Annotated[int, Range(ge=1)] = 8
        focus: str | None = None  # as select=question's: that file and lines alone (zoom_symbol is then not used)

    config: Config

    def precheck(self, prompt: str | None = None, **_) -> None:
        if self.config.focus is not None:
            parse(self.config.focus)

    def run(self, index: ProgramIndex, prompt: str) -> dict:
        c = self.config
        if c.focus is not None:
            path, ranked = focus_windows(index, parse(c.focus), {})
            selection = _selection(index, [path], {path: 1.0}, [], 1)
            selection.window_ranking = {path: ranked}
            return {"selection": selection}
        seeds = find_symbols(index, c.zoom_symbol)
        seed_ids = [s.node_id for s in seeds]
        seed_files = list(dict.fromkeys(s.path for s in seeds))
        distance: dict[str, int] = {}
        if c.zoom_radius > 0:
            undirected = nx.Graph(index.graph)  # hops over imports/calls/defines in either direction
            for seed in seed_ids:
                for node, hops in nx.single_source_shortest_path_length(undirected, seed, cutoff=c.zoom_radius).items():
                    distance[node] = min(hops, distance.get(node, hops))
        else:
            distance = {f"file:{p}": 0 for p in seed_files} | {s: 0 for s in seed_ids}
        file_distance: dict[str, int] = {p: 0 for p in seed_files}
        for node, hops in distance.items():
            path = index.graph.nodes[node].get("path")
            if path is not None:
                file_distance[path] = min(hops, file_distance.get(path, hops))
        files = sorted(file_distance, key=lambda p: (file_distance[p], p))[: c.top_k]
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
