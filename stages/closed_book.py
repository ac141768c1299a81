"""Stages of the closed-book symbol test (`pipeline=closed_book`, issue 17): does the model know the program?

For every question of a SPEC §9 set, with no evidence in the prompt, every definition name of the program is
scored by the model's likelihood of answering with it (one prompt forward, candidates packed over its KV cache:
`stages.common.generation.continuations`), and the gold definition's rank is recorded. Wired to `model.lm` it measures the plain
model, to `mix.lm` the model as an answer would mix it (the real mix path), so `-m synth=none,hashed,fitted`
compares adapters. `score=pmi` subtracts each name's log-likelihood under the same prompt with an empty question
(one more forward for the whole run), so a name the model favours whatever is asked gains nothing.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from pipeline.engine import resources
from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import InputError
from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.adapters.mixing import exclusive
from stages.common.generation.continuations import encode_prefix, score_continuations
from stages.common.program.text import token_set
from stages.common.retrieval.evaluation import QuestionSet
from stages.common.types import LanguageModel, ProgramIndex

log = logging.getLogger(__name__)


def candidate_names(index: ProgramIndex) -> list[str]:
    """Every distinct definition name of the program (functions, classes, methods), sorted."""
    return sorted({sym.name for sym in index.symbols})


def keywords(index: ProgramIndex) -> dict[str, str]:
    """name -> the Python keyword that defines it (`class` when any definition of that name is a class)."""
    out: dict[str, str] = {}
    for sym in index.symbols:
        if out.get(sym.name) != "class":
            out[sym.name] = "class" if sym.kind == "class" else "def"
    return out


def shares_words(name: str, question: str) -> bool:
    """Whether a part of the name (snake/camel split) starts like a word of the question (first 4 letters)."""
    words = {w[:4] for w in token_set(question)}
    return any(part[:4] in words for part in token_set(name))


def gold_name(index: ProgramIndex, question) -> str:
    if question.symbol:
        return question.symbol
    found = [s for s in index.symbols if s.path == question.path and s.start == question.start]
    if not found:
        raise InputError(f"question '{question.question[:60]}': no definition starts at {question.path}:{question.start}")
    return found[0].name


class ClosedBookRanking(Stage):
    """Rank all definition names of the program for each question, no evidence shown."""

    outputs = {"ranking": dict}

    def __init__(self, prompt: str = "In the Python program `{program}`, which function, class or method does this: "
                                     "{question}\nAnswer with its name only.",
                 chat: bool = True, prefix: str = "", candidate: str = "`{name}`",
                 score: Literal["sum", "mean", "pmi"] = "pmi", chunk_tokens: Annotated[int, Range(ge=1)] = 512,
                 top: Annotated[int, Range(ge=1)] = 5, progress: bool = True, reuse_plain: bool = False):
        for name, template, fields in (("prompt", prompt, ("program", "question")), ("candidate", candidate, ("name", "keyword"))):
            try:
                template.format(**{f: "" for f in fields})
            except (KeyError, IndexError, ValueError) as err:
                raise InputError(f"closed_book.{name}: bad template {template!r} ({err}); fields: {', '.join(fields)}") from err
        if "{name}" not in candidate:
            raise InputError(f"closed_book.candidate {candidate!r} must contain {{name}}")
        self.prompt, self.chat, self.prefix, self.candidate = prompt, chat, prefix, candidate
        self.score, self.chunk_tokens, self.top, self.progress = score, chunk_tokens, top, progress
        self.reuse_plain = reuse_plain  # set by the graph on the node wired to the unmixed model only

    def _prompt_ids(self, lm: LanguageModel, program: str, question: str) -> list[int]:
        tok = lm.tokenizer
        content = self.prompt.format(program=program, question=question)
        if self.chat and tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = content
        return tok(text + self.prefix, add_special_tokens=False)["input_ids"]

    def _scores(self, lm: LanguageModel, prompt_ids: list[int], candidates: list[list[int]], reduce: str) -> np.ndarray:
        per_token = score_continuations(lm.model, encode_prefix(lm.model, prompt_ids), candidates, self.chunk_tokens)
        return np.array([sum(s) / len(s) if reduce == "mean" else sum(s) for s in per_token], dtype=np.float64)

    def run(self, index: ProgramIndex, questions: QuestionSet, lm: LanguageModel) -> dict:
        if not self.reuse_plain:
            with exclusive(lm.model):  # the model as this graph mixed it (or plain), never another thread's mix
                return {"ranking": self._rank(index, questions, lm)}
        # the plain model's ranking is the same in every job of a sweep over adapters: compute it once per process
        key = (id(lm.model), lm.model_id, index.fingerprint, index.root.name, self.prompt, self.chat, self.prefix, self.candidate,
               self.score, self.top, tuple((q.question, q.path, q.start, q.symbol) for q in questions.questions))
        with exclusive(lm.model):
            return {"ranking": resources.shared("closed-book-plain", key, lambda: self._rank(index, questions, lm), keep=4)}

    def _rank(self, index: ProgramIndex, questions: QuestionSet, lm: LanguageModel) -> dict:
        from tqdm import tqdm

        names = candidate_names(index)
        if not names:
            raise InputError(f"program_root '{index.root}' defines no function or class to rank")
        tok = lm.tokenizer
        keyword = keywords(index)
        candidates = [tok(self.candidate.format(name=n, keyword=keyword[n]), add_special_tokens=False)["input_ids"]
                      for n in names]
        position = {n: i for i, n in enumerate(names)}
        program = index.root.name
        prior = None
        if self.score == "pmi":  # the same prompt with no question: what the model says whatever is asked
            prior = self._scores(lm, self._prompt_ids(lm, program, ""), candidates, "sum")
        rows = []
        for q in tqdm(questions.questions, desc="closed book", unit="q", disable=not self.progress):
            gold = gold_name(index, q)
            if gold not in position:
                raise InputError(f"question '{q.question[:60]}': its definition '{gold}' is not a name of the program")
            scores = self._scores(lm, self._prompt_ids(lm, program, q.question), candidates,
                                  "mean" if self.score == "mean" else "sum")
            if prior is not None:
                scores = scores - prior
            rank = int(ranks(scores)[position[gold]])
            best = np.argsort(-scores, kind="stable")[: self.top]
            rows.append({"question": q.question, "path": q.path, "start": q.start, "gold": gold, "rank": rank,
                         "top": [names[i] for i in best], "shares_words": shares_words(gold, q.question)})
        return {"candidates": len(names), "score": self.score, "questions": rows}


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every score among all of them (1 = highest; a tie shares the better rank)."""
    order = np.sort(scores)[::-1]
    return np.asarray(np.searchsorted(-order, -scores, side="left")) + 1


def metrics(ranking: dict, k: int, split: bool = True) -> dict:
    """top-1, top-k, MRR and ranks; with `split`, the same for the questions whose name shares no word with them."""
    ranked = np.array([row["rank"] for row in ranking["questions"]], dtype=np.float64)
    if not len(ranked):
        return {"questions": 0}
    out = {"questions": int(len(ranked)), "candidates": ranking["candidates"],
           "top1": round(float(np.mean(ranked <= 1)), 4), f"top{k}": round(float(np.mean(ranked <= k)), 4),
           "mrr": round(float(np.mean(1.0 / ranked)), 4), "mean_rank": round(float(ranked.mean()), 2),
           "median_rank": float(np.median(ranked))}
    if split:  # names that cannot be guessed from the question's words: what the model must know of the program
        unlike = {**ranking, "questions": [r for r in ranking["questions"] if not r.get("shares_words")]}
        out["no_shared_words"] = metrics(unlike, k, split=False)
    return out


class ClosedBookReport(Stage):
    """Plain vs mixed closed-book metrics, printed and written to `closed_book.json` in the run folder."""

    outputs = {"report": dict}

    def __init__(self, k: Annotated[int, Range(ge=1)] = 5):
        self.k = k

    def run(self, context: RunContext, plain: dict, mixed: dict, mix_report: dict | None = None) -> dict:
        key = f"top{self.k}"
        plain_metrics, mixed_metrics = metrics(plain, self.k), metrics(mixed, self.k)
        report: dict[str, Any] = {"plain": plain_metrics, "mixed": mixed_metrics, "score": mixed.get("score")}
        low = plain_metrics.get(key)
        report[f"{key}_ratio"] = round(mixed_metrics[key] / low, 4) if low else None  # None: plain never ranked it
        report["overrides"] = list(context.overrides)
        if mix_report:
            report.update({k: mix_report.get(k) for k in ("synth", "rank", "gsub", "alpha", "ablate")})
        report["per_question"] = [{**m, "plain_rank": p["rank"], "plain_top": p["top"]}
                                  for m, p in zip(mixed["questions"], plain["questions"])]
        write_atomic(Path(context.run_dir) / "closed_book.json", json.dumps(report, indent=2, default=str))
        for name in ("plain", "mixed"):
            m = report[name]
            log.info("closed book %-5s top-1 %.3f  %s %.3f  MRR %.3f  mean rank %.1f of %d (%d questions)", name,
                     m.get("top1", 0), key, m.get(key, 0), m.get("mrr", 0), m.get("mean_rank", 0),
                     m.get("candidates", 0), m.get("questions", 0))
        return {"report": {k: v for k, v in report.items() if k != "per_question"}}
