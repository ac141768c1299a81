"""Stages `rerank` and `rescore` (SPEC §5): reorder the selection.

`rerank` (before capacity) reorders the selected files by cheap relevance proxies (`rerank=heuristic|none`).
`rescore` (between mix and pack, so it may read the model with the program's adapter mixed in) re-ranks candidate
windows: `rescore=none` passes the selection on, `rerank=lm` (= `rerank=none` + `rescore=lm`) scores them with the LM.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import numpy as np

from pipeline.engine.stage import Range, Stage
from stages.common.retrieval.scoring import RELEVANCE, check_relevance, score_windows, standardise, terms, window_fields
from stages.common.types import LanguageModel, ProgramIndex, Selection, Window


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
            modules=[m for m in (index.files[p].module for p in order) if m],
        )
        return {"selection": reranked}


class KeepOrder(Stage):
    """`rerank=none`: the selection passes through in select's order (same ports as every rerank)."""

    outputs = {"selection": Selection}

    def run(self, index: ProgramIndex, selection: Selection, prompt: str) -> dict:
        return {"selection": selection}


class KeepRanking(Stage):
    """`rescore=none` (default): the selection goes to pack as it is (same ports as every rescore)."""

    outputs = {"selection": Selection}

    def run(self, index: ProgramIndex, selection: Selection, prompt: str, lm: LanguageModel | None = None) -> dict:
        return {"selection": selection}


class LMRescore(Stage):
    """`rerank=lm` (node `rescore`, after mix): the model, with the program's adapter mixed in, reads each candidate
    window and scores the question as its continuation; that log-likelihood is fused with the incoming ranking.

    Candidates: the best `candidates` windows of the selected files (the selection's own window ranking when
    select ranked windows, else BM25F relevance). Per candidate, the text is the window's `[ctx]` block (code cut at
    `max_window_tokens`) then `question_prefix`; the score is the summed log-probability of the question's tokens
    (the same tokens for every candidate, so sum and mean rank alike). Fused score:
    ``weight·z(log-likelihood) + (1 − weight)·z(incoming score)`` over the candidates. Files are re-ordered by their
    best candidate and every file's windows go to pack in fused order (non-candidates after)."""

    outputs = {"selection": Selection}

    def __init__(self, candidates: Annotated[int, Range(ge=1)] = 16, weight: Annotated[float, Range(ge=0, le=1)] = 0.5,
                 max_window_tokens: Annotated[int, Range(ge=16)] = 256, batch_size: Annotated[int, Range(ge=1)] = 4,
                 question_prefix: str = "\n\n# What the code above does: ",
                 relevance: dict = dict(RELEVANCE)):
        self.candidates, self.weight, self.max_window_tokens = candidates, weight, max_window_tokens
        self.batch_size, self.question_prefix = batch_size, question_prefix
        self.relevance = check_relevance("rescore", relevance)

    def run(self, index: ProgramIndex, selection: Selection, prompt: str, lm: LanguageModel) -> dict:
        ranking = selection.window_ranking or _relevance_ranking(index, selection, prompt, self.relevance)
        pool = [(score, w) for path in selection.files for score, w in ranking.get(path, [])]
        pool.sort(key=lambda item: -item[0])  # stable: ties keep file order, then window order
        chosen = pool[: self.candidates]
        if len(chosen) < 2:
            return {"selection": selection}
        likelihood = question_likelihood(lm, index, [w for _, w in chosen], prompt, self.question_prefix,
                                         self.max_window_tokens, self.batch_size)
        prior = np.array([score for score, _ in chosen], dtype=np.float64)
        fused = self.weight * standardise(likelihood) + (1 - self.weight) * standardise(prior)
        fused = fused - fused.min() + 1.0  # > 0: every candidate may be shown (pack treats 0 as "no match")
        rescored = {w: float(f) for (_, w), f in zip(chosen, fused)}
        out: dict[str, list[tuple[float, Window]]] = {}
        for path in selection.files:
            ranked = ranking.get(path, [])
            mine = sorted(((round(rescored[w], 6), w) for _, w in ranked if w in rescored), key=lambda it: -it[0])
            out[path] = mine + [(0.0, w) for _, w in ranked if w not in rescored]
        best = {p: (out[p][0][0] if out[p] else 0.0) for p in selection.files}
        order = sorted(selection.files, key=lambda p: (-best[p], selection.files.index(p)))
        reranked = dataclasses.replace(
            selection, files=order, scores={p: round(best[p], 4) for p in order}, window_ranking=out,
            modules=[m for m in (index.files[p].module for p in order) if m],
        )
        return {"selection": reranked}


def _relevance_ranking(index: ProgramIndex, selection: Selection, prompt: str,
                       relevance: dict[str, float]) -> dict[str, list[tuple[float, Window]]]:
    scores = score_windows(index, prompt, relevance)
    wanted = set(selection.files)
    out: dict[str, list[tuple[float, Window]]] = {}
    for i, window in enumerate(index.windows):
        if window.path in wanted:
            out.setdefault(window.path, []).append((round(scores.get(i, 0.0), 4), window))
    for ranked in out.values():
        ranked.sort(key=lambda item: (-item[0], item[1].start))
    return out


def question_likelihood(lm: LanguageModel, index: ProgramIndex, windows: list[Window], question: str, prefix: str,
                        max_window_tokens: int, batch_size: int) -> np.ndarray:
    """Summed log P(question tokens | window block + prefix) under ``lm`` (whatever adapter is mixed in), batched."""
    import torch

    tok = lm.tokenizer
    q_ids = tok(prefix + question.strip(), add_special_tokens=False)["input_ids"]
    sequences = []
    for w in windows:
        lines = index.lines(w.path)[w.start - 1 : w.end]
        code = tok("\n".join(lines), add_special_tokens=False)["input_ids"][:max_window_tokens]
        header = tok(f"[ctx] path: {w.path}:{w.start}-{w.end}\n", add_special_tokens=False)["input_ids"]
        sequences.append(header + code)
    model = lm.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: np.ndarray = np.zeros(len(windows), dtype=np.float64)
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = [s + q_ids for s in sequences[start : start + batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):  # right padding: a causal model's real positions never see the pad
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for row, seq in enumerate(batch):
                first = len(seq) - len(q_ids)  # position of the first question token
                targets = torch.tensor(seq[first:], device=logp.device)
                picked = logp[row, first - 1 : len(seq) - 1].gather(1, targets[:, None])
                out[start + row] = float(picked.sum())
    return out
