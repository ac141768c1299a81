"""Stage `query` (docs/behaviour.md §5): the text retrieval searches with, the question and what it continues.

A chat follow-up ("and where is it called?") names little of what it asks about; its earlier turn does (the graph
input `history`, written by pipeline/followup.py: `Question: ...`, the answer, then each cited window as
`[earlier] path: <path>:<A>-<B>` and its code). `query=followup` (`FollowupQuery`) searches with the question, then
the earlier question (its first `question_chars` characters, on one line) and the qualnames of the program's
definitions that the earlier cited windows show (at most `names`, looked up in the index by path and lines: a path
the index does not hold adds nothing, and no file is read). The new question comes first, so a usage question is
still one ("where is it called" follows callers in `pack`). With no history the query is the question exactly.
`query=plain` (`PlainQuery`) searches with the question alone. The scaffold always shows the question as asked.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Annotated

from pipeline.engine.stage import Range, Stage
from stages.common.retrieval.aligned import definitions_in
from stages.common.types import ProgramIndex

QUESTION = "Question: "  # the first line of pipeline/followup.py's Turn.history()
CITED = re.compile(r"\[earlier\] path: (.+):(\d{1,9})-(\d{1,9})")  # a cited window's header in Turn.history()


def earlier_question(history: str, limit: int) -> str:
    """The earlier turn's question, printable characters on one line, cut at a word within ``limit`` characters."""
    first = history[: 4 * limit + 64].split("\n", 1)[0]  # a huge history is never split whole here
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in first.removeprefix(QUESTION)).split())
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rsplit(" ", 1)[0]
    return cut if len(cut) <= limit else text[:limit]


def cited_names(history: str, index: ProgramIndex, limit: int) -> list[str]:
    """Qualnames of the definitions the earlier cited windows show (the innermost one holding a window's first line,
    then those starting in it), each once, in citation order, at most ``limit``; spans of files the index lacks add none."""
    names: list[str] = []
    for line in history.splitlines():
        if len(names) >= limit:
            break
        found = CITED.fullmatch(line)
        if found is None or found[1] not in index.files:
            continue
        path, start, end = found[1], int(found[2]), int(found[3])
        defs = definitions_in(index, path)
        holding = [s for s in defs if s.start <= start <= s.end]
        inside = [s for s in defs if start <= s.start <= end]
        innermost = sorted(holding, key=lambda s: (s.start, -s.end))[-1:]
        for sym in innermost + inside:
            if sym.qualname not in names and len(names) < limit:
                names.append(sym.qualname)
    return names


class FollowupQuery(Stage):
    """`query=followup`: the question, then the earlier question and the earlier cited definitions' qualnames."""

    outputs = {"query": str}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        question_chars: Annotated[int, Range(ge=0)] = 300  # the earlier question's characters at most; 0: not carried
        names: Annotated[int, Range(ge=0)] = 8  # qualnames of the earlier cited definitions at most; 0: none

    config: Config

    def run(self, prompt: str, index: ProgramIndex, history: str | None = None) -> dict:
        c = self.config
        if not history:
            return {"query": prompt}
        parts = [earlier_question(history, c.question_chars) if c.question_chars else "",
                 " ".join(cited_names(history, index, c.names))]
        return {"query": "\n".join([prompt, *(p for p in parts if p)])}


class PlainQuery(Stage):
    """`query=plain`: retrieval searches with the question alone, a follow-up too (same ports as `query=followup`)."""

    outputs = {"query": str}

    def run(self, prompt: str, index: ProgramIndex, history: str | None = None) -> dict:
        return {"query": prompt}
