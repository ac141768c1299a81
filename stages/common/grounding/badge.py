"""The honest badge (stage `badge`, docs/behaviour.md §5): whether an answer is grounded, why not, and a confidence.

An answer is grounded when all four hold, each one a phrase in `Badge.reasons` when it does not:
- `citations`: the citation check passed and the answer keeps at least one valid citation;
- `claims`: no claim of its prose is contradicted by the code (only when a claims report is wired);
- `degenerate`: no run of `bracket_run` or more of one bracket character, no sequence of `loop_ngram` words written
  `loop_repeats` times or more (citations and bracketed markers left out), no line of the prompt written back
  (`Question: …`, `[ctx] path: …`, or one of its rules), and at least `min_explanation_words` words of prose after the lead (outside
  code fences and code-like lines; a word: a letter or `_`, then letters, digits or `_`);
- `cut`: the reply ended by itself, not at `max_new_tokens` (`Draft.cut_at`). A cut reply ends at its last full
  sentence (`cut=trim`) and carries `… [cut at max_new_tokens=N]`; citations the trimmed text no longer holds leave
  the answer's citation list.

confidence = (margin_weight·m + evidence_weight·e) / (margin_weight + evidence_weight) × the factor of each failed
check, where m = 1 − exp(−lead margin / margin_scale) (the lead choice's score over the runner-up, in nats) and
e = the best score of a packed window a valid citation falls in / the best packed window's score.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Annotated, Any, Literal

from pipeline.engine.stage import Range
from stages.common.grounding.citations import CITATION, parse_citations
from stages.common.grounding.quotes import code_like
from stages.common.types import Answer, Citation, Evidence, ProgramIndex

BRACKETS = "()[]{}<>"
MARKER = "not in evidence: "  # repair writes an invalid citation as `[not in evidence: path:A-B]`
NOTICE = "… [cut at max_new_tokens={limit}]"
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a word of prose or a code name (`a + b` holds two)
_BRACKETED = re.compile(r"\[[^\[\]\n]*\]")  # a citation or a marker repair wrote
# a sentence's end: . ! ? or … and closing quotes, brackets or emphasis, then whitespace or the end of the text
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]`*_]*(?=\s|$)")
_NOT_AN_END = re.compile(r"(?:^|[\s(])(?:[0-9]+|[A-Z]|e\.g|i\.e|vs|cf)\.$")  # `1.`, `A.`, `e.g.` end nothing
_TRAILING_CITATION = re.compile(r"[ \t]*\[[^\[\]\n]+?:[0-9]+(?:-[0-9]+)?\]")
_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
# the prompt's own lines and rules (stages/scaffold.py) written back
_ECHO = re.compile(r"^\s*(?:Question:|\[ctx\] path:)|Cite the lines you rely on|Start with the definition that answers"
                   r"|Then explain in two to four sentences|Use only names that appear in the code above"
                   r"|Name only functions, classes and variables")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BadgeSettings:
    """What the badge checks and how it weighs them; `HonestBadge.Config` (stages/badge.py) is these."""

    cut: Literal["trim", "mark"] = "trim"  # a cut reply: trim to its last full sentence and say so | only say so
    bracket_run: Annotated[int, Range(ge=2)] = 4  # this many of one bracket character in a row is degenerate
    loop_ngram: Annotated[int, Range(ge=1)] = 6  # words in a sequence whose repeats make a loop
    loop_repeats: Annotated[int, Range(ge=2)] = 3  # a sequence of loop_ngram words written this often is a loop
    min_explanation_words: Annotated[int, Range(ge=0)] = 3  # fewer words after the lead: an empty explanation
    margin_scale: Annotated[float, Range(gt=0)] = 4.0  # lead margin (nats) where the margin part is 1 - 1/e
    margin_weight: Annotated[float, Range(ge=0)] = 1.0
    evidence_weight: Annotated[float, Range(ge=0)] = 1.0
    no_margin: Annotated[float, Range(ge=0, le=1)] = 0.5  # the margin part without a runner-up or a scored lead
    no_evidence: Annotated[float, Range(ge=0, le=1)] = 0.5  # the evidence part when no packed window has a score
    citations_factor: Annotated[float, Range(ge=0, le=1)] = 0.5  # times the confidence: the citation check failed
    claims_factor: Annotated[float, Range(ge=0, le=1)] = 0.5  # times the confidence per contradicted claim
    degenerate_factor: Annotated[float, Range(ge=0, le=1)] = 0.2
    cut_factor: Annotated[float, Range(ge=0, le=1)] = 0.5


@dataclasses.dataclass(frozen=True)
class Badge:
    """The badge of one answer: grounded, why not (check -> phrase, in the order above) and the confidence."""

    grounded: bool
    reasons: dict[str, str]
    confidence: float
    parts: dict[str, Any]  # margin, evidence and the factor the confidence is made of
    cut_at: int | None = None

    def summary(self) -> dict[str, Any]:
        return {"grounded": self.grounded, "reasons": self.reasons, "confidence": self.confidence}


# ------------------------------------------------------------------------------------------------ degenerate text


def bracket_run(text: str) -> tuple[str, int]:
    """The longest run of one bracket character: (the character, its length); ('', 0) without brackets."""
    best = ("", 0)
    for match in re.finditer(r"([\[\](){}<>])\1*", text):
        if len(match.group(0)) > best[1]:
            best = (match.group(1), len(match.group(0)))
    return best


def prose_words(text: str) -> list[str]:
    """The words of ``text`` outside citations and bracketed markers, lowercased."""
    return [w.lower() for w in _WORD.findall(_BRACKETED.sub(" ", CITATION.sub(" ", text)))]


def loop(text: str, ngram: int, repeats: int) -> tuple[str, int]:
    """The most written sequence of ``ngram`` words if it is written ``repeats`` times or more, with its count."""
    words = prose_words(text)
    counts = Counter(tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1))
    if not counts:
        return "", 0
    sequence, count = counts.most_common(1)[0]
    return (" ".join(sequence), count) if count >= repeats else ("", 0)


def prose_lines(text: str) -> str:
    """The lines of ``text`` a reader takes as prose: outside code fences, not code-like (grounding.quotes) and not
    the prompt's own scaffolding repeated (`Question: …`, `[ctx] …`)."""
    inside, kept = False, []
    for line in text.splitlines():
        if _FENCE.match(line):
            inside = not inside
        elif not inside and not code_like(line) and not _ECHO.search(line):
            kept.append(line)
    return "\n".join(kept)


def explanation(text: str, lead: str, prefill_chars: int = 0) -> str:
    """What follows the lead (`` `qualname` [path:A-B] ``) in ``text``; without a lead, what the model wrote."""
    if lead and lead in text:
        return text.split(lead, 1)[1]
    return text[prefill_chars:]


def degenerate(text: str, lead: str, prefill_chars: int, settings: BadgeSettings) -> list[str]:
    """One phrase per degenerate trait of ``text`` (none: an ordinary reply)."""
    found = []
    char, run = bracket_run(text)
    if run >= settings.bracket_run:
        found.append(f"a run of {run} '{char}'")
    sequence, count = loop(text, settings.loop_ngram, settings.loop_repeats)
    if count:
        found.append(f"a loop ('{sequence}' {count} times)")
    echo = next((line.strip() for line in text.splitlines() if _ECHO.search(line)), "")
    if echo:
        found.append(f"the prompt repeated ('{echo[:40]}')")
    words = len(prose_words(prose_lines(explanation(text, lead, prefill_chars))))
    if words < settings.min_explanation_words:
        found.append("an empty explanation after the lead" if words == 0 else
                     f"an empty explanation after the lead ({words} word{'s' * (words != 1)})")
    return found


# ------------------------------------------------------------------------------------------------ a cut reply


def _inside_fences(text: str) -> list[tuple[int, int]]:
    """Character spans inside ``` fences (an unclosed fence runs to the end)."""
    marks = [m.start() for m in _FENCE.finditer(text)]
    spans = [(marks[i], marks[i + 1]) for i in range(0, len(marks) - 1, 2)]
    return spans + ([(marks[-1], len(text))] if len(marks) % 2 else [])


def sentence_ends(text: str, fences: list[tuple[int, int]] | None = None) -> list[int]:
    """Where each full sentence of ``text`` ends (after its terminator), outside code fences; `1.`, `A.`, `e.g.`
    and `i.e.` end nothing."""
    fences = _inside_fences(text) if fences is None else fences
    return [match.end() for match in _SENTENCE_END.finditer(text)
            if not any(a <= match.start() < b for a, b in fences) and not _NOT_AN_END.search(text[:match.start() + 1])]


def last_sentence_end(text: str) -> int | None:
    """Where the last full sentence of ``text`` ends (after its terminator and any citations right after it), or
    the last paragraph a blank line ends (unless it ends in `:`, `,` or `;`: it leads into what was cut); None when
    neither is in it. Ends inside code fences, after a list number (`1.`), a capital (`A.`) or `e.g.`/`i.e.` do not
    count."""
    fences = _inside_fences(text)
    ends = sentence_ends(text, fences)
    best = ends[-1] if ends else None
    for match in re.finditer(r"[^\s:,;](?=[ \t]*\n[ \t]*\n)", text):  # a paragraph a blank line ends (not `…:`)
        if not any(a <= match.start() < b for a, b in fences) and (best is None or match.end() > best):
            best = match.end()
    if best is None:
        return None
    while (citation := _TRAILING_CITATION.match(text, best)) is not None:
        best = citation.end()
    return best


def trim_cut(answer: Answer, index: ProgramIndex, mode: str) -> Answer:
    """A reply cut at max_new_tokens: with ``mode`` trim, ended at its last full sentence (all of it when none ends);
    then the notice. The citations of the text cut away leave the answer's list."""
    limit = answer.draft.cut_at
    if limit is None:
        return answer
    text = answer.text
    end = last_sentence_end(text) if mode == "trim" else None
    kept, tail = (text, "") if end is None else (text[:end], text[end:])
    citations = drop_cited_in(tail, list(answer.citations), index)
    notice = NOTICE.format(limit=limit)
    return dataclasses.replace(answer, text=f"{kept.rstrip()} {notice}" if kept.strip() else notice,
                               citations=citations)


def drop_cited_in(tail: str, citations: list[Citation], index: ProgramIndex) -> list[Citation]:
    """``citations`` without those ``tail`` holds: for each citation (or repair's marker) in it, the last one of the
    list with its span (the tail is the end of the text: its citations are the last ones written)."""
    kept = list(citations)
    for _, _, path, start, end in parse_citations(tail, index):
        removed = path.startswith(MARKER)
        path = path[len(MARKER):] if removed else path
        for i in range(len(kept) - 1, -1, -1):
            c = kept[i]
            if (c.path, c.start, c.end, c.removed) == (path, start, end, removed):
                del kept[i]
                break
    return kept


# ------------------------------------------------------------------------------------------------ the badge


def citation_phrase(answer: Answer) -> str:
    """Why the citations do not ground the answer, or '' when they do."""
    valid = [c for c in answer.citations if c.valid and not c.removed]
    if answer.report.passed and valid:
        return ""
    if not answer.citations:
        return "the answer cites no code"
    if not valid:
        count = len(answer.citations)
        return f"none of its {count} citations is valid" if count > 1 else "its one citation is not valid"
    reason = answer.report.reason
    return ("the citation check failed on the retry too" if answer.fallback_used else "the citation check failed") + (
        f": {reason}" if reason else "")


def evidence_part(answer: Answer, evidence: Evidence | None, settings: BadgeSettings) -> float:
    """The best score of a packed window a valid citation falls in, over the best packed window's score."""
    windows = evidence.windows if evidence is not None else []
    top = max((w.score for w in windows), default=0.0)
    if top <= 0:
        return settings.no_evidence
    cited = [w.score for w in windows for c in answer.citations
             if c.valid and not c.removed and w.path == c.path and w.start <= c.end and c.start <= w.end]
    return min(1.0, max(0.0, max(cited, default=0.0) / top))


def margin_part(lead: dict[str, Any], settings: BadgeSettings) -> float:
    margin = lead.get("lead_margin")
    if not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return settings.no_margin
    return 1.0 - math.exp(-max(0.0, float(margin)) / settings.margin_scale)


def judge(answer: Answer, evidence: Evidence | None, contradicted: int, settings: BadgeSettings) -> Badge:
    """The badge of ``answer`` (already trimmed if it was cut): its checks, why not, and the confidence."""
    draft = answer.draft
    reasons: dict[str, str] = {}
    if phrase := citation_phrase(answer):
        reasons["citations"] = phrase
    if contradicted:
        reasons["claims"] = f"{contradicted} contradicted claim{'s' * (contradicted != 1)}"
    lead = str(draft.lead.get("lead") or "")
    body = answer.text.removesuffix(NOTICE.format(limit=draft.cut_at)) if draft.cut_at is not None else answer.text
    if traits := degenerate(body, lead, draft.prefill_chars, settings):
        reasons["degenerate"] = "degenerate text: " + "; ".join(traits)
    if draft.cut_at is not None:
        reasons["cut"] = f"cut at max_new_tokens={draft.cut_at}"
    m, e = margin_part(draft.lead, settings), evidence_part(answer, evidence, settings)
    weights = settings.margin_weight + settings.evidence_weight
    base = (settings.margin_weight * m + settings.evidence_weight * e) / weights if weights else 0.0
    factor = ((settings.citations_factor if "citations" in reasons else 1.0)
              * settings.claims_factor ** contradicted
              * (settings.degenerate_factor if "degenerate" in reasons else 1.0)
              * (settings.cut_factor if "cut" in reasons else 1.0))
    confidence = round(min(1.0, max(0.0, base * factor)), 4)
    parts = {"margin": round(m, 4), "evidence": round(e, 4), "factor": round(factor, 4)}
    return Badge(not reasons, reasons, confidence, parts, draft.cut_at)
