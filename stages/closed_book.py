"""Stages of the closed-book symbol test (`pipeline=closed_book`): does the model know the program?

For every question of a docs/behaviour.md §9 set, with no evidence in the prompt, every definition name of the program is
scored by the model's likelihood of answering with it (one prompt forward, candidates packed over its KV cache:
`stages/common/generation/continuations.py`), and the gold definition's rank is recorded (scoring:
stages/common/retrieval/evaluation.py). Wired to `model.lm` it measures the plain model, to `mix.lm` the model as
an answer would mix it (the real mix path), so `-m synth=none,hashed,fitted` compares adapters. `score=pmi` subtracts each name's log-likelihood under the same prompt with an empty question
(one more forward for the whole run), so a name the model favours whatever is asked gains nothing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from pipeline.engine import resources
from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import InputError
from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.adapters.lock import exclusive
from stages.common.generation.continuations import encode_prefix, score_continuations
from stages.common.retrieval.evaluation import (
    QuestionSet,
    candidate_names,
    definition_keywords,
    gold_name,
    ranking_metrics,
    ranks,
    shares_words,
)
from stages.common.tokens import encode_chat, encode_text, encode_texts
from stages.common.types import LanguageModel, ProgramIndex

log = logging.getLogger(__name__)


class ClosedBookRanking(Stage):
    """Rank all definition names of the program for each question, no evidence shown."""

    outputs = {"ranking": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        prompt: str = ("In the Python program `{program}`, which function, class or method does this: {question}\n"
                       "Answer with its name only.")
        chat: bool = True  # wrap the prompt in the model's chat template (the reply starts after it)
        prefix: str = ""  # text the reply starts with, before the candidate
        candidate: str = "`{name}`"  # what is scored after the prompt ({name}, {keyword}: def|class)
        score: Literal["sum", "mean", "pmi"] = "pmi"
        chunk_tokens: Annotated[int, Range(ge=1)] = 512  # candidate tokens per forward over the prompt's KV cache
        top: Annotated[int, Range(ge=1)] = 5  # names kept per question in closed_book.json
        progress: bool = True
        reuse_plain: bool = False  # set by the graph on the node wired to the unmixed model only

        def __post_init__(self) -> None:
            for name, template, fields in (("prompt", self.prompt, ("program", "question")),
                                           ("candidate", self.candidate, ("name", "keyword"))):
                try:
                    template.format(**{f: "" for f in fields})
                except (KeyError, IndexError, ValueError) as err:
                    raise InputError(f"closed_book.{name}: bad template {template!r} ({err}); "
                                     f"fields: {', '.join(fields)}") from err
            if "{name}" not in self.candidate:
                raise InputError(f"closed_book.candidate {self.candidate!r} must contain {{name}}")

    config: Config

    def _prompt_ids(self, lm: LanguageModel, program: str, question: str) -> list[int]:
        c, tok = self.config, lm.tokenizer
        content = c.prompt.format(program=program, question=question)  # the program's name and the question: data
        if c.chat and tok.chat_template:
            return encode_chat(tok, [{"role": "user", "content": content}], reply=c.prefix)[1]
        return encode_text(tok, content + c.prefix)

    def _scores(self, lm: LanguageModel, prompt_ids: list[int], candidates: list[list[int]], reduce: str) -> np.ndarray:
        per_token = score_continuations(lm.model, encode_prefix(lm.model, prompt_ids), candidates, self.config.chunk_tokens)
        return np.array([sum(s) / len(s) if reduce == "mean" else sum(s) for s in per_token], dtype=np.float64)

    def run(self, index: ProgramIndex, questions: QuestionSet, lm: LanguageModel) -> dict:
        if not self.config.reuse_plain:
            with exclusive(lm):  # the model as this graph mixed it (or plain), never another thread's mix
                return {"ranking": self._rank(index, questions, lm)}
        # the plain model's ranking is the same in every job of a sweep over adapters: compute it once per process
        c = self.config
        key = (id(lm.model), lm.model_id, index.fingerprint, index.root.name, c.prompt, c.chat, c.prefix, c.candidate,
               c.score, c.top, tuple((q.question, q.path, q.start, q.symbol) for q in questions.questions))
        with exclusive(lm):
            return {"ranking": resources.shared("closed-book-plain", key, lambda: self._rank(index, questions, lm), keep=4)}

    def _rank(self, index: ProgramIndex, questions: QuestionSet, lm: LanguageModel) -> dict:
        from tqdm import tqdm

        c = self.config
        names = candidate_names(index)
        if not names:
            raise InputError(f"program_root '{index.root}' defines no function or class to rank")
        tok = lm.tokenizer
        keyword = definition_keywords(index)
        candidates = encode_texts(tok, [c.candidate.format(name=n, keyword=keyword[n]) for n in names])
        position = {n: i for i, n in enumerate(names)}
        program = index.root.name
        prior = None
        if c.score == "pmi":  # the same prompt with no question: what the model says whatever is asked
            prior = self._scores(lm, self._prompt_ids(lm, program, ""), candidates, "sum")
        rows = []
        for q in tqdm(questions.questions, desc="closed book", unit="q", disable=not c.progress):
            gold = gold_name(index, q)
            if gold not in position:
                raise InputError(f"question '{q.question[:60]}': its definition '{gold}' is not a name of the program")
            scores = self._scores(lm, self._prompt_ids(lm, program, q.question), candidates,
                                  "mean" if c.score == "mean" else "sum")
            if prior is not None:
                scores = scores - prior
            rank = int(ranks(scores)[position[gold]])
            best = np.argsort(-scores, kind="stable")[: c.top]
            rows.append({"question": q.question, "path": q.path, "start": q.start, "gold": gold, "rank": rank,
                         "top": [names[i] for i in best], "shares_words": shares_words(gold, q.question)})
        return {"candidates": len(names), "score": c.score, "questions": rows}


class ClosedBookReport(Stage):
    """Plain vs mixed closed-book metrics, printed and written to `closed_book.json` in the run folder."""

    outputs = {"report": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        k: Annotated[int, Range(ge=1)] = 5  # top-k in the report, besides top-1

    config: Config

    def run(self, context: RunContext, plain: dict, mixed: dict, mix_report: dict | None = None) -> dict:
        k = self.config.k
        key = f"top{k}"
        plain_metrics, mixed_metrics = ranking_metrics(plain, k), ranking_metrics(mixed, k)
        report: dict[str, Any] = {"plain": plain_metrics, "mixed": mixed_metrics, "score": mixed.get("score")}
        low = plain_metrics.get(key)
        report[f"{key}_ratio"] = round(mixed_metrics[key] / low, 4) if low else None  # None: plain never ranked it
        report["overrides"] = list(context.overrides)
        if mix_report:
            report.update({name: mix_report.get(name) for name in ("synth", "rank", "gsub", "alpha", "ablate")})
        report["per_question"] = [{**m, "plain_rank": p["rank"], "plain_top": p["top"]}
                                  for m, p in zip(mixed["questions"], plain["questions"])]
        write_atomic(Path(context.run_dir) / "closed_book.json", json.dumps(report, indent=2, default=str))
        for name in ("plain", "mixed"):
            m = report[name]
            log.info("closed book %-5s top-1 %.3f  %s %.3f  MRR %.3f  mean rank %.1f of %d (%d questions)", name,
                     m.get("top1", 0), key, m.get(key, 0), m.get("mrr", 0), m.get("mean_rank", 0),
                     m.get("candidates", 0), m.get("questions", 0))
        return {"report": {k: v for k, v in report.items() if k != "per_question"}}
