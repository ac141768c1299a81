"""Question-to-window relevance shared by `select` and `pack`: BM25F over the windows index (docs/behaviour.md §1).

A window is scored field by field (the names of the definitions it holds, their signatures, docstrings, the
file path and the source text), each field's term counts weighted, then saturated BM25-style with idf over all
windows. Words are stemmed lightly on both sides so that "parses" finds `parse` and "entries" finds `entry`.
Everything per-index is computed once and kept on the index (`ProgramIndex.derived`), so the next question of
an eval or a sweep only pays for the lookup.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter, defaultdict
from typing import ClassVar

import numpy as np

from pipeline.engine.errors import ConfigError
from stages.common.program.text import tokens, words
from stages.common.types import ProgramIndex, Window

FIELDS = ("name", "signature", "doc", "path", "text")
# field weights and BM25 saturation (k1) / length normalisation (b), written once: select's defaults (its
# *_weight, k1, b keywords) and the window ranking of pack and rescore (conf/relevance/select.yaml links them)
RELEVANCE = {"name": 4.0, "signature": 0.0, "doc": 0.3, "path": 0.8, "text": 0.1, "k1": 0.6, "b": 0.75}


def check_relevance(owner: str, relevance: dict) -> dict[str, float]:
    """``relevance`` completed with the defaults (a key that is absent or null takes ``RELEVANCE``'s value); an unknown
    key or a negative value is a ConfigError."""
    relevance = {k: v for k, v in relevance.items() if v is not None}
    unknown = sorted(set(relevance) - set(RELEVANCE))
    if unknown:
        raise ConfigError(f"{owner}: unknown relevance key '{unknown[0]}'; keys: {', '.join(RELEVANCE)}")
    merged = {**RELEVANCE, **relevance}
    bad = [k for k, v in merged.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0]
    if bad:
        raise ConfigError(f"{owner}: relevance.{bad[0]} must be a number >= 0, got {merged[bad[0]]!r}")
    return {k: float(v) for k, v in merged.items()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RelevanceConfig:
    """The config of a stage that ranks windows itself (pack, rescore): its ``relevance`` weights, select's by default
    (conf/relevance/select.yaml). Completed and checked on construction: after it, every key of RELEVANCE is a float."""

    owner: ClassVar[str] = "relevance"  # the config group, for the error message
    # a key that is absent or null (select=zoom has no weights) takes RELEVANCE's value
    relevance: dict[str, float] = dataclasses.field(default_factory=lambda: dict(RELEVANCE))

    def __post_init__(self) -> None:
        object.__setattr__(self, "relevance", check_relevance(self.owner, self.relevance))


def stem(word: str) -> str:
    """A light suffix stripper (plural, -ing, -ed, final e/y): enough to join inflections of code words."""
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if word.endswith("ing") and len(word) > 5:
        word = word[:-3]
    elif word.endswith("ed") and len(word) > 4:
        word = word[:-2]
    if len(word) > 3 and word[-1] in "ey":
        word = word[:-1]
    return word


def terms(text: str) -> list[str]:
    # a compound is joined without underscores so that render_table and renderTable are one term
    return [t for word in words(text) for t in _word_terms(word)]


@functools.lru_cache(maxsize=1 << 18)
def _word_terms(word: str) -> tuple[str, ...]:
    """One word's terms (tokens() of the word alone, stemmed): words repeat, a 10,000-file tree's windows split the
    same identifiers millions of times."""
    return tuple(stem(t.replace("_", "")) for t in tokens(word))


@dataclasses.dataclass
class WindowFields:
    windows: list[Window]
    postings: dict[str, dict[str, list[tuple[int, int]]]]  # field -> term -> [(window, count)]
    lengths: list[int]
    average: float
    idf: dict[str, float]
    by_path: dict[str, list[int]]


def window_fields(index: ProgramIndex) -> WindowFields:
    return index.derived("scoring.window_fields", lambda: _build(index))


def _build(index: ProgramIndex) -> WindowFields:
    postings: dict[str, dict[str, list[tuple[int, int]]]] = {f: defaultdict(list) for f in FIELDS}
    lengths: list = []
    df: Counter[str] = Counter()
    by_path: dict[str, list] = defaultdict(list)
    path_terms = {}
    for i, window in enumerate(index.windows):
        # class attributes (`Context.info_name`) stay out of the name fields: in a class's window they outweighed its
        # methods for questions that only share a word with them; they are found by their text and as named code
        inside = [s for s in index.symbols_in(window.path) if window.start <= s.start <= window.end and s.kind != "attribute"]
        if window.kind == "head":
            inside = [s for s in inside if "." not in s.qualname]
        if window.path not in path_terms:
            path_terms[window.path] = Counter(terms(window.path.rsplit(".", 1)[0]))
        text = Counter(terms("\n".join(index.lines(window.path)[window.start - 1 : window.end])))
        counts = {
            "name": Counter(t for s in inside for t in terms(s.qualname)),
            "signature": Counter(t for s in inside for t in terms(s.signature)),
            "doc": Counter(t for s in inside for t in terms(s.doc)),
            "path": path_terms[window.path],
            "text": text,
        }
        for field, counter in counts.items():
            for term, count in counter.items():
                postings[field][term].append((i, count))
        df.update(set().union(*counts.values()))
        lengths.append(sum(text.values()) or 1)
        by_path[window.path].append(i)
    n = len(index.windows)
    idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
    return WindowFields(list(index.windows), {f: dict(p) for f, p in postings.items()}, lengths,
                        sum(lengths) / max(1, n), idf, dict(by_path))


def score_windows(index: ProgramIndex, prompt: str, relevance: dict[str, float]) -> dict[int, float]:
    """BM25F score of every window that shares a term with ``prompt`` (window position in the index -> score)."""
    wf = window_fields(index)
    k1, b = relevance["k1"], relevance["b"]
    weights = {f: relevance[f] for f in FIELDS}
    query = list(dict.fromkeys(terms(prompt)))
    scores: dict[int, float] = defaultdict(float)
    for term in query:
        idf = wf.idf.get(term)
        if idf is None:
            continue
        weighted: dict[int, float] = defaultdict(float)
        for field, weight in weights.items():
            if weight:
                for i, count in wf.postings[field].get(term, ()):
                    weighted[i] += weight * count
        for i, tf in weighted.items():
            norm = k1 * (1 - b + b * wf.lengths[i] / wf.average)
            scores[i] += idf * tf * (k1 + 1) / (tf + norm)
    return dict(scores)


def standardise(values):
    """z-scores of a float array (all zeros when the values do not vary, or there are none): puts two rankings on one
    scale."""
    spread = values.std() if values.size else 0.0
    return (values - values.mean()) / spread if spread > 0 else values * 0.0


def fuse(sparse: dict[int, float], dense: np.ndarray, weight: float, shift: bool = True) -> np.ndarray:
    """``weight·z(dense) + (1 − weight)·z(sparse)`` per window; with ``shift`` moved so that the lowest is 0 (select and
    pack treat 0 as "no match")."""
    bm: np.ndarray = np.zeros(len(dense), dtype=np.float64)
    for i, value in sparse.items():
        bm[i] = value
    fused = weight * standardise(dense.astype(np.float64)) + (1 - weight) * standardise(bm)
    return fused - fused.min() if shift and len(fused) else fused


def dense_rows(windows: int, sparse: dict[int, float], all_below: int | None, candidates: int) -> list[int] | None:
    """The windows to embed: None (all) for a program of at most ``all_below`` windows, else the ``candidates`` best
    by BM25F among those it scores above 0 (ties: earlier first), in window order."""
    if all_below is None or windows <= all_below:
        return None
    best = sorted((i for i, v in sparse.items() if v > 0), key=lambda i: (-sparse[i], i))[:candidates]
    return sorted(best)


def fuse_rows(sparse: dict[int, float], dense: np.ndarray, rows: list[int] | None, windows: int, weight: float
              ) -> np.ndarray:
    """`fuse` (unshifted) over every window (``rows`` None) or over the candidate ``rows`` that ``dense`` holds, every
    other window below them all (0, "no match", once shifted)."""
    if rows is None:
        return fuse(sparse, dense, weight, shift=False)
    among = fuse({j: sparse[r] for j, r in enumerate(rows)}, dense, weight, shift=False)
    fused: np.ndarray = np.full(windows, (among.min() if len(among) else 0.0) - 1.0)
    fused[rows] = among
    return fused
