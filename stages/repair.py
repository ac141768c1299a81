"""Stage `repair` (docs/behaviour.md §5, citation repair): what reaches the user carries only evidence it was shown.

- Every invalid citation is replaced in the text by `[not in evidence: path:A-B]` and kept in telemetry with
  `valid: false, removed: true` (both `repair=overlap` and `repair=none`).
- Every code-like name the program does not contain (the `names` check) is followed by `[not in program]`.
- `code` (both variants): Python-looking lines of the answer that no packed window contains (stages/common/grounding/quotes.py)
  are left out (`drop`, the default: each code block holding one becomes a marker line that keeps its citations),
  marked `[not in evidence]` (`mark`) or kept (`keep`).
- `labels` (both variants): a citation labelled with a definition's name whose span does not define it
  (stages/common/grounding/labels.py) is followed by `[not where `name` is defined]` (`mark`, the default) or left (`keep`).
- `repair=overlap`: a paragraph that still has no valid citation gets the packed window it overlaps most
  (share of the paragraph's tokens found in the window; ties -> earlier window) appended as `[path:A-B]`,
  only when that share reaches `threshold`. Such citations are marked `source: attributed`.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

from pipeline.engine.stage import Range, Stage
from stages.common.grounding.citations import paragraphs, parse_citations
from stages.common.grounding.identifiers import mark_unknown
from stages.common.grounding.labels import LabelAction, mark_mislabels
from stages.common.grounding.quotes import CodeAction, handle_unverified
from stages.common.program.text import token_set
from stages.common.types import Answer, Citation, Evidence, PackedWindow, ProgramIndex


def mark_invalid(answer: Answer, index: ProgramIndex) -> tuple[str, list[Citation], list[tuple[int, int]]]:
    """Replace each invalid citation, at its own position, by a marker; return the new text, the citations
    (invalid ones flagged removed) and the character spans of the valid citations in the new text."""
    found = parse_citations(answer.text, index)
    if len(found) != len(answer.citations):  # the report was made from this very text; anything else is a bug
        raise ValueError(f"answer has {len(found)} citations but its report {len(answer.citations)}")
    pieces, cursor, valid_spans, kept = [], 0, [], []
    for (start, end, *_), citation in zip(found, answer.citations):
        pieces.append(answer.text[cursor:start])
        offset = sum(len(p) for p in pieces)
        if citation.valid:
            pieces.append(answer.text[start:end])
            valid_spans.append((offset, offset + end - start))
            kept.append(citation)
        else:
            pieces.append(f"[not in evidence: {citation.path}:{citation.start}-{citation.end}]")
            kept.append(dataclasses.replace(citation, removed=True))
        cursor = end
    pieces.append(answer.text[cursor:])
    return "".join(pieces), kept, valid_spans


def mark(answer: Answer, index: ProgramIndex) -> tuple[str, list[Citation]]:
    """The text a reader may see: invalid citations and unknown names marked (no citation added)."""
    text, citations, _ = mark_invalid(answer, index)
    return mark_unknown(text, answer.report.unknown_names), citations


def best_window(paragraph: str, windows: list[PackedWindow], window_tokens: list[set[str]]) -> tuple[float, PackedWindow | None]:
    words = token_set(paragraph)
    best, chosen = 0.0, None
    for window, tokens in zip(windows, window_tokens):
        share = len(words & tokens) / len(words) if words else 0.0
        if share > best:
            best, chosen = share, window
    return best, chosen


class MarkInvalidOnly(Stage):
    """`repair=none`: adds no citation; marks invalid citations, unknown names and mislabelled citations, and leaves
    out (or marks) code no packed window holds."""

    outputs = {"answer": Answer}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        code: CodeAction = "drop"  # Python-looking lines no packed window holds: drop, mark or keep
        labels: LabelAction = "mark"  # a citation labelled with a definition its span does not define: mark or keep

    config: Config

    def run(self, answer: Answer, index: ProgramIndex, evidence: Evidence) -> dict:
        text, citations = mark(answer, index)
        text = handle_unverified(mark_mislabels(text, index, self.config.labels), evidence, self.config.code)
        return {"answer": dataclasses.replace(answer, text=text, citations=citations)}


class AttributeByOverlap(Stage):
    """`repair=overlap`: marks as `repair=none` does, and a paragraph without a valid citation gets the packed window
    it overlaps most."""

    outputs = {"answer": Answer}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(MarkInvalidOnly.Config):
        threshold: Annotated[float, Range(ge=0, le=1)] = 0.25  # share of a paragraph's tokens found in the window

    config: Config

    def run(self, answer: Answer, index: ProgramIndex, evidence: Evidence) -> dict:
        text, citations, valid_spans = mark_invalid(answer, index)
        window_tokens = [token_set(w.text) for w in evidence.windows]
        pieces, cursor, added = [], 0, []
        for start, end in paragraphs(text):
            body = text[start:end]
            has_valid = any(start <= a < end for a, _ in valid_spans)
            pieces.append(text[cursor:end])
            cursor = end
            if has_valid:
                continue
            share, window = best_window(body, evidence.windows, window_tokens)
            if window is not None and share >= self.config.threshold:
                pieces.append(f" [{window.path}:{window.start}-{window.end}]")
                added.append(Citation(window.path, window.start, window.end, True, "attributed", False,
                                      f"token overlap {share:.2f}"))
        pieces.append(text[cursor:])
        final = mark_unknown(mark_mislabels("".join(pieces), index, self.config.labels), answer.report.unknown_names)
        final = handle_unverified(final, evidence, self.config.code)
        return {"answer": dataclasses.replace(answer, text=final, citations=citations + added)}
