"""Citations `path:START-END` in an answer: parsing, validation against packed evidence, the pass rule.

Validation uses the `Evidence` records, never the prompt text, so a program file that *contains*
`[ctx] path: other.py:1-9` cannot make `other.py:1-9` valid.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Sequence

from stages.common.types import Citation, CitationReport, Evidence, ProgramIndex

# `[path:A-B]` (any path characters but brackets and line breaks: spaces and unicode too), or a bare `path:A-B`
# whose path has a folder or an extension (`core.py:3`, `/etc/passwd:1-5`), optionally after `path:`
BRACKETED = r"\[(?:path:\s*)?([^\[\]\n]+?):(\d+)(?:-(\d+))?\]"
BARE = r"(?:path:\s*)?(/?(?:[\w.-]+/)+[\w.-]+|[\w./-]+\.\w+):(\d+)(?:-(\d+))?"
CITATION = re.compile(f"{BRACKETED}|{BARE}")
VERSION = re.compile(r"^v?\d+(\.\d+)+$")


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
    for match in CITATION.finditer(text):
        bracketed = match.group(1) is not None
        raw_path, start, end = match.group(1, 2, 3) if bracketed else match.group(4, 5, 6)
        raw_path = raw_path.strip()
        token_start = max(text.rfind(c, 0, match.start()) for c in " \t\n([`'\"<")
        if "://" in text[token_start + 1 : match.end()] or text[max(0, match.start() - 3):match.start()] == "://":
            continue  # part of a URL
        path = _normalise(raw_path, index)
        if VERSION.match(raw_path) and path not in index.files:
            continue  # a version string such as 1.2.3:4
        found.append((match.start(), match.end(), path, int(start), int(end) if end else int(start)))
    return found


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
    by_paragraph = {span: 0 for span in paragraphs(text)}
    for char_start, char_end, path, start, end in parse_citations(text, index):
        reason = validate(path, start, end, index, evidence)
        citations.append(Citation(path, start, end, not reason, source_of(char_start), False, reason,
                                  text[char_start:char_end]))
        if not reason:
            for span in by_paragraph:
                if span[0] <= char_start < span[1]:
                    by_paragraph[span] += 1
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
