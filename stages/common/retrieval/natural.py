"""Natural questions (docs/behaviour.md §9): the extra keys of a natural set and the metrics of a right answer.

A natural line adds to `{question, path, start, end}`: `id`, `program`, `kind`, `gold` (every span that answers),
`leads` (qualnames a right answer leads with), `key_facts` (names or values a right answer states; `a|b` is one fact
with alternatives) and `answer` (the right answer, for hand grading). Every metric here reads plain values (spans,
the answer's text, telemetry entries), so the eval stage and `python -m bench.natural` share them.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.engine.errors import InputError

Span = tuple[str, int, int]  # path, first line, last line (1-based, inclusive)
KINDS = ("how", "where", "what", "why", "what_happens")
NATURAL_KEYS = ("id", "program", "kind", "gold", "leads", "key_facts", "answer")
BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # confidence buckets; the last one holds 1.0
# `name` followed by a citation: the first such pair is the answer's lead (`name()` is read as `name`)
_LEAD = re.compile(r"`([A-Za-z_][\w.]*)(?:\(\))?`\s*\[(?:path:\s*)?([^\[\]\n]+?):([0-9]+)(?:-([0-9]+))?\]")
_BARE_CITATION = re.compile(r"[\w./-]+\.\w+:[0-9]+(?:-[0-9]+)?")


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(f"{where}: '{key}' must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def parse_natural(item: Mapping[str, Any], main: Span, where: str) -> dict[str, Any]:
    """The natural keys of one question line as `Question` fields; a bad value is an InputError naming ``where``."""
    out: dict[str, Any] = {"natural": any(key in item for key in NATURAL_KEYS)}
    for key in ("id", "program", "answer"):
        if key in item:
            if not isinstance(item[key], str):
                raise InputError(f"{where}: '{key}' must be a string")
            out[key] = item[key].strip()
    if "kind" in item and item["kind"] not in KINDS:
        raise InputError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {item['kind']!r}")
    out["kind"] = str(item.get("kind", ""))
    if "gold" in item and not isinstance(item["gold"], list):
        raise InputError(f"{where}: 'gold' must be a list of {{path, start, end}} spans")
    spans = [main]
    for span in item.get("gold") or []:
        if not (isinstance(span, dict) and isinstance(span.get("path"), str) and isinstance(span.get("start"), int)
                and isinstance(span.get("end"), int) and 1 <= span["start"] <= span["end"]):
            raise InputError(f"{where}: each 'gold' span must be {{path, start, end}} with 1 <= start <= end")
        if (span["path"], span["start"], span["end"]) not in spans:
            spans.append((span["path"], span["start"], span["end"]))
    out["gold"] = tuple(spans)
    if "leads" in item:
        out["leads"] = _strings(item["leads"], where, "leads")
    if "key_facts" in item:
        facts = _strings(item["key_facts"], where, "key_facts")
        if any(not alt.strip() for fact in facts for alt in fact.split("|")):
            raise InputError(f"{where}: a key fact has an empty alternative (`a||b` or a trailing `|`)")
        out["key_facts"] = facts
    return out


def overlaps(window: Span, span: Span) -> bool:
    return window[0] == span[0] and window[1] <= span[2] and span[1] <= window[2]


def evidence_hit(windows: Iterable[Span], gold: Sequence[Span]) -> bool:
    """A packed (or cited) window overlaps any gold span."""
    return any(overlaps(tuple(w), g) for w in windows for g in gold)  # type: ignore[arg-type]


def answer_lead(text: str | None, telemetry_lead: str | None = None) -> tuple[str, Span | None] | None:
    """The answer's lead: the first `` `name` `` its text follows with a citation, else the lead choice telemetry
    recorded (`lead.lead`, `` `qualname` [path:A-B] ``); None when there is neither. (name, cited span)."""
    for source in (text or "", telemetry_lead or ""):
        match = _LEAD.search(source)
        if match:
            return match[1], (match[2].strip(), int(match[3]), int(match[4] or match[3]))
    return None


def lead_hit(lead: tuple[str, Span | None] | None, leads: Sequence[str], gold: Sequence[Span]) -> bool | None:
    """Whether the answer's lead names one of ``leads``: the same qualname, or one is a dotted suffix of the other
    (`method` for `Class.method`, `pkg.Class` for `Class`) and the lead's citation overlaps a gold span. None: no
    leads to match."""
    if not leads:
        return None
    if lead is None:
        return False
    name, cited = lead
    for wanted in leads:
        if name == wanted:
            return True
        suffix = wanted.endswith("." + name) or name.endswith("." + wanted)
        if suffix and cited is not None and evidence_hit([cited], gold):
            return True
    return False


def prose(text: str) -> str:
    """The answer's own words: backticks dropped (their code kept), `[...]` outside code (citations, the pipeline's
    markers) and bare `path:A-B` citations removed, so a line number or a marker never counts as a stated fact."""
    out, code, i = [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "`":
            code, ch = not code, " "
        elif ch == "[" and not code:
            close, newline = text.find("]", i), text.find("\n", i)
            if close != -1 and (newline == -1 or close < newline):
                out.append(" ")
                i = close + 1
                continue
        out.append(ch)
        i += 1
    return _BARE_CITATION.sub(" ", "".join(out))


def _fact_pattern(alternative: str) -> re.Pattern:
    words = r"\s+".join(re.escape(w) for w in alternative.split())
    before = r"(?<![\w])" if re.match(r"\w", alternative) else ""
    after = r"(?![\w])" if re.search(r"\w$", alternative) else ""
    return re.compile(before + words + after, re.IGNORECASE)


def facts_stated(text: str | None, key_facts: Sequence[str]) -> list[bool]:
    """Per key fact, whether the answer's prose states it: case-insensitive, as whole identifiers or words (`age`
    is not stated by `max_age`); a fact `a|b` is stated when any alternative is."""
    words = prose(text or "")
    return [any(_fact_pattern(alt.strip()).search(words) for alt in fact.split("|")) for fact in key_facts]


def key_fact_recall(text: str | None, key_facts: Sequence[str]) -> float | None:
    stated = facts_stated(text, key_facts)
    return sum(stated) / len(stated) if stated else None


def correct(recall: float | None, hit: bool | None) -> bool | None:
    """The automatic grade: key-fact recall >= 0.5 and a lead hit (each where the question gives facts or leads);
    None when the question gives neither."""
    if recall is None and hit is None:
        return None
    return (recall is None or recall >= 0.5) and (hit is None or hit)


def _mean(values: Iterable[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return round(sum(kept) / len(kept), 4) if kept else None


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over per-question rows (`natural_row`); a metric no row has is None (shown as n/a)."""
    return {"questions": len(rows), "evidence_hit": _mean(r.get("evidence_hit") for r in rows),
            "lead_hit": _mean(r.get("lead_hit") for r in rows),
            "key_fact_recall": _mean(r.get("key_fact_recall") for r in rows),
            "claims_contradicted": _mean(r.get("claims_contradicted") for r in rows),
            "claims_checked": _mean(r.get("claims_checked") for r in rows),
            "grounded_rate": _mean(r.get("grounded") for r in rows),
            "confidence": _mean(r.get("confidence") for r in rows),
            "correct_rate": _mean(r.get("correct") for r in rows),
            "seconds": _mean(r.get("seconds") for r in rows)}


def grouped(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """`aggregate` per value of ``key`` (kind, program), in sorted order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get(key) or "-"), []).append(row)
    return {name: aggregate(groups[name]) for name in sorted(groups)}


def calibration(rows: Sequence[Mapping[str, Any]], correct_key: str = "correct") -> list[dict[str, Any]]:
    """Per confidence bucket, the answers in it and the share of them that are correct (rows with a confidence and
    a grade under ``correct_key`` only); empty when no row has a confidence."""
    scored = [(float(r["confidence"]), r.get(correct_key)) for r in rows
              if r.get("confidence") is not None and r.get(correct_key) is not None]
    if not scored:
        return []
    out = []
    for low, high in BUCKETS:
        inside = [ok for value, ok in scored if low <= value < high or (high == 1.0 and value == 1.0)]
        out.append({"bucket": f"[{low:.2f}, {high:.2f}{']' if high == 1.0 else ')'}", "answers": len(inside),
                    "correct": _mean(inside)})
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"overall": aggregate(rows), "by_kind": grouped(rows, "kind"), "by_program": grouped(rows, "program"),
            "calibration": calibration(rows)}
