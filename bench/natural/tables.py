"""A tag's answers as tables (`summary.md`: overall, by program, by kind, calibration), the sheet printed for hand
grading, and the hand grades (`grades/<tag>.jsonl`, one {id, grade, reason} a line) read back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import InputError
from stages.common.retrieval.evaluation import spread
from stages.common.retrieval.natural import aggregate, calibration, grouped

GRADES = ("right", "partly", "wrong")
COLUMNS = [("questions", "questions"), ("evidence_hit", "evidence hit"), ("bm25_evidence_hit", "BM25 evidence hit"),
           ("lead_hit", "lead hit"),
           ("key_fact_recall", "key-fact recall"), ("claims_contradicted", "contradicted / answer"),
           ("grounded_rate", "grounded"), ("confidence", "confidence"), ("correct_rate", "correct (auto)"),
           ("seconds", "s / answer")]
HAND = [("graded", "graded"), ("right", "right"), ("right_or_partly", "right or partly")]


def read_answers(folder: Path) -> list[dict[str, Any]]:
    source = folder / "answers.jsonl"
    if not source.is_file():
        raise InputError(f"{source} is missing: run python -m bench.natural run --tag {folder.name} first")
    return [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_grades(source: Path, answers: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """id -> {grade, reason}; every line checked (a known id, once, a grade of GRADES, a one-line reason)."""
    if not source.is_file():
        return {}
    known, grades = {a["id"] for a in answers}, {}
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            item = json.loads(line)
        except ValueError as err:
            raise InputError(f"{where}: not JSON ({err})") from err
        if not isinstance(item, dict) or item.get("id") not in known:
            raise InputError(f"{where}: id {item.get('id') if isinstance(item, dict) else None!r} is not an answer "
                             f"of this tag")
        if item["id"] in grades:
            raise InputError(f"{where}: {item['id']} is graded twice")
        reason = item.get("reason")
        if item.get("grade") not in GRADES or not isinstance(reason, str) or not reason.strip() or "\n" in reason:
            raise InputError(f"{where}: grade must be one of {', '.join(GRADES)} and reason one non-empty line")
        grades[item["id"]] = {"grade": item["grade"], "reason": reason.strip()}
    return grades


def flat(answer: dict[str, Any], grade: dict[str, str] | None) -> dict[str, Any]:
    """One answer as the row `aggregate` reads, with its hand grade as booleans (None when ungraded)."""
    g = grade["grade"] if grade else None
    return {**answer["metrics"], "program": answer["program"], "kind": answer["kind"],
            "grounded": answer["grounded"], "confidence": answer["confidence"], "seconds": answer["seconds"],
            "bm25_evidence_hit": answer.get("bm25_evidence_hit"),
            "hand_right": None if g is None else g == "right",
            "hand_right_or_partly": None if g is None else g in ("right", "partly")}


def _extra(rows: list[dict[str, Any]]) -> dict[str, Any]:
    graded = [r for r in rows if r["hand_right"] is not None]
    share = (lambda key: round(sum(r[key] for r in graded) / len(graded), 4)) if graded else (lambda key: None)
    bm25 = [float(r["bm25_evidence_hit"]) for r in rows if r["bm25_evidence_hit"] is not None]
    return {"graded": len(graded), "right": share("hand_right"), "right_or_partly": share("hand_right_or_partly"),
            "bm25_evidence_hit": round(sum(bm25) / len(bm25), 4) if bm25 else None}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _table(first: str, groups: dict[str, dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    lines = [f"| {first} | " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    lines += [f"| {name} | " + " | ".join(_cell(values.get(key)) for key, _ in columns) + " |"
              for name, values in groups.items()]
    return lines


def summary_text(folder: Path, grades_file: Path) -> str:
    answers = read_answers(folder)
    grades = read_grades(grades_file, answers)
    rows = [flat(a, grades.get(a["id"])) for a in answers]
    meta_file = folder / "run.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    columns = COLUMNS + (HAND if grades else [])  # hand-graded columns only when there are grades

    def section(key: str | None) -> dict[str, dict[str, Any]]:
        groups = grouped(rows, key) if key else {"all": aggregate(rows)}
        return {name: {**values, **_extra([r for r in rows if key is None or str(r.get(key) or "-") == name])}
                for name, values in groups.items()}

    out = [f"# Natural questions: {folder.name}", "",
           f"split {meta.get('split', '?')}, mode {meta.get('mode', '?')}, overrides "
           f"`{' '.join(meta.get('overrides', [])) or '(none)'}`, {len(answers)} questions, started "
           f"{meta.get('started', '?')}; n/a: not measured in this mode or not recorded by the graph.", "",
           "## Overall", "", *_table("set", section(None), columns), "",
           "## By program", "", *_table("program", section("program"), columns), "",
           "## By kind", "", *_table("kind", section("kind"), columns), "",
           "## Calibration", "", "correct (auto): key-fact recall >= 0.5 and a lead hit."]
    tables = [("correct (auto)", calibration(rows))]
    if grades:
        tables.append((f"right (hand, {len(grades)} graded)", calibration(rows, "hand_right")))
    for title, buckets in tables:
        if not buckets:
            out += ["", f"{title}: n/a (no answer recorded a confidence)"]
            continue
        out += ["", f"| confidence | answers | {title} |", "|---|---|---|"]
        out += [f"| {b['bucket']} | {b['answers']} | {_cell(b['correct'])} |" for b in buckets]
    return "\n".join(out) + "\n"


def write_summary(folder: Path, grades_file: Path) -> str:
    text = summary_text(folder, grades_file)
    write_atomic(folder / "summary.md", text)
    return text


def grading_sheet(folder: Path, grades_file: Path, limit: int | None = None) -> str:
    """Each answer beside its question, the right answer and the key facts, with the line to fill in."""
    answers = read_answers(folder)
    grades = read_grades(grades_file, answers)
    blocks = []
    for a in spread(answers, limit):
        m = a["metrics"]
        done = grades.get(a["id"])
        blocks.append("\n".join([
            f"=== {a['id']} ({a['program']}, {a['kind']})",
            f"question:   {a['question']}",
            f"right:      {a['gold_answer'] or '(none written)'}",
            f"key facts:  {', '.join(a['key_facts'])}    leads: {', '.join(a['leads'])}    gold: "
            + ", ".join(f"{p}:{s}-{e}" for p, s, e in a["gold"]),
            "answer:", *("  " + line for line in (a["answer"] or "(retrieval mode: no answer)").splitlines()),
            f"auto:       lead {a['lead']!r} hit {_cell(m['lead_hit'])}, facts stated "
            f"{m['key_facts_stated']} ({_cell(m['key_fact_recall'])}), evidence hit {_cell(m['evidence_hit'])}, "
            f"grounded {_cell(a['grounded'])}, confidence {_cell(a['confidence'])}",
            f"graded:     {done['grade']}: {done['reason']}" if done
            else json.dumps({"id": a["id"], "grade": "right|partly|wrong", "reason": ""})]))
    return "\n\n".join(blocks) + f"\n\n(grades go to {grades_file}, one line per answer)\n"
