"""Stage `baseline` (docs/behaviour.md §9): BM25 (bm25s) over the program's windows index, the eval's point of comparison.

Every window of the index (the same candidates our pack stage chooses from) is one BM25 document. A question
ranks all windows; the files are ranked by their best window. `tokenizer=plain` is bm25s' own tokenization
(lower-cased `\\w\\w+` words, English stop words); `tokenizer=code` also splits identifiers on snake/camel case
like our stages do, so the baseline is not handicapped on code. `with_path` adds the file path to each document.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Annotated, Literal

import numpy as np

from pipeline.engine.stage import Range, Stage
from stages.common.program.text import tokens
from stages.common.retrieval.evaluation import QuestionSet, Record, SystemRun
from stages.common.types import ProgramIndex

_PLAIN = re.compile(r"(?u)\b\w\w+\b")  # bm25s.tokenize's default token pattern


def plain_tokens(text: str) -> list[str]:
    from bm25s.stopwords import STOPWORDS_EN

    stop = set(STOPWORDS_EN)
    return [t for t in _PLAIN.findall(text.lower()) if t not in stop]


class BM25Windows(Stage):
    """Files and windows ranked by bm25s over the windows index, one document per window."""

    outputs = {"run": SystemRun}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        tokenizer: Literal["code", "plain"] = "code"
        with_path: bool = True
        k1: Annotated[float, Range(ge=0)] = 1.5
        b: Annotated[float, Range(ge=0, le=1)] = 0.75
        windows: Annotated[int, Range(ge=1)] = 8

    config: Config

    def run(self, index: ProgramIndex, questions: QuestionSet) -> dict:
        import bm25s

        c = self.config
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        split = tokens if c.tokenizer == "code" else plain_tokens
        started = time.perf_counter()
        docs = []
        for w in index.windows:
            text = "\n".join(index.lines(w.path)[w.start - 1 : w.end])
            docs.append(split(f"{w.path}\n{text}" if c.with_path else text))
        retriever = bm25s.BM25(k1=c.k1, b=c.b)
        retriever.index(docs, show_progress=False)
        setup = time.perf_counter() - started
        records = []
        for question in questions.questions:
            began = time.perf_counter()
            scores = retriever.get_scores(split(question.question))
            order = np.argsort(-scores, kind="stable")  # ties: index order, i.e. path then line
            ranked = [index.windows[i] for i in order]
            files = list(dict.fromkeys(w.path for w in ranked))
            shown = [(w.path, w.start, w.end) for w in ranked[: c.windows]]
            records.append(Record(files, shown, time.perf_counter() - began))
        detail = f"bm25s {c.tokenizer} tokens{' + path' if c.with_path else ''}, {len(docs)} windows"
        return {"run": SystemRun("bm25", records, setup, detail)}
