"""Issue 37 items 3 and 9: stdout is the answer alone (or one JSON object with --json / output=json), logs go to the
run folder's log and to stderr only from WARNING up unless verbose, a progress line on a terminal, and after a streamed
draft only what the checks changed."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import call_main

import pipeline.run as run_app
from pipeline import PROJECT_ROOT
from pipeline.cli import shorthands
from pipeline.engine.errors import ConfigError
from pipeline.engine.records import CitationRecord, Telemetry
from pipeline.output import Progress, checks_line, output_mode

TINY = ["model=tiny_random", "decode.max_new_tokens=6", "decode.min_new_tokens=6", "fallback.max_new_tokens_floor=6"]
PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'}
INFO = re.compile(r"\]\[INFO\] - ")


def run(tmp_path: Path, make_tree, *extra: str, name: str = "run",
        here: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m pipeline.run` in a subprocess, or with ``here`` through the same main in this process (the tiny
    model stays loaded; the plain run and the JSON sweep below keep a real process's stdout and stderr)."""
    program = make_tree(tmp_path / "prog", PROGRAM)
    args = [*TINY, f"program_root={program}", "prompt=how does add work", f"hydra.run.dir={tmp_path / name}",
            f"paths.outputs={tmp_path / 'out'}", *extra]
    if here:
        code, out, err = call_main(run_app.main, args)
        proc = subprocess.CompletedProcess(args, code, out, err)
    else:
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        proc = subprocess.run([sys.executable, "-m", "pipeline.run", *args],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"^run folder: (.+)$", proc.stderr, re.MULTILINE)
    assert match, proc.stderr[-2000:]
    return proc, Path(match.group(1))


def test_stdout_is_the_answer_alone_and_the_logs_go_to_the_run_folder(tmp_path, make_tree):
    proc, folder = run(tmp_path, make_tree)
    telemetry = json.loads((folder / "telemetry.json").read_text())
    assert telemetry["answer"] and proc.stdout == telemetry["answer"] + "\n"
    assert not INFO.search(proc.stderr), proc.stderr
    log = (folder / "run.log").read_text()
    assert INFO.search(log) and "node decode" in log and "node telemetry" in log


def test_verbose_shows_the_node_timings_on_stderr_never_on_stdout(tmp_path, make_tree):
    proc, folder = run(tmp_path, make_tree, "hydra.verbose=true")  # a real process: logging set up from scratch
    assert re.search(r"\[INFO\] - node decode +\d+\.\d+s", proc.stderr)
    telemetry = json.loads((folder / "telemetry.json").read_text())
    assert proc.stdout == telemetry["answer"] + "\n"


@pytest.mark.parametrize("flag", ["--json", "output=json"])
def test_json_is_one_object_on_stdout_that_matches_the_telemetry(tmp_path, make_tree, flag):
    proc, folder = run(tmp_path, make_tree, flag, here=True)
    obj = json.loads(proc.stdout)  # nothing else on stdout
    assert proc.stdout.count("\n") == 1
    telemetry = json.loads((folder / "telemetry.json").read_text())
    assert obj["answer"] == telemetry["answer"] and obj["run_folder"] == str(folder)
    assert obj["timings"] == telemetry["timings"] and obj["elapsed_sec"] == telemetry["elapsed_sec"]
    grounded = telemetry["grounded"] if telemetry["grounded"] is not None else \
        any(c["valid"] for c in telemetry["citations"])
    assert obj["grounded"] == grounded and obj["report"] == str(folder / "report.html")
    assert set(obj) == {"answer", "citations", "grounded", "why", "confidence", "run_folder", "report", "timings",
                        "elapsed_sec"}
    assert obj["confidence"] == telemetry["confidence"] and 0 <= obj["confidence"] <= 1
    assert (obj["why"] == "") == grounded
    assert [(c["path"], c["start"], c["valid"]) for c in obj["citations"]] == \
        [(c["path"], c["start"], c["valid"]) for c in telemetry["citations"]]
    lines = PROGRAM["pkg/core.py"].splitlines()
    for cited in obj["citations"]:
        assert cited["path"] != "pkg/core.py" or cited["code"] == "\n".join(lines[cited["start"] - 1:cited["end"]])
    assert not INFO.search(proc.stderr)


def test_output_takes_text_or_json_and_the_flags_stand_for_overrides():
    assert output_mode({"output": "json"}) == "json" and output_mode({}) == "text"
    with pytest.raises(ConfigError, match="output=yaml: choose one of text, json"):
        output_mode({"output": "yaml"})
    assert shorthands(["--json", "-v", "prompt=-v"]) == ["output=json", "hydra.verbose=true", "prompt=-v"]


def _citation(path: str, start: int, end: int, **kw) -> CitationRecord:
    return CitationRecord(path=path, start=start, end=end, **kw)


def test_after_a_streamed_draft_only_what_the_checks_changed_is_shown():
    draft = "`add` adds [pkg/core.py:1-3] and [pkg/x.py:9]."
    assert checks_line(draft, ["`add`  adds [pkg/core.py:1-3]\nand [pkg/x.py:9]. "], None) is None
    record = Telemetry(citations=(_citation("pkg/core.py", 1, 3, valid=True),
                                  _citation("pkg/x.py", 9, 9, removed=True),
                                  _citation("pkg/core.py", 2, 3, valid=True, source="attributed")))
    # a few edits are listed as they are
    line = checks_line("`add` adds [pkg/core.py:1-3] and [not in evidence: pkg/x.py:9].", [draft], record)
    assert line == "── checked: [pkg/x.py:9]. → [not in evidence: pkg/x.py:9]. ──"
    # many: the citations the checks removed and attributed
    long_draft = " ".join(f"w{i}" for i in range(40))
    line = checks_line(" ".join(f"w{i}" if i % 4 else "x" for i in range(40)), [long_draft], record)
    assert line == "── checked: removed 1 citation (pkg/x.py:9); added 1 (pkg/core.py:2-3) ──"
    assert checks_line("first", ["first", "second"], None).startswith("── checked: draft 1 is the answer")
    unexplained = checks_line(" ".join(f"v{i}" for i in range(40)), [long_draft], Telemetry())
    assert unexplained.splitlines()[0] == "── checked answer (it differs from the draft) ──"
    assert unexplained.splitlines()[1].startswith("v0 v1")


def test_the_progress_line_names_a_slow_node_and_steps_aside_for_streamed_text():
    stream = io.StringIO()
    with Progress(stream, after=0.05, tick=0.01) as line:
        line("decode", None)
        time.sleep(0.2)
        shown = stream.getvalue()
        line.pause()
        paused_at = len(stream.getvalue())
        time.sleep(0.1)
        assert len(stream.getvalue()) == paused_at  # nothing drawn over the streamed text
        line("decode", 0.3)
        line("cite", None)
        line("cite", 0.001)
    assert "… decode 0 s" in shown and "cite" not in stream.getvalue()  # a fast node draws nothing
    assert stream.getvalue().endswith("\r\x1b[K")  # the line is cleared, not left behind


def test_the_executor_reports_each_node_start_and_end_to_a_listener(tmp_path):
    from test_execute import AddMilk, Brew, Spill, context, graph_of, node

    from pipeline.engine.errors import StageFailed
    from pipeline.engine.execute import execute, listening

    heard: list[tuple[str, bool]] = []
    graph = graph_of({"brew": node(Brew, "brew"), "milk": node(AddMilk, "milk", **{"in": {"cups": "brew.cups"}}),
                      "spill": node(Spill, "spill", **{"in": {"cups": "milk.cups"}})})
    with listening(lambda name, seconds: heard.append((name, seconds is None))), pytest.raises(StageFailed):
        execute(graph, context(tmp_path))
    # a failed node is reported ended too (the progress line is cleared)
    assert heard == [("brew", True), ("brew", False), ("milk", True), ("milk", False), ("spill", True), ("spill", False)]
    execute(graph_of({"brew": node(Brew, "brew")}), context(tmp_path))
    assert len(heard) == 6  # the listener is gone after the block


def test_an_unknown_output_is_one_line_and_exit_code_2(tmp_path, make_tree):
    program = make_tree(tmp_path / "prog", PROGRAM)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "model=tiny_random", f"program_root={program}",
                           "prompt=how does add work", "output=yaml", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "error: output=yaml: choose one of text, json"


def test_the_progress_line_leaves_the_terminal_to_a_stages_own_bar():
    from tqdm import tqdm

    stream = io.StringIO()
    with Progress(stream, after=0.0, tick=0.01) as line, tqdm(total=3, file=io.StringIO()):
        line("embed", None)
        time.sleep(0.1)
    assert "embed" not in stream.getvalue()


def test_a_json_sweep_prints_one_object_per_job_one_a_line(tmp_path, make_tree):
    program = make_tree(tmp_path / "prog", PROGRAM)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "-m", *TINY[:1], "decode.max_new_tokens=4,6",
                           "decode.min_new_tokens=4", "fallback.max_new_tokens_floor=6", f"program_root={program}",
                           "prompt=how does add work", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                           f"paths.outputs={tmp_path / 'out'}", "--json"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(job["run_folder"]) for job in jobs] == [tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"]
    for job in jobs:
        assert job["answer"] == json.loads((Path(job["run_folder"]) / "telemetry.json").read_text())["answer"]


def test_on_a_terminal_the_draft_streams_once_with_no_log_lines(tmp_path, make_tree):
    from test_chat_stream import run_in_terminal

    program = make_tree(tmp_path / "prog", PROGRAM)
    code, screen = run_in_terminal(["pipeline.run", *TINY, f"program_root={program}", "prompt=how does add work",
                                    f"hydra.run.dir={tmp_path / 'run'}", f"paths.outputs={tmp_path / 'out'}"])
    assert code == 0, screen[-3000:]
    answer = json.loads((tmp_path / "run" / "telemetry.json").read_text())["answer"]
    # 6 new tokens end no reply: the checked answer is the streamed draft and the cut notice (the badge node), and
    # the checks line says only that, with the badge
    notice = " … [cut at max_new_tokens=6]"
    assert answer.endswith(notice) and screen.count(answer.removesuffix(notice)) == 1
    assert f"── checked: added{notice} · not grounded: " in screen and "cut at max_new_tokens=6 · confidence" in screen
    assert not INFO.search(screen) and f"run folder: {tmp_path / 'run'}" in screen


def test_json_of_a_graph_that_writes_no_telemetry_holds_its_result_and_timings(tmp_path):
    from pipeline.output import answer_object

    obj = answer_object(tmp_path, tmp_path / "artifacts", {"index": 0.5, "synth": 1.25})
    assert obj["answer"] == str(tmp_path / "artifacts") and obj["citations"] == [] and obj["grounded"] is False
    assert obj["timings"] == {"index": 0.5, "synth": 1.25} and obj["elapsed_sec"] == 1.75 and obj["report"] is None
    json.dumps(obj)  # every value is JSON
