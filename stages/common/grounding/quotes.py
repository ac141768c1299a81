"""Lines of an answer written as Python code, and which of them the packed evidence does not contain.

A small model asked about code often "quotes" it: a `def` line with a signature the program does not have, a
docstring the stripped program never had, an assignment from nowhere. Written on a line of its own, such text reads
as if copied from the evidence. A line is *code-like* when it starts as a Python statement does (def, class, import,
a decorator, a docstring quote, return/raise/yield, a block opener ending in `:`, an assignment, or a bare call);
it is *verified* when, whitespace collapsed and markers and citations taken off, it occurs inside one line of a
packed window. `repair` drops (or marks) the unverified ones; telemetry counts them in the model's own text.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

from stages.common.grounding.citations import CITATION
from stages.common.types import Evidence

CodeAction = Literal["drop", "mark", "keep"]

CODE_LINE = re.compile(
    r"""^(?:
      (?:async\s+)?def\s+\w+\s*\(
    | class\s+\w+\s*[(:]
    | (?:import\s+[\w.]+|from\s+[\w.]+\s+import\b)
    | @[A-Za-z_][\w.]*
    | (?:\"\"\"|''')
    | (?:return|raise|yield|assert)\b\s*\S
    | (?:if|elif|while|for|with|try|except|else|finally)\b.*:$
    | [A-Za-z_][\w.]*(?:\[[^\]]*\])?\s*(?:[-+*/|&]?=)(?!=)\s*\S
    | [A-Za-z_][\w.]*\(.*\)$
    )""",
    re.X,
)
# what the pipeline appends to a line (citations, its own markers): not part of what the model quoted
_MARKER = re.compile(r"\[not in program\]|\[not in evidence\]")
MIN_CHARS = 6


def _normal(line: str) -> str:
    return " ".join(CITATION.sub(" ", _MARKER.sub(" ", line)).split())


def code_like(line: str) -> bool:
    text = _normal(line)
    return len(text) >= MIN_CHARS and CODE_LINE.match(text) is not None


@dataclasses.dataclass(frozen=True)
class CodeCheck:
    """The code-like lines of one text (0-based line numbers) and those no packed window contains."""

    lines: list[int]
    unverified: list[int]
    texts: list[str]  # the unverified lines, normalised


def _shown(evidence: Evidence) -> str:
    """Every packed line, whitespace collapsed, one per line: a piece of one line is a substring of this."""
    return "\n".join(" ".join(line.split()) for w in evidence.windows for line in w.text.splitlines())


def check_code(text: str, evidence: Evidence) -> CodeCheck:
    shown = _shown(evidence)
    lines, unverified, texts = [], [], []
    for number, line in enumerate(text.splitlines()):
        if not code_like(line):
            continue
        lines.append(number)
        body = _normal(line)
        if body not in shown:
            unverified.append(number)
            texts.append(body)
    return CodeCheck(lines, unverified, texts)


def _continues(line: str) -> bool:
    """A line inside a code block that is not a statement itself: an indented or bracket-closing line, or a short
    one ending like an unfinished statement (`self,`, `def f(`)."""
    body = _normal(line)
    return bool(body) and (line[:1].isspace() or body[0] in ")]}" or (len(body) <= 40 and body[-1] in ",([{\\"))


def code_blocks(text: str) -> list[tuple[int, int]]:
    """(first, last) line numbers of each run of code-shaped lines holding at least one code-like line."""
    blocks, start, has_code = [], None, False
    lines = text.splitlines()
    for number, line in enumerate([*lines, ""]):
        like = number < len(lines) and code_like(line)
        if like or (number < len(lines) and _continues(line)):
            start = number if start is None else start
            has_code = has_code or like
            continue
        if start is not None and has_code:
            blocks.append((start, number - 1))
        start, has_code = None, False
    return blocks


def handle_unverified(text: str, evidence: Evidence, action: CodeAction) -> str:
    """``drop``: every code block (consecutive code-shaped lines) that holds an unverified code line, or a
    continuation line no packed line holds, becomes one marker line, keeping the citations its lines carried;
    ``mark``: each unverified line ends with `[not in evidence]`; ``keep``: the text as it is."""
    if action == "keep":
        return text
    found = set(check_code(text, evidence).unverified)
    lines = text.splitlines()
    if action == "mark":
        if not found:
            return text
        out = [f"{line} [not in evidence]" if n in found else line for n, line in enumerate(lines)]
    else:
        out, cursor, shown = [], 0, _shown(evidence)
        for first, last in code_blocks(text):
            # a block reads as one quote: any line of it (continuation lines too) from nowhere leaves it all out
            if not any(n in found or _normal(lines[n]) not in shown for n in range(first, last + 1)):
                continue
            block = lines[first:last + 1]
            cites = " ".join(dict.fromkeys(m.group() for line in block for m in CITATION.finditer(line)))  # once each
            out += lines[cursor:first]
            out.append(f"[code not in the evidence: {len(block)} line{'s' * (len(block) > 1)} left out]"
                       + (f" {cites}" if cites else ""))
            cursor = last + 1
        if not cursor:
            return text
        out += lines[cursor:]
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")
