"""Stage `pack` (docs/behaviour.md §5): the evidence the model sees (`pack=windows|heads|function_first`).

Every block is the header `[ctx] path: <path>:<A>-<B>` followed by the exact source lines A..B. Blocks are
added best first while the total stays within `context_tokens` (counted with the model's tokenizer).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import Range, Stage
from stages.common.adapters.lock import exclusive
from stages.common.program.lines import split_lines
from stages.common.retrieval.aligned import aligned_window, arrange, question_terms
from stages.common.retrieval.scoring import RelevanceConfig, score_windows, window_fields
from stages.common.tokens import encode_chat, encode_text, encode_texts
from stages.common.types import Evidence, LanguageModel, PackedWindow, ProgramIndex, Selection, Window

log = logging.getLogger(__name__)


def cut(index: ProgramIndex, window: Window, score: float = 0.0) -> PackedWindow:
    """The window's exact lines, as the index cut them."""
    lines = index.lines(window.path)
    end = min(window.end, len(lines))
    return PackedWindow(window.path, window.start, end, "\n".join(lines[window.start - 1 : end]), score)


def fit(candidates: list[PackedWindow], lm: LanguageModel, context_tokens: int,
        order: Callable[[list[PackedWindow], Callable[[PackedWindow], int]], list[PackedWindow]] | None = None
        ) -> Evidence:
    """Add blocks in order while they fit; a block that does not fit is left out, smaller later ones may.
    ``order`` rearranges the candidates first, given how to count a block's tokens."""
    # a fast tokenizer is not safe to share between threads; lock the tokenizer, not the weights (which a
    # retrieval-only graph never loads)
    with exclusive(lm.tokenizer):
        if order is not None:
            candidates = order(candidates, lambda w: len(encode_text(lm.tokenizer, w.block() + "\n\n")))
        return _fit(candidates, lm.tokenizer, context_tokens, lm.model_id)


def _fit(candidates: list[PackedWindow], tokenizer, context_tokens: int, tokenizer_name: str = "") -> Evidence:
    packed: list[PackedWindow] = []
    used, smallest = 0, None
    for window in candidates:
        if any(p.path == window.path and p.start <= window.start and window.end <= p.end for p in packed):
            continue  # its lines are already in the context
        cost = len(encode_text(tokenizer, window.block() + "\n\n"))
        if smallest is None or cost < smallest[0]:
            smallest = (cost, window)
        if used + cost > context_tokens:
            continue
        packed.append(window)
        used += cost
    if smallest is not None and not packed:
        cost, window = smallest
        raise ConfigError(
            f"pack.context_tokens={context_tokens} is smaller than one window (the smallest candidate, "
            f"{window.path}:{window.start}-{window.end}, needs {cost} tokens)"
        )
    return Evidence(packed, used, tokenizer_name)


def rank_windows(index: ProgramIndex, prompt: str, relevance: dict[str, float]) -> dict[str, list[tuple[float, Window]]]:
    """Per file, its windows best first by BM25F score against the prompt (ties: earlier first).

    The configs pass select's relevance weights, so the window that made select choose a file is the one packed.
    """
    scores = score_windows(index, prompt, relevance)
    ranked: dict[str, list[tuple[float, Window]]] = {}
    for path, positions in window_fields(index).by_path.items():
        scored = [(round(scores.get(i, 0.0), 4), index.windows[i]) for i in positions]
        scored.sort(key=lambda item: (-item[0], item[1].start))
        ranked[path] = scored
    return ranked


def interleave(firsts: list[PackedWindow], extras: list[PackedWindow], weight: float) -> list[PackedWindow]:
    """Files' best windows in selection order; a file's further window (score × ``weight``) goes in front of the
    first later best window that it outscores. ``weight`` 0: every file's best before any further window."""
    pending = sorted(extras, key=lambda w: -w.score)  # stable: a file's own windows keep their order
    placed: set[str] = set()
    order = []
    for first in firsts:
        ahead = [w for w in pending if w.path in placed and w.score * weight > first.score]
        order += ahead
        pending = [w for w in pending if w not in ahead]
        order.append(first)
        placed.add(first.path)
    return order + pending


def _disjoint(chosen: list[Window], window: Window) -> bool:
    return all(window.end < w.start or window.start > w.end for w in chosen)


class PackWindows(Stage):
    """Up to `windows_per_file` windows per selected file from the windows index, best-scoring first.

    A long file shows up to `windows_per_file` windows (default 4: the code that answers a how/why question is often
    a file's third best window), a further one before another file's weaker window."""

    outputs = {"evidence": Evidence}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(RelevanceConfig):
        owner: ClassVar[str] = "pack"
        context_tokens: Annotated[int, Range(ge=1)] = 2000
        windows_per_file: Annotated[int, Range(ge=1)] = 4
        second_window_weight: Annotated[float, Range(ge=0, le=1)] = 1.0
        align: Literal["definitions", "lines"] = "definitions"
        follow_calls: Annotated[int, Range(ge=0)] = 400

    config: Config

    def run(self, index: ProgramIndex, selection: Selection, prompt: str, lm: LanguageModel) -> dict:
        c = self.config
        # windows ranked by select/rescore themselves (select=hybrid, rescore=lm) are shown in their order
        by_file = selection.window_ranking or rank_windows(index, prompt, c.relevance)
        aligned, wanted = c.align == "definitions", question_terms(index, prompt)

        def shown(w: Window, score: float) -> PackedWindow:
            return aligned_window(index, w.path, w.start, w.end, score, wanted) if aligned else cut(index, w, score)

        firsts, extras = [], []
        for path in selection.files:
            ranked = by_file.get(path, [])
            if not ranked:
                continue
            best = ranked[0][1]
            firsts.append(shown(best, ranked[0][0]))
            # a further window adds lines the ones before it do not show (a short file's head window is its whole file)
            chosen = [best]
            for score, window in ranked[1:]:
                if len(chosen) >= c.windows_per_file or score <= 0:
                    break
                if _disjoint(chosen, window):
                    chosen.append(window)
                    extras.append(shown(window, score))
        candidates = interleave(firsts, extras, c.second_window_weight)
        return {"evidence": fit(candidates, lm, c.context_tokens,
                                lambda found, count: arrange(index, found, prompt, c.follow_calls, aligned, count))}


class PackHeads(Stage):
    """The first lines (head window) of each selected file."""

    outputs = {"evidence": Evidence}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        context_tokens: Annotated[int, Range(ge=1)] = 2000

    config: Config

    def run(self, index: ProgramIndex, selection: Selection, prompt: str, lm: LanguageModel) -> dict:
        heads = {w.path: w for w in index.windows if w.kind == "head"}
        candidates = [cut(index, heads[p]) for p in selection.files if p in heads]
        return {"evidence": fit(candidates, lm, self.config.context_tokens)}


class PackFunctionFirst(Stage):
    """Windows scored by the model's probability of "yes" to "Is this code relevant to the question?" minus
    `ff_noise_penalty` × their share of blank and comment lines, packed best first."""

    outputs = {"evidence": Evidence}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(RelevanceConfig):  # relevance orders the candidates before the model scores them
        owner: ClassVar[str] = "pack"
        context_tokens: Annotated[int, Range(ge=1)] = 2000
        ff_max_candidates: Annotated[int, Range(ge=1)] = 24
        ff_window_lines: Annotated[int, Range(ge=1)] = 80
        ff_noise_penalty: Annotated[float, Range(ge=0)] = 0.30
        ff_max_code_tokens: Annotated[int, Range(ge=16)] = 384

    config: Config

    def run(self, index: ProgramIndex, selection: Selection, prompt: str, lm: LanguageModel) -> dict:
        c = self.config
        by_file = selection.window_ranking or rank_windows(index, prompt, c.relevance)
        candidates: list[Window] = []
        for path in selection.files:
            for _, window in by_file.get(path, []):
                end = min(window.end, window.start + c.ff_window_lines - 1)
                candidates.append(Window(window.path, window.start, end, window.anchor, window.kind))
        candidates = candidates[: c.ff_max_candidates]
        scored = []
        for window in candidates:
            packed = cut(index, window)
            with exclusive(lm):  # the model as this graph mixed it, never another thread's mix
                p_yes = yes_probability(lm, prompt, packed, c.ff_max_code_tokens)
            score = p_yes - c.ff_noise_penalty * noise(packed.text)
            scored.append(PackedWindow(packed.path, packed.start, packed.end, packed.text, round(score, 4)))
        return {"evidence": fit(sorted(scored, key=lambda w: -w.score), lm, c.context_tokens)}


def noise(text: str) -> float:
    lines = split_lines(text) or [""]
    noisy = sum(1 for line in lines if not line.strip() or line.lstrip().startswith("#"))
    return noisy / len(lines)


def yes_probability(lm: LanguageModel, question: str, window: PackedWindow, max_code_tokens: int) -> float:
    import torch

    tok = lm.tokenizer
    ids = torch.tensor([relevance_ids(tok, question, window, max_code_tokens)], device=lm.model.device)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, -1].float()
    yes = _first_ids(tok, ["yes", "Yes", " yes", " Yes"])
    no = _first_ids(tok, ["no", "No", " no", " No"])
    pair = torch.stack([logits[yes].max(), logits[no].max()])
    return float(torch.softmax(pair, dim=0)[0])


def relevance_ids(tok, question: str, window: PackedWindow, max_code_tokens: int) -> list[int]:
    """The prompt asking whether ``window`` is relevant to ``question``; its code, path and question are data."""
    code = tok.decode(encode_text(tok, window.text)[:max_code_tokens])
    content = (f"Question: {question}\n\nCode from {window.path}:{window.start}-{window.end}:\n{code}\n\n"
               "Is this code relevant to the question? Answer yes or no.")
    if tok.chat_template:
        return encode_chat(tok, [{"role": "user", "content": content}])[1]
    return encode_text(tok, content + "\nAnswer:")


def _first_ids(tokenizer, words: list[str]) -> list[int]:
    return sorted({ids[0] for ids in encode_texts(tokenizer, words)})


class NoPack(Stage):
    """`pack=none` (pack_context off): an empty evidence set, so no citation can be valid."""

    outputs = {"evidence": Evidence}

    def run(self, index: ProgramIndex, selection: Selection, prompt: str, lm: LanguageModel) -> dict:
        return {"evidence": Evidence([], 0, lm.model_id)}
