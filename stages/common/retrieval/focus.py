"""`focus=<file>[:<first>[-<last>]]`: the one file, and the lines of it, that a question is about.

select keeps that file alone and, of its windows, those overlapping the lines, ranked as the question ranks them.
The spelling is checked before any model loads (``parse``); the file and the lines once the program is indexed
(``focus_windows``).
"""
from __future__ import annotations

import dataclasses
import difflib
import re

from pipeline.engine.errors import InputError
from stages.common.types import ProgramIndex, Window

SPAN = re.compile(r"(\d{1,9})(?:-(\d{1,9}))?")


@dataclasses.dataclass(frozen=True)
class Focus:
    path: str  # POSIX, relative to the program root, as the index names its files
    first: int = 1
    last: int | None = None  # None: to the end of the file


def parse(spec: str) -> Focus:
    """``signer.py``, ``signer.py:180`` or ``signer.py:180-215`` (lines from 1, both ends included)."""
    text = spec.strip() if isinstance(spec, str) else ""
    path, colon, span = text.rpartition(":")
    if not colon:  # no colon: the whole file
        path = text
    match = SPAN.fullmatch(span) if colon else None
    first = int(match.group(1)) if match else 1
    last = int(match.group(2) or match.group(1)) if match else None
    path = path.removeprefix("./")
    if not path or (colon and match is None) or first < 1 or (last is not None and last < first):
        raise InputError(f"focus {spec!r} is not <file>[:<first>-<last>] with 1 <= first <= last "
                         "(e.g. focus=signer.py:180-215)")
    return Focus(path, first, last)


def focus_windows(index: ProgramIndex, focus: Focus, scores: dict[int, float]) -> tuple[str, list[tuple[float, Window]]]:
    """The focused file and its windows that overlap the lines, best first by ``scores`` (window position -> score;
    each shifted by 1 so that pack treats every one as a match). Lines no window covers are shown as one window."""
    record = index.files.get(focus.path)
    if record is None:
        close = difflib.get_close_matches(focus.path, list(index.files), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(index.files)} files under {index.location})"
        raise InputError(f"focus file '{focus.path}' is not in the program{hint}")
    last = record.lines if focus.last is None else focus.last
    if focus.first > record.lines:
        raise InputError(f"focus lines {focus.first}-{last} are outside {focus.path}, which has {record.lines} lines")
    last = min(last, record.lines)
    ranked = [(round(scores.get(i, 0.0), 6) + 1.0, w) for i, w in enumerate(index.windows)
              if w.path == focus.path and w.start <= last and focus.first <= w.end]
    if not ranked:
        ranked = [(1.0, Window(focus.path, focus.first, last, f"{focus.path}:{focus.first}-{last}", "focus"))]
    ranked.sort(key=lambda item: (-item[0], item[1].start))
    return focus.path, ranked
