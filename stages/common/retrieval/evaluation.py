"""Question sets and retrieval scoring (docs/behaviour.md §9), shared by the eval graph's stages.

A question set is JSONL, one `{question, path, start, end}` per line: `path:start-end` is the definition
that answers the question; a natural line adds gold spans, leads and key facts (natural.py). Every system under
evaluation (ours, the BM25 baseline) produces one `Record` per question: the files it ranked and the windows it
would show, best first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engine.errors import ConfigError, InputError
from stages.common.program.lines import split_lines
from stages.common.program.text import token_set
from stages.common.retrieval.natural import (
    Span,
    answer_lead,
    correct,
    evidence_hit,
    facts_stated,
    lead_hit,
    parse_natural,
    summarize,
)
from stages.common.types import ProgramIndex


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    path: str
    start: int
    end: int
    symbol: str = ""
    sentence: str = ""  # the set's own sentence when ``question`` is another phrasing of it
    # a natural question's keys (stages/common/retrieval/natural.py); `gold` always starts with path:start-end
    natural: bool = False
    id: str = ""
    program: str = ""
    kind: str = ""
    gold: tuple[Span, ...] = ()
    leads: tuple[str, ...] = ()
    key_facts: tuple[str, ...] = ()
    answer: str = ""  # the right answer, for hand grading

    def hit_by(self, path: str, start: int, end: int) -> bool:
        return path == self.path and start <= self.end and self.start <= end

    @property
    def spans(self) -> tuple[Span, ...]:
        return self.gold or ((self.path, self.start, self.end),)


@dataclasses.dataclass
class QuestionSet:
    source: str
    questions: list[Question]
    total: int  # questions in the file, before any limit
    phrasing: str = "bare"

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "questions": len(self.questions), "total": self.total, "phrasing": self.phrasing}


@dataclasses.dataclass
class Record:
    """What one system did with one question."""

    files: list[str]  # ranked files, best first
    windows: list[tuple[str, int, int]]  # shown windows (path, start, end), best first
    seconds: float
    citations: list[dict] | None = None  # answer mode only: {path, start, end, valid, source, ...}
    retries: int | None = None
    answer: str | None = None  # answer mode: the final text the reader sees
    names: int = 0  # answer mode: distinct code-like names in the answer
    unknown: list[str] = dataclasses.field(default_factory=list)  # ... of which the program has none
    new_tokens: int = 0
    decode_seconds: float = 0.0  # answer mode: seconds spent decoding (prefill apart)
    code_lines: int = 0  # answer mode: Python-looking lines the model wrote (stages/common/grounding/quotes.py)
    code_unverified: int = 0  # ... of which no packed window holds the text
    mislabelled: int = 0  # answer mode: `name` [path:A-B] pairs whose span does not define the name (labels.py)
    lead: str = ""  # answer mode: the lead choice telemetry recorded (`lead.lead`), '' when none was made
    grounded: bool | None = None  # answer mode: telemetry's badge
    confidence: float | None = None  # answer mode, when the graph records one
    claims_checked: int | None = None  # answer mode, when the graph checks claims
    claims_contradicted: int | None = None


@dataclasses.dataclass
class SystemRun:
    name: str
    records: list[Record]
    setup_seconds: float = 0.0  # one-off cost (e.g. building the BM25 index)
    detail: str = ""  # how it ran, for the report (graph, tokenizer)
    tokenizers: list[str] = dataclasses.field(default_factory=list)  # whose tokenizer counted the packed windows

    def summary(self) -> dict[str, Any]:
        return {"system": self.name, "questions": len(self.records), "detail": self.detail}


def load_questions(path: str | Path) -> list[Question]:
    """Read and check a JSONL question set; a bad line is an InputError naming the file and line."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise InputError(f"questions '{path}' is not a file; make one with python -m pipeline.questions")
    questions = []
    for number, line in enumerate(split_lines(source.read_text(encoding="utf-8")), start=1):
        if not line.strip():
            continue
        where = f"questions '{path}' line {number}"
        try:
            item = json.loads(line)
        except ValueError as err:
            raise InputError(f"{where}: not JSON ({err})") from err
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected an object with question, path, start, end")
        missing = [k for k in ("question", "path", "start", "end") if k not in item]
        if missing:
            raise InputError(f"{where}: missing key '{missing[0]}'")
        start, end = item["start"], item["end"]
        if not (isinstance(start, int) and isinstance(end, int) and 1 <= start <= end):
            raise InputError(f"{where}: start and end must be line numbers with 1 <= start <= end, got {start}, {end}")
        if not str(item["question"]).strip():
            raise InputError(f"{where}: empty question")
        natural = parse_natural(item, (str(item["path"]), start, end), where)
        questions.append(Question(str(item["question"]), str(item["path"]), start, end, str(item.get("symbol", "")),
                                  **natural))
    if not questions:
        raise InputError(f"questions '{path}' has no questions")
    return questions


# How a question is put to the system (docs/behaviour.md §9: recall must hold across phrasings). `bare` is the set's own
# sentence; `template` wraps it in one of the configured question templates (chosen per question by a stable hash
# of its text, so a subset keeps its phrasing); `keywords` keeps only its longest content words, as typed into a
# search box. The words dropped for keywords are English function words, nothing learnt from any program.
PHRASINGS = ("bare", "template", "keywords")
_FUNCTION_WORDS = frozenset("""a about above after again all also an and any are as at be been before being below
    between both but by can could did do does doing down during each either else ever every few for from further had
    has have having he her here hers him his how however i if in into is it its itself just least less let like may
    me might more most much must my neither no nor not now of off often on once one only or other our out over own
    per rather same shall she should since so some such than that the their them then there these they this those
    though through thus to too under until up upon us very via was we were what when where whether which while who
    whom whose why will with within without would yet you your""".split())
_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def check_templates(templates: Sequence[str]) -> list[str]:
    """The question templates; each must hold ``{question}`` (the set's sentence, without its final stop)."""
    if not templates:
        raise ConfigError("eval.templates is empty; give at least one template with {question} in it")
    for template in templates:
        if template.count("{question}") != 1:
            raise ConfigError(f"eval.templates: {template!r} must contain {{question}} exactly once")
    return list(templates)


def keywords(sentence: str, count: int) -> str:
    """The ``count`` longest content words of ``sentence`` (ties: earlier first), in their original order."""
    words = list(dict.fromkeys(w for w in _KEYWORD.findall(sentence) if w.lower() not in _FUNCTION_WORDS and len(w) > 1))
    chosen = set(sorted(words, key=lambda w: (-len(w), words.index(w)))[:count])
    return " ".join(w for w in words if w in chosen) or sentence


def phrase(sentence: str, phrasing: str, templates: Sequence[str], keyword_count: int = 4) -> str:
    """``sentence`` put to the system in ``phrasing`` (one of PHRASINGS)."""
    if phrasing == "bare":
        return sentence
    if phrasing == "keywords":
        return keywords(sentence, keyword_count)
    if phrasing == "template":
        template = templates[int(hashlib.blake2b(sentence.encode(), digest_size=8).hexdigest(), 16) % len(templates)]
        return template.replace("{question}", sentence.strip().rstrip(".!?:;").strip())
    raise ConfigError(f"eval.phrasing must be one of {', '.join(PHRASINGS)}, got {phrasing!r}")


def spread(items: list, limit: int | None) -> list:
    """An evenly spaced, deterministic subset of ``limit`` items (all when ``limit`` is None or larger)."""
    if limit is None or limit >= len(items):
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def score(questions: list[Question], records: list[Record], k: int) -> dict[str, float | None]:
    """Per-system metrics: recall of the answering file in the first k ranked files and of its definition in the
    first k (and any) shown windows; citation hit and precision, retries (answer mode only); seconds per question."""
    pairs = list(zip(questions, records))
    metrics: dict[str, float | None] = {
        "file_recall@1": _mean([float(q.path in r.files[:1]) for q, r in pairs]),
        f"file_recall@{k}": _mean([float(q.path in r.files[:k]) for q, r in pairs]),
        "evidence_recall@1": _mean([float(any(q.hit_by(*w) for w in r.windows[:1])) for q, r in pairs]),
        f"evidence_recall@{k}": _mean([float(any(q.hit_by(*w) for w in r.windows[:k])) for q, r in pairs]),
        "evidence_recall": _mean([float(any(q.hit_by(*w) for w in r.windows)) for q, r in pairs]),
        "windows_shown": _mean([float(len(r.windows)) for _, r in pairs]),
    }
    answered = [(q, r) for q, r in pairs if r.citations is not None]
    metrics.update(answer_metrics(answered) if answered else dict.fromkeys(ANSWER_METRICS))
    metrics["seconds"] = _mean([r.seconds for _, r in pairs])
    return metrics


ANSWER_METRICS = ["citation_hit", "citation_precision", "citations_model", "model_citation_rate", "model_citation_hit",
                  "first_citation_hit",
                  "symbol_hit", "unknown_identifier_rate", "unknown_per_answer", "invented_code_rate",
                  "invented_code_lines", "mislabelled_rate", "retries", "retry_rate", "tokens_per_second"]


def _hit(q: Question, citations: list[dict], source: str | None = None) -> bool:
    return any(c["valid"] and (source is None or c.get("source") == source) and q.hit_by(c["path"], c["start"], c["end"])
               for c in citations)


def mentions(text: str, name: str) -> bool:
    """Whether ``name`` appears in ``text`` as a whole identifier (`Context.invoke` mentions `invoke`)."""
    return bool(name) and re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text) is not None


def answer_metrics(answered: list[tuple[Question, Record]]) -> dict[str, float | None]:
    """docs/behaviour.md §9 answer metrics. Model citations are the ones the model wrote (`source: model`), apart from those
    citation repair attributed; the unknown-identifier rate is unknown names ÷ code-like names over all answers."""
    cites = [c for _, r in answered for c in (r.citations or [])]
    names = sum(r.names for _, r in answered)
    with_symbol = [(q, r) for q, r in answered if q.symbol]
    decoding = [r for _, r in answered if r.decode_seconds > 0]
    return {
        "citation_hit": _mean([float(_hit(q, (r.citations or []))) for q, r in answered]),
        "citation_precision": round(sum(c["valid"] for c in cites) / len(cites), 4) if cites else 0.0,
        "citations_model": _mean([float(sum(c.get("source") == "model" for c in (r.citations or []))) for _, r in answered]),
        "model_citation_rate": _mean([float(any(c["valid"] and c.get("source") == "model" for c in (r.citations or [])))
                                      for _, r in answered]),
        "model_citation_hit": _mean([float(_hit(q, (r.citations or []), "model")) for q, r in answered]),
        # the first citation the model wrote (in the lead answer form: the lead's) is valid and hits
        "first_citation_hit": _mean([float(_hit(q, [c for c in (r.citations or []) if c.get("source") == "model"][:1]))
                                     for q, r in answered]),
        "symbol_hit": _mean([float(mentions(r.answer or "", q.symbol)) for q, r in with_symbol]),
        "unknown_identifier_rate": round(sum(len(r.unknown) for _, r in answered) / names, 4) if names else 0.0,
        "unknown_per_answer": _mean([float(len(r.unknown)) for _, r in answered]),
        # code the model "quoted" that the evidence does not hold (repair leaves it out of the final answer)
        "invented_code_rate": _mean([float(r.code_unverified > 0) for _, r in answered]),
        "invented_code_lines": _mean([float(r.code_unverified) for _, r in answered]),
        "mislabelled_rate": _mean([float(r.mislabelled > 0) for _, r in answered]),
        "retries": _mean([float(r.retries or 0) for _, r in answered]),
        "retry_rate": _mean([float((r.retries or 0) > 0) for _, r in answered]),
        "tokens_per_second": _mean([r.new_tokens / r.decode_seconds for r in decoding]),
    }


def natural_row(q: Question, r: Record) -> dict[str, Any]:
    """One natural question's metrics (docs/behaviour.md §9); the answer's are None in retrieval mode."""
    row: dict[str, Any] = {"id": q.id, "program": q.program, "kind": q.kind,
                           "evidence_hit": evidence_hit(r.windows, q.spans), "seconds": round(r.seconds, 4)}
    if r.citations is None:
        return row
    lead = answer_lead(r.answer, r.lead)
    stated = facts_stated(r.answer, q.key_facts)
    recall = round(sum(stated) / len(stated), 4) if stated else None
    hit = lead_hit(lead, q.leads, q.spans)
    grounded = r.grounded if r.grounded is not None else any(c["valid"] for c in r.citations)
    return {**row, "answer": r.answer, "lead": lead[0] if lead else None, "lead_hit": hit,
            "key_facts_stated": [f for f, ok in zip(q.key_facts, stated) if ok], "key_fact_recall": recall,
            "grounded": grounded, "confidence": r.confidence, "claims_checked": r.claims_checked,
            "claims_contradicted": r.claims_contradicted, "correct": correct(recall, hit)}


def entry(telemetry: Any, key: str) -> Any:
    """A telemetry entry that may be a field of the record or one of its extra keys (None when absent)."""
    value = getattr(telemetry, key, None)
    return telemetry.extra.get(key) if value is None else value


def natural_section(questions: list[Question], systems: list[SystemRun], metrics: dict[str, dict],
                    per_question: list[dict]) -> dict[str, Any]:
    """For a natural set (any line with natural keys): each system's natural metrics added to its ``metrics`` and
    to each question of ``per_question``; returns the report's `natural` section (overall, by kind, by program,
    calibration). An older set gets nothing, so its report is what it always was."""
    if not any(q.natural for q in questions):
        return {}
    section = {}
    for run in systems:
        rows = [natural_row(q, r) for q, r in zip(questions, run.records)]
        for item, row in zip(per_question, rows):
            item[run.name]["natural"] = row
        section[run.name] = summarize(rows)
        metrics[run.name].update({k: v for k, v in section[run.name]["overall"].items()
                                  if k not in ("questions", "seconds")})
    for q, item in zip(questions, per_question):
        item.update(id=q.id, program=q.program, kind=q.kind)
    return {"natural": section}


# ------------------------------------------------------------------ the closed-book symbol test (stages/closed_book.py)
def candidate_names(index: ProgramIndex) -> list[str]:
    """Every distinct definition name of the program (functions, classes, methods), sorted."""
    return sorted({sym.name for sym in index.symbols if sym.is_definition})


def definition_keywords(index: ProgramIndex) -> dict[str, str]:
    """name -> the Python keyword that defines it (`class` when any definition of that name is a class)."""
    out: dict[str, str] = {}
    for sym in (s for s in index.symbols if s.is_definition):
        if out.get(sym.name) != "class":
            out[sym.name] = "class" if sym.kind == "class" else "def"
    return out


def shares_words(name: str, question: str) -> bool:
    """Whether a part of the name (snake/camel split) starts like a word of the question (first 4 letters)."""
    words = {w[:4] for w in token_set(question)}
    return any(part[:4] in words for part in token_set(name))


def gold_name(index: ProgramIndex, question: Question) -> str:
    """The name of the definition that answers ``question`` (its ``symbol``, else the one starting at its line)."""
    if question.symbol:
        return question.symbol
    found = [s for s in index.symbols if s.path == question.path and s.start == question.start and s.is_definition]
    if not found:
        raise InputError(f"question '{question.question[:60]}': no definition starts at {question.path}:{question.start}")
    return found[0].name


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every score among all of them (1 = highest; a tie shares the better rank)."""
    order = np.sort(scores)[::-1]
    return np.asarray(np.searchsorted(-order, -scores, side="left")) + 1


def ranking_metrics(ranking: dict, k: int, split: bool = True) -> dict:
    """top-1, top-k, MRR and ranks; with `split`, the same for the questions whose name shares no word with them."""
    ranked = np.array([row["rank"] for row in ranking["questions"]], dtype=np.float64)
    if not len(ranked):
        return {"questions": 0}
    out = {"questions": int(len(ranked)), "candidates": ranking["candidates"],
           "top1": round(float(np.mean(ranked <= 1)), 4), f"top{k}": round(float(np.mean(ranked <= k)), 4),
           "mrr": round(float(np.mean(1.0 / ranked)), 4), "mean_rank": round(float(ranked.mean()), 2),
           "median_rank": float(np.median(ranked))}
    if split:  # names that cannot be guessed from the question's words: what the model must know of the program
        unlike = {**ranking, "questions": [r for r in ranking["questions"] if not r.get("shares_words")]}
        out["no_shared_words"] = ranking_metrics(unlike, k, split=False)
    return out
