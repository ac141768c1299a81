"""`run`: the eval graph over each program of a split, one program after the other in this one process (the loaded
model and tokenizer are reused; two torch processes side by side on two cores are many times slower), and its
answers gathered into `<out>/<tag>/answers.jsonl`, `run.json` and `summary.md`."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from bench.natural.fetching import program_root, programs, questions_file
from bench.natural.tables import write_summary
from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import ConfigError, InputError
from stages.common.retrieval.evaluation import load_questions

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
METRIC_KEYS = ("evidence_hit", "lead_hit", "key_fact_recall", "key_facts_stated", "claims_checked",
               "claims_contradicted", "correct")


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise ConfigError(f"--tag {tag!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    return tag


def answers_of(report: dict[str, Any], source: Path, mode: str) -> list[dict[str, Any]]:
    """One line of answers.jsonl per question of an eval.json: ours, joined with the question file by id."""
    questions = {q.id: q for q in load_questions(source)}
    out = []
    for item in report["per_question"]:
        if "id" not in item:
            raise InputError(f"questions '{source}' is not a natural set (no id, gold, leads or key_facts)")
        q, row = questions[item["id"]], item["ours"]["natural"]
        out.append({"id": q.id, "program": q.program, "kind": q.kind, "mode": mode, "question": item["sentence"],
                    "answer": row.get("answer"), "lead": row.get("lead"), "grounded": row.get("grounded"),
                    "confidence": row.get("confidence"), "metrics": {k: row.get(k) for k in METRIC_KEYS},
                    "bm25_evidence_hit": item.get("bm25", {}).get("natural", {}).get("evidence_hit"),
                    "seconds": row["seconds"], "leads": list(q.leads), "key_facts": list(q.key_facts),
                    "gold": [list(s) for s in q.spans], "gold_answer": q.answer})
    return out


def run(data: Path, out: Path, programs_dir: Path, split: str, tag: str, mode: str, overrides: list[str],
        log=print) -> Path:
    """The eval of every program of ``split`` (``overrides`` apply to each); returns the tag's folder."""
    from pipeline.api import run as run_graph

    folder = out / check_tag(tag)
    chosen = programs(data, split)
    if not chosen:
        raise InputError(f"{data / 'programs.json'} has no program in split '{split}'")
    jobs = []
    for name, entry in chosen.items():  # everything checked before the first program runs
        source, root = questions_file(data, name, entry["split"]), program_root(programs_dir, name, entry)
        if not source.is_file():
            raise InputError(f"program {name}: no question file {source}")
        if not root.is_dir():
            raise InputError(f"program {name} is not fetched ({root} is missing): run python -m bench.natural fetch "
                             f"--split {split}")
        jobs.append((name, source, root))
    answers, runs, started = [], {}, time.time()
    for name, source, root in jobs:
        run_dir = folder / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run of this tag: its question folders go
        args = ["pipeline=eval", f"eval.mode={mode}", f"program_root={root}", f"questions={source}", *overrides]
        log(f"{name}: {source.name} over {root} ({mode})")
        table, _ = run_graph(args, run_dir=run_dir)
        log(str(table))
        answers += answers_of(json.loads((run_dir / "eval.json").read_text(encoding="utf-8")), source, mode)
        runs[name] = str(run_dir)
    meta = {"tag": tag, "split": split, "mode": mode, "overrides": overrides, "programs": runs,
            "questions": len(answers), "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1)}
    write_atomic(folder / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in answers))
    write_atomic(folder / "run.json", json.dumps(meta, indent=2))
    write_summary(folder, data / "grades" / f"{tag}.jsonl")
    return folder
