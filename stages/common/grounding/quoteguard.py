"""Code lines copied, not invented: the decode-time side of `stages/common/grounding/quotes.py` (`decode.constrain: quotes`).

`quotes.check_code` finds, after the fact, lines written as Python code that no packed window holds (a `def` with
a signature the program does not have, a docstring the stripped program never had). `QuoteGuard` applies the same
rule while decoding: once a line has *started* as a statement does (`STARTED`: `def name`, `class name`, an import,
a decorator, a docstring quote, `return`/`raise`, a block keyword, `name =`, `name(`), or goes on such a line as a
code block does (indented, or closing a bracket), it must stay a prefix of one line of the packed evidence
(whitespace collapsed, leading indentation ignored) and may end only as a whole one; citations may follow a whole
line, not stand inside one (`The [a.py:1-9] simplest [a.py:1-9] interface`). Every line `quotes.code_like` calls code has a prefix that `STARTED` matches, so a line the guard let
through is never an unverified code line.

Cost: only the ``k`` likeliest tokens are checked at each step (string checks on one line of text) and only the
allowed ones among them stay (sampling sees at most k tokens); when none of them is allowed, the allowed
continuations are enumerated from the evidence lines (never empty: a prefix of an evidence line can always go on
to its end).
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Iterable

from stages.common.grounding.citations import CITATION

STARTED = re.compile(
    r"""^(?:
      (?:async\s+)?def\s+\w
    | class\s+\w
    | import\s+[\w.]
    | from\s+[\w.]+\s+import\b
    | @[A-Za-z_]
    | \"\"\" | '''
    | (?:return|raise|yield|assert)\b\s*\S
    | (?:if|elif|while|for|with|try|except|else|finally)\b\s*\S
    | [A-Za-z_][\w.]*(?:\[[^\]]*\])?\s*[-+*/|&]?=
    | [A-Za-z_][\w.]*\(
    )""",
    re.X,
)
# a citation slot being opened at the end of a line ("[" after a space, "(" or nothing: where the grounding
# processor opens one): the slot completes it, and a complete citation is not part of the quote
_OPENER = re.compile(r"(^|[\s(])\[$")


def normal(line: str, ending: bool = False, cites: bool = False) -> str:
    """``line`` as the guard compares it: citations off, leading whitespace off, runs of whitespace as one space.
    While the line is being written (not ``ending``) a trailing space stays (the next token may go on after it)
    and, with ``cites`` (citation slots are on), a citation opener at its end is left out."""
    text = CITATION.sub(" ", line)
    if cites and not ending:
        text = _OPENER.sub(r"\1", text)
    body = " ".join(text.split())
    return body + " " if not ending and body and text[-1:].isspace() else body


class QuoteGuard:
    """What a line may become once it reads as code: a prefix of one of ``lines`` (the packed evidence)."""

    def __init__(self, texts: list[str], lines: Iterable[str], k: int = 64, cites: bool = False,
                 greedy: bool = False):
        # cites: a "[" opening a citation is completed by the grounding processor's citation slot (it sets this);
        # greedy: decoding takes the likeliest token, so the first allowed one is all a step needs to find
        self.texts, self.k, self.cites, self.greedy = texts, k, cites, greedy
        self.lines = sorted({body for line in lines if (body := normal(line, ending=True))})
        self.whole = frozenset(self.lines)
        # tokens by their text with whitespace runs collapsed (those holding a newline apart: they end the line)
        self.by_key: dict[str, list[int]] = {}
        self.newlines: list[int] = []
        for i, text in enumerate(texts):
            if "\n" in text:
                if not text.strip():
                    self.newlines.append(i)
            elif text:
                self.by_key.setdefault(re.sub(r"\s+", " ", text), []).append(i)
        self.longest = max(map(len, self.by_key), default=1)
        self.steered = 0  # steps at which the likeliest token was masked (the model was about to invent code)

    def __bool__(self) -> bool:
        return bool(self.lines)

    def is_prefix(self, body: str) -> bool:
        at = bisect.bisect_left(self.lines, body)
        return at < len(self.lines) and self.lines[at].startswith(body)

    @staticmethod
    def watched(line: str, body: str, block: bool) -> bool:
        """Whether the guard holds ``line`` (``body``: it normalised) to the evidence: it starts as a statement does,
        or it goes on a code block (``block``: the line before was held) indented or closing a bracket, as
        `quotes.code_blocks` reads a block."""
        return bool(body) and (STARTED.match(body) is not None or block and (line[:1].isspace() or body[0] in ")]}"))

    def valid(self, line: str, ending: bool = False, block: bool = False) -> bool:
        """A line being written must be a prefix of an evidence line; an ``ending`` one a whole evidence line (a
        model let off mid-line writes a fragment on each line: `except`, `e`, `for`, each a prefix of something)."""
        body = normal(line, ending, self.cites)
        if not self.watched(line, body, block):
            return True
        cited = self._first_citation(line, ending)
        if cited >= 0:  # citations only after a whole quoted line, nothing but citations after them
            return normal(line[:cited], ending=True) in self.whole and not normal(line[cited:], ending, self.cites)
        if ending:
            return body in self.whole
        if self.is_prefix(body):
            return True
        # a whole evidence line, then a space: a citation or the line's end may follow (no more code)
        return body.endswith(" ") and body[:-1] in self.whole

    def _first_citation(self, line: str, ending: bool) -> int:
        """Where the first citation of ``line`` starts (a complete one, or the opener of one being written), -1: none."""
        found = [m.start() for m in (CITATION.search(line),) if m]
        if self.cites and not ending and (opener := _OPENER.search(line)):
            found.append(opener.end() - 1)
        return min(found, default=-1)

    def ends_block(self, line: str, block: bool) -> bool:
        """The block state after the finished ``line``: whether the next line goes on a code block."""
        return self.watched(line, normal(line, ending=True), block)

    def allows(self, line: str, token: int, block: bool = False) -> bool:
        """Whether writing ``token`` after ``line`` (the text since the last newline; ``block``: the line before it
        was held) keeps every line valid."""
        *done, last = (line + self.texts[token]).split("\n")
        for part in done:
            if not self.valid(part, True, block):
                return False
            block = self.ends_block(part, block)
        return self.valid(last, False, block)

    def continuations(self, line: str, block: bool = False) -> list[int]:
        """Every token that ``line`` may go on with (its evidence lines' next characters), and the line's end."""
        body = normal(line, cites=self.cites)
        keys: set[str] = set()
        at = bisect.bisect_left(self.lines, body)
        while at < len(self.lines) and self.lines[at].startswith(body) and len(keys) < 20000:
            rest = self.lines[at][len(body):]
            keys.update(rest[:j] for j in range(1, min(len(rest), self.longest) + 1))
            at += 1
        found: list[int] = []
        for key in keys:
            found += self.by_key.get(key, ())
            if not body or body.endswith(" "):
                found += self.by_key.get(" " + key, ())
        return [t for t in found + self.newlines if self.allows(line, t, block)]

    def apply(self, scores, line: str, block: bool = False) -> None:
        """Keep, in one row of logits, the ``k`` likeliest tokens that do not make ``line`` code the evidence does not
        hold (sampling samples among them, as top-k sampling with k >= decode.top_k would; ``greedy`` keeps only the
        likeliest of them, what greedy decoding takes); if none of them is allowed, keep only the allowed
        continuations."""
        import torch

        if self.greedy:  # the likeliest token allowed: nothing else to find (one check, no top-k)
            best = int(scores.argmax())
            if scores[best] != float("-inf") and self.allows(line, best, block):
                keep = scores[best].clone()
                scores[:] = float("-inf")
                scores[best] = keep
                return
        k = min(self.k, scores.shape[-1])
        top = torch.topk(scores, k)
        candidates = [t for t, v in zip(top.indices.tolist(), top.values.tolist()) if v != float("-inf")]
        good = []
        for t in candidates:
            if self.allows(line, t, block):
                good.append(t)
                if self.greedy:
                    break
        self.steered += bool(candidates) and (not good or good[0] != candidates[0])
        allowed = good or self.continuations(line, block)
        keep = scores[allowed].clone()
        if not torch.isfinite(keep).any():  # every continuation masked by another guard: end the line
            allowed, keep = self.newlines, torch.zeros(len(self.newlines), dtype=scores.dtype, device=scores.device)
        scores[:] = float("-inf")
        scores[allowed] = keep
