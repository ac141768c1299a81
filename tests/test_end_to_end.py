"""The real default model end to end (slow): the default prompt about a copy of this project's `pipeline/` and
`bench/` (the engine answers it; MiniLM over the whole project, cold, costs ~60 s more on one thread), citations
checked independently. The default program itself without a prompt: tests/test_everyday_cli.py."""
from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import PROJECT_ROOT, compose_config

from stages.common.grounding.citations import parse_citations
from stages.common.retrieval.aligned import FOLLOW_AT
from stages.index import build_index

# docs/behaviour.md §6 telemetry fields ("config overrides" is `overrides`)
SPEC_FIELDS = ["prompt", "answer", "overrides", "files_selected", "modules_selected", "windows_packed", "citations",
               "citations_total", "citations_valid", "citations_model", "citations_attributed", "citations_must",
               "retries", "fallback_used", "rank", "gsub", "alpha", "entropy", "delta_norms", "timings",
               "elapsed_sec", "tokens", "model", "device"]
MAX_NEW = 96
MARKER = re.compile(r"\[not in evidence: [^\]]*\]")
# pipeline/ alone ranks only 4 windows for the default question, so a followed callee would come before the 5th
PART_OF_THE_PROJECT = ("pipeline", "bench")


@pytest.mark.slow
def test_default_model_answers_with_valid_citations(tmp_path, cli):
    root = tmp_path / "program"
    for folder in PART_OF_THE_PROJECT:
        shutil.copytree(PROJECT_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    proc = cli([f"decode.max_new_tokens={MAX_NEW}", f"hydra.run.dir={run_dir}", f"program_root={root}",
                f"prompt={compose_config().prompt}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tele = json.loads((run_dir / "telemetry.json").read_text())
    trace = json.loads((run_dir / "trace.json").read_text())

    missing = [f for f in SPEC_FIELDS if f not in tele]
    assert not missing, missing
    assert tele["status"] == "ok" and trace["failure"] is None
    assert tele["prompt"] == compose_config().prompt
    assert "SmolLM2" in tele["model"] and tele["device"] == "cpu"
    answer = tele["answer"]
    assert answer and answer.strip() in proc.stdout

    # the packed windows are real spans; the ranked ones (before any followed callee, pack.follow_calls) of selected files
    windows = tele["windows_packed"]
    assert windows and {w["path"] for w in windows[:FOLLOW_AT]} <= set(tele["files_selected"])
    for w in windows:
        lines = (root / w["path"]).read_text(errors="replace").splitlines()
        assert 1 <= w["start"] <= w["end"] <= len(lines), w

    def in_windows(path, start, end):
        return any(w["path"] == path and w["start"] <= end and start <= w["end"] for w in windows)

    # every citation shown as evidence is valid and inside a packed window; invalid ones are marked removed
    cites = tele["citations"]
    for c in cites:
        if c["removed"]:
            assert c["valid"] is False and f"[not in evidence: {c['path']}:{c['start']}-{c['end']}]" in answer
        else:
            assert c["valid"] is True, c
            assert in_windows(c["path"], c["start"], c["end"]), c
            file_lines = len((root / c["path"]).read_text(errors="replace").splitlines())
            assert 1 <= c["start"] <= c["end"] <= file_lines, c
        assert c["source"] in ("model", "attributed")

    # the printed answer carries no citation-looking span outside the evidence
    ignore = list(compose_config().index.ignore)
    index = build_index(str(root), ignore, 1_000_000, 80, None)
    shown = parse_citations(MARKER.sub("", answer), index)
    for _, _, path, start, end in shown:
        assert in_windows(path, start, end), (path, start, end)
        assert any(c["path"] == path and c["start"] <= end and start <= c["end"] and not c["removed"] for c in cites)

    # counters agree with the list
    assert tele["citations_total"] == len(cites)
    assert tele["citations_valid"] == sum(c["valid"] for c in cites)
    assert tele["citations_model"] == sum(c["source"] == "model" for c in cites)
    assert tele["citations_attributed"] == sum(c["source"] == "attributed" for c in cites)
    assert tele["citations_model"] + tele["citations_attributed"] == tele["citations_total"]
    assert tele["retries"] in (0, 1) and isinstance(tele["fallback_used"], bool)
    assert 0 < tele["tokens"]["generated"] <= (max(256, MAX_NEW) if tele["fallback_used"] else MAX_NEW)
    assert tele["tokens"]["prompt"] > 0
    assert set(tele["timings"]) >= {"model", "index", "select", "pack", "decode", "cite"}
    assert tele["elapsed_sec"] >= max(tele["timings"].values())
