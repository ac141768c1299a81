"""Citations `path:START-END` in an answer: parsing, validation against packed evidence, the pass rule.

Validation uses the `Evidence` records, never the prompt text, so a program file that *contains*
`[ctx] path: other.py:1-9` cannot make `other.py:1-9` valid.
"""
from __future__ import annotations

import bisect
import dataclasses
import posixpath
import re
from collections.abc import Callable, Iterator, Sequence

from stages.common.types import Citation, CitationReport, Evidence, ProgramIndex

# `[path:A-B]` (any path characters but brackets and line breaks: spaces and unicode too), or a bare `path:A-B`
# whose path has a folder or an extension (`core.py:3`, `/etc/passwd:1-5`), optionally after `path:`. Line numbers are
# ASCII digits only (`١-٣` is no line range). The bare form is found by `CitationPattern` in linear time; as a regex,
# (?:path:\s*)?(/?(?:[\w.-]+/)+[\w.-]+|[\w./-]+\.\w+):([0-9]+)(?:-([0-9]+))?, it backtracks quadratically.
BRACKETED = re.compile(r"\[(?:path:\s*)?([^\[\]\n]+?):([0-9]+)(?:-([0-9]+))?\]")
_RUN = re.compile(r"[\w./-]+")  # the characters a bare path is made of
_LINES = re.compile(r":([0-9]+)(?:-([0-9]+))?")
_SPACE = re.compile(r"\s")
_SEPARATOR = re.compile(r"[ \t\n(\[`'\"<]")  # where a token (a URL) starts
VERSION = re.compile(r"^v?[0-9]+(\.[0-9]+)+$")


@dataclasses.dataclass(frozen=True)
class CitationMatch:
    """One citation-looking span of a text, as ``CitationPattern.finditer`` finds it (``start()``, ``end()`` and
    ``group()`` as a regex match has them)."""

    string: str = dataclasses.field(repr=False)
    begin: int
    stop: int
    path: str  # as written, before it is normalised
    first: str
    last: str | None

    def start(self) -> int:
        return self.begin

    def end(self) -> int:
        return self.stop

    def group(self) -> str:
        return self.string[self.begin:self.stop]


class CitationPattern:
    """Every `[path:A-B]` and bare `path:A-B` of a text, leftmost first and not overlapping, as one regex of the two
    forms would find them, in time linear in the text: a bare path is only looked for before a `:` and a digit, and
    its start is worked out from the run of path characters in front of it instead of tried at every position."""

    def finditer(self, text: str) -> Iterator[CitationMatch]:
        brackets = BRACKETED.finditer(text)
        bracket = next(brackets, None)
        runs = {m.end(): m.start() for m in _RUN.finditer(text)}
        done = 0  # where the last match ended: the next one starts there or later
        for lines in _LINES.finditer(text):
            colon = lines.start()
            bare = _bare(text, runs, done, colon)
            while bracket is not None and (bare is None or bracket.start() < bare[0]) and bracket.start() < colon:
                yield CitationMatch(text, bracket.start(), bracket.end(), *bracket.group(1, 2, 3))
                done = bracket.end()
                bracket = next(brackets, None)
            if bare is not None and bare[0] >= done:  # not inside a bracketed citation just found
                yield CitationMatch(text, bare[0], lines.end(), text[bare[1]:colon], *lines.group(1, 2))
                done = lines.end()
        while bracket is not None:
            yield CitationMatch(text, bracket.start(), bracket.end(), *bracket.group(1, 2, 3))
            bracket = next(brackets, None)

    def search(self, text: str) -> CitationMatch | None:
        return next(self.finditer(text), None)

    def sub(self, replacement: str, text: str) -> str:
        out, cursor = [], 0
        for match in self.finditer(text):
            out += [text[cursor:match.start()], replacement]
            cursor = match.end()
        out.append(text[cursor:])
        return "".join(out)


def _bare(text: str, runs: dict[int, int], done: int, colon: int) -> tuple[int, int] | None:
    """(match start, path start) of the bare citation whose `:A` is at ``colon``, starting at ``done`` or later."""
    run_start = runs.get(colon)
    if run_start is None:
        return None
    lo = max(run_start, done)
    path = None
    dot = text.rfind(".", lo, colon)  # `x.ext`: the last dot with a character before it and word characters after it
    if lo < dot < colon - 1 and text.find("/", dot, colon) < 0 and text.find("-", dot, colon) < 0:
        path = lo
    else:  # `a/b`: segments joined by single slashes (an optional one in front), the last one not empty
        double = text.rfind("//", lo, colon)
        start = lo if double < 0 else double + 1
        inner = start + 1 if text.startswith("/", start) else start
        if text[colon - 1] != "/" and text.find("/", inner, colon) > inner:
            path = start
    if path is None:
        return None
    back = path  # an optional `path:` and spaces in front belong to the citation
    while path == lo and back > done and _SPACE.match(text, back - 1):
        back -= 1
    if path == lo and back - 5 >= done and text.startswith("path:", back - 5):
        return back - 5, path
    return path, path


CITATION = CitationPattern()


def paragraphs(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the non-empty paragraphs (blocks separated by blank lines)."""
    spans, start = [], 0
    for match in re.finditer(r"\n\s*\n", text):
        if text[start:match.start()].strip():
            spans.append((start, match.start()))
        start = match.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def parse_citations(text: str, index: ProgramIndex) -> list[tuple[int, int, str, int, int]]:
    """(char_start, char_end, path, start, end) of every citation-looking match that is a citation."""
    found = []
    separators = [m.start() for m in _SEPARATOR.finditer(text)]
    schemes = [m.start() for m in re.finditer("://", text)]
    for match in CITATION.finditer(text):
        raw_path, start, end = match.path.strip(), match.first, match.last
        at = bisect.bisect_left(separators, match.start())
        token_start = separators[at - 1] if at else -1
        scheme = bisect.bisect_right(schemes, match.end() - 3)
        if (scheme and schemes[scheme - 1] > token_start) or text[max(0, match.start() - 3):match.start()] == "://":
            continue  # part of a URL
        path = _normalise(raw_path, index)
        if VERSION.match(raw_path) and path not in index.files:
            continue  # a version string such as 1.2.3:4
        first = line_number(start)
        found.append((match.start(), match.end(), path, first, line_number(end) if end else first))
    return found


def line_number(digits: str) -> int:
    """A line number as written; one of more than 18 digits (past int()'s limit at 4,300) as 10**18: no such line."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10**18


def _normalise(path: str, index: ProgramIndex) -> str:
    root = str(index.root).rstrip("/") + "/"
    if path.startswith(root):
        path = path[len(root):]
    if path.startswith("./"):
        path = path[2:]
    return path


def validate(path: str, start: int, end: int, index: ProgramIndex, evidence: Evidence) -> str:
    """Why the citation is invalid ('' when valid)."""
    if path.startswith("/") or ".." in path.split("/") or posixpath.normpath(path) != path:
        return "path outside the program"
    record = index.files.get(path)
    if record is None:
        return "no such file in the program"
    if start < 1 or end < start or end > record.lines:
        return f"lines {start}-{end} do not exist ({path} has {record.lines} lines)"
    if not evidence.covers(path, start, end):
        return "span is not in the packed evidence"
    return ""


def check(text: str, index: ProgramIndex, evidence: Evidence, min_citations: int, per_paragraph: bool,
          must_cite: Sequence[str], source_of: Callable[[int], str] = lambda offset: "model") -> CitationReport:
    citations = []
    spans = paragraphs(text)
    starts = [start for start, _ in spans]
    by_paragraph = {span: 0 for span in spans}
    for char_start, char_end, path, start, end in parse_citations(text, index):
        reason = validate(path, start, end, index, evidence)
        citations.append(Citation(path, start, end, not reason, source_of(char_start), False, reason,
                                  text[char_start:char_end]))
        at = bisect.bisect_right(starts, char_start) - 1
        if not reason and at >= 0 and char_start < spans[at][1]:
            by_paragraph[spans[at]] += 1
    valid = sum(c.valid for c in citations)
    invalid = len(citations) - valid
    must = [m for m in must_cite if any(w.path == m.split(":")[0] for w in evidence.windows)]
    missing_must = [m for m in must if not any(c.valid and c.path == m.split(":")[0] for c in citations)]
    if per_paragraph:
        uncited = sum(1 for n in by_paragraph.values() if n == 0)
        passed, required = uncited == 0 and invalid == 0 and bool(by_paragraph), len(by_paragraph)
        reason = f"{uncited} of {len(by_paragraph)} paragraphs without a valid citation" if uncited else ""
    else:
        passed, required = valid >= min_citations and invalid == 0, min_citations
        reason = f"{valid} valid citations, {min_citations} required" if valid < min_citations else ""
    if invalid:
        reason = (reason + "; " if reason else "") + f"{invalid} invalid"
    if missing_must:
        passed = False
        reason = (reason + "; " if reason else "") + f"must-cite not cited: {', '.join(missing_must)}"
    return CitationReport(citations, passed, required, len(must), reason)
