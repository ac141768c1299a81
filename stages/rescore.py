"""Stage `rescore` (docs/behaviour.md §5): re-rank the candidate windows between mix and pack, so it may read the model with the
program's adapter mixed in: `rescore=lm` scores them with the LM, `rescore=none` (the default) passes them on.
`rerank=lm` is `rerank=none` with `rescore=lm`.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, ClassVar

import numpy as np

from pipeline.engine.stage import Range, Stage
from stages.common.retrieval.scoring import RelevanceConfig, score_windows, standardise
from stages.common.tokens import encode_text
from stages.common.types import LanguageModel, ProgramIndex, Selection, Window


class NoRescore(Stage):
    """`rescore=none` (default): the selection goes to pack as it is (same ports as every rescore)."""

    outputs = {"selection": Selection}

    def run(self, index: ProgramIndex, selection: Selection, prompt: str, lm: LanguageModel | None = None) -> dict:
        return {"selection": selection}


class LMRescore(Stage):
    """`rescore=lm` (also chosen by `rerank=lm`): the model, with the program's adapter mixed in, reads each candidate
    window and scores the question as its continuation; that log-likelihood is fused with the incoming ranking.

    Candidates: the best `candidates` windows of the selected files (the selection's own window ranking when
    select ranked windows, else BM25F relevance). Per candidate, the text is the window's `[ctx]` block (code cut at
    `max_window_tokens`) then `question_prefix`; the score is the summed log-probability of the question's tokens
    (the same tokens for every candidate, so sum and mean rank alike). Fused score:
    ``weight·z(log-likelihood) + (1 − weight)·z(incoming score)`` over the candidates. Files are re-ordered by their
    best candidate and every file's windows go to pack in fused order (non-candidates after)."""

    outputs = {"selection": Selection}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(RelevanceConfig):
        owner: ClassVar[str] = "rescore"
        candidates: Annotated[int, Range(ge=1)] = 16
        weight: Annotated[float, Range(ge=0, le=1)] = 0.5
        max_window_tokens: Annotated[int, Range(ge=16)] = 256
        batch_size: Annotated[int, Range(ge=1)] = 4
        question_prefix: str = "\n\n# What the code above does: "

    config: Config

    def run(self, index: ProgramIndex, selection: Selection, prompt: str, lm: LanguageModel) -> dict:
        c = self.config
        ranking = selection.window_ranking or _relevance_ranking(index, selection, prompt, c.relevance)
        pool = [(score, w) for path in selection.files for score, w in ranking.get(path, [])]
        pool.sort(key=lambda item: -item[0])  # stable: ties keep file order, then window order
        chosen = pool[: c.candidates]
        if len(chosen) < 2:
            return {"selection": selection}
        likelihood = question_likelihood(lm, index, [w for _, w in chosen], prompt, c.question_prefix,
                                         c.max_window_tokens, c.batch_size)
        prior = np.array([score for score, _ in chosen], dtype=np.float64)
        fused = c.weight * standardise(likelihood) + (1 - c.weight) * standardise(prior)
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
    q_ids, sequences = likelihood_ids(tok, index, windows, question, prefix, max_window_tokens)
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


def likelihood_ids(tok, index: ProgramIndex, windows: list[Window], question: str, prefix: str,
                   max_window_tokens: int) -> tuple[list[int], list[list[int]]]:
    """The question's ids (after ``prefix``) and each window's `[ctx]` block's ids; program text and question are data."""
    sequences = []
    for w in windows:
        code = encode_text(tok, "\n".join(index.lines(w.path)[w.start - 1 : w.end]))[:max_window_tokens]
        sequences.append(encode_text(tok, f"[ctx] path: {w.path}:{w.start}-{w.end}\n") + code)
    return encode_text(tok, prefix + question.strip()), sequences
