"""What `pipeline.generate_answer` returns: the answer's text with its citations (and the code they cite), whether it
is grounded and why not, its confidence, its run folder and its telemetry record, all read from the run folder's files.

The confidence is the badge node's (docs/behaviour.md §5, the honest badge): a number in [0, 1] from the lead's margin,
the cited evidence's score and the checks; None for a run that did not compute one. It is not a probability that
the answer is right.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipeline.engine.records import Telemetry


@dataclasses.dataclass(frozen=True, kw_only=True)
class Citation:
    """A citation of the answer: lines ``start``..``end`` of ``path`` and the text of those lines."""

    path: str
    start: int
    end: int
    valid: bool
    source: str  # model | attributed (added by citation repair)
    code: str | None  # None: the lines are not a file inside the program root (a spoofed or stale citation)
    reason: str = ""  # why the citation is invalid
    removed: bool = False  # replaced in the text by a marker: the reader never sees it as evidence


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Answer:
    """One answer; ``str(answer)`` is its text and it compares equal to that text (``answer == "..."``)."""

    text: str
    citations: tuple[Citation, ...] = ()
    grounded: bool = False
    why: str = ""  # why the answer is not grounded; empty when it is
    confidence: float | None = None  # in [0, 1], the badge's; None: the run computed none
    run_dir: Path | None = None
    telemetry: Telemetry | None = None  # None: the run wrote no telemetry (a graph other than the answer graph)

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.text == other
        if isinstance(other, Answer):
            return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(self))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    def __contains__(self, part: str) -> bool:
        return part in self.text


def why_not(record: Telemetry, grounded: bool) -> str:
    """Why the answer of ``record`` is not grounded, in the words of what the record holds; "" when it is."""
    if grounded:
        return ""
    if record.status != "ok":
        return f"the run failed: {record.error}"
    if record.answer is None:
        return "no answer was recorded"
    if record.not_grounded:  # the badge node's phrases, one per failed check
        return "; ".join(record.not_grounded.values())
    if not record.citations:
        return "the answer cites no code"
    if not any(c.valid for c in record.citations):
        reasons = sorted({c.reason for c in record.citations if c.reason})
        count = len(record.citations)
        words = f"none of its {count} citations is valid" if count > 1 else "its one citation is not valid"
        removed = sum(c.removed for c in record.citations)
        return words + (f" ({'; '.join(reasons)})" if reasons else "") + (
            f"; {removed} removed from the text" if removed else "")
    reason = str((record.first_check or {}).get("reason") or "")
    if record.fallback_used:
        return "the citation check failed on the retry too" + (f" (the first draft: {reason})" if reason else "")
    return "the citation check failed" + (f": {reason}" if reason else "")


def answer_of(value: Any, run_dir: Path, settings: dict) -> Answer:
    """The Answer of the run in ``run_dir`` whose result is ``value``; ``settings`` are its report settings
    (`runfolder.settings_of`), which name the telemetry file and the program root the code is read from."""
    from pipeline.runfolder import RunFolder, read_lines

    text = "" if value is None else str(value)
    run = RunFolder.load(Path(run_dir), settings)
    record = run.record
    if record is None:
        return Answer(text=text, why="the run wrote no telemetry", run_dir=Path(run_dir))
    root = run.settings.get("program_root")
    citations = []
    for c in record.citations:
        lines, _ = read_lines(root, c.path, c.start, c.last)
        citations.append(Citation(path=c.path, start=c.start, end=c.last, valid=c.valid, source=c.source,
                                  code=None if lines is None else "\n".join(lines), reason=c.reason,
                                  removed=c.removed))
    grounded = bool(run.grounded())
    return Answer(text=text, citations=tuple(citations), grounded=grounded, why=why_not(record, grounded),
                  confidence=record.confidence, run_dir=Path(run_dir), telemetry=record)


def badge_words(record: Telemetry | None) -> str | None:
    """The badge beside its confidence, as the checks line and the chat show it (`grounded · confidence 0.72`,
    `not grounded: cut at max_new_tokens=256 · confidence 0.31`); None for a run without the badge node."""
    if record is None or record.confidence is None or record.grounded is None:
        return None
    head = "grounded" if record.grounded else f"not grounded: {why_not(record, False)}"
    return f"{head} · confidence {record.confidence:.2f}"
