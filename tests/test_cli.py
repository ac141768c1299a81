"""`python -m pipeline.run` in a subprocess: a real multirun, and one-line errors for bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from pipeline import PROJECT_ROOT


def read_json(path):
    return json.loads(path.read_text())


# a copy of part of this project (more files than select.top_k, so the selection leaves some out): select=hybrid
# embeds every window of the program cold, ~70 s for the whole project on one thread, ~4 s for these 13 files
SOME_OF_THE_PROJECT = ("pipeline/engine", "pipeline/report")
PROMPT = "How does the pipeline check the wiring of a graph before it runs any stage?"  # the default question


@pytest.fixture
def program(tmp_path):
    root = tmp_path / "program"
    for folder in SOME_OF_THE_PROJECT:
        shutil.copytree(PROJECT_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_multirun_writes_telemetry_and_trace_per_job(tmp_path, cli, program):
    sweep = tmp_path / "sweep"
    # pack.follow_calls=0: a followed callee may come from a file the selection did not rank
    proc = cli(["-m", "model=tiny_random", f"program_root={program}", f"prompt='{PROMPT}'", "rerank=heuristic,none",
                "decode.max_new_tokens=8", "pack.follow_calls=0", "decode.min_new_tokens=0",
                "fallback.max_new_tokens_floor=8", f"hydra.sweep.dir={sweep}", f"paths.outputs={tmp_path / 'outputs'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    telemetry = [read_json(j / "telemetry.json") for j in jobs]
    traces = [read_json(j / "trace.json") for j in jobs]
    assert ["rerank=heuristic" in t["overrides"] for t in telemetry] == [True, False]
    assert ["rerank=none" in t["overrides"] for t in telemetry] == [False, True]
    for tele, trace, job in zip(telemetry, traces, jobs):
        assert tele["status"] == "ok" and tele["error"] is None
        assert tele["model"].startswith("tiny-random-llama")
        assert tele["answer"] is not None and tele["answer"] in proc.stdout
        assert tele["files_selected"] and tele["windows_packed"]
        assert {w["path"] for w in tele["windows_packed"]} <= set(tele["files_selected"])
        assert len(tele["files_selected"]) < len(list(program.rglob("*.py")))  # the selection chose
        assert set(tele["file_scores"]) == set(tele["files_selected"])  # what ranked them, for the report
        assert len(tele["window_scores"]) == len(tele["windows_packed"])
        assert trace["failure"] is None and trace["overrides"] == tele["overrides"]
        statuses = {n["node"]: n["status"] for n in trace["nodes"]}
        assert set(statuses.values()) <= {"ok", "skipped"}
        assert all(n["peak_rss_mb"] > 0 for n in trace["nodes"] if n["status"] == "ok")
        for name in ("index", "select", "rerank", "pack", "scaffold", "decode", "cite", "repair", "telemetry"):
            assert statuses[name] == "ok", (job.name, name)
        rerank = next(n for n in trace["nodes"] if n["node"] == "rerank")
        expected = "HeuristicRerank" if "rerank=heuristic" in tele["overrides"] else "NoRerank"
        assert rerank["stage"].endswith(expected)
        # the stage-2 retry ran exactly when the first citation check failed
        cite = next(n for n in trace["nodes"] if n["node"] == "cite")
        retry = [n for n in trace["nodes"] if n["node"] == "decode_retry"]
        if retry:
            assert retry[0]["status"] == ("skipped" if cite["outputs"]["passed"] else "ok")
        # every node that ran before telemetry is in its timings
        names = [n["node"] for n in trace["nodes"]]
        before = trace["nodes"][:names.index("telemetry")]
        assert {n["node"] for n in before if n["status"] == "ok"} <= set(tele["timings"])
    # one process: the second job reuses the model loaded by the first
    assert telemetry[1]["timings"]["model"] < telemetry[0]["timings"]["model"]
    # the multirun says where it went; its report links every job's report
    assert f"sweep folder: {sweep}" in proc.stderr and all((j / "report.html").is_file() for j in jobs)
    report = (sweep / "report.html").read_text()
    assert 'href="0/report.html"' in report and 'href="1/report.html"' in report


@pytest.mark.parametrize("override,fragments", [
    ("select.top_k=0", ["node 'select'", "top_k", ">= 1"]),
    ("pipeline.nodes.rerank.in.selection=nope.selection", ["node 'rerank'", "selection", "unknown node 'nope'"]),
])
def test_bad_override_is_one_error_line(tmp_path, cli, override, fragments):
    proc = cli(["model=tiny_random", override, f"hydra.run.dir={tmp_path / 'run'}",
                f"paths.outputs={tmp_path / 'outputs'}"], timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    # validation failed before any node ran: nothing was traced as run
    assert not (tmp_path / "run" / "telemetry.json").exists()


def test_a_multirun_over_decoding_reuses_the_first_jobs_prompt_cache(tmp_path, cli, program):
    """`-m` marks each job as one of a sweep: the second job, same model, mix and prompt, pays no prefill."""
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "model=tiny_random", f"program_root={program}", f"prompt='{PROMPT}'", "select=question",
                "decode.repetition_penalty=1.1,1.3", "decode.max_new_tokens=4", "decode.min_new_tokens=0",
                "fallback.max_new_tokens_floor=4", f"hydra.sweep.dir={sweep}", f"paths.outputs={tmp_path / 'outputs'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    telemetry = [read_json(sweep / job / "telemetry.json") for job in ("0", "1")]
    assert [t["lead"]["prefill_reused"] for t in telemetry] == [False, True]


def test_runtime_input_error_is_one_line_and_still_reports(tmp_path, cli):
    missing = tmp_path / "no-such-program"
    run_dir = tmp_path / "run"
    proc = cli(["model=tiny_random", f"program_root={missing}", f"hydra.run.dir={run_dir}",
                f"paths.outputs={tmp_path / 'outputs'}"], timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "node 'index'" in lines[0] and "does not exist" in lines[0] and str(missing) in lines[0]
    # the always-nodes still ran: telemetry records the failure, the trace names the failed node
    tele = read_json(run_dir / "telemetry.json")
    assert tele["status"] == "failed" and "index" in tele["error"]
    trace = read_json(run_dir / "trace.json")
    assert "index" in trace["failure"]
    statuses = {n["node"]: n["status"] for n in trace["nodes"]}
    assert statuses["index"] == "failed" and statuses["telemetry"] == "ok" and statuses["decode"] == "skipped"


def test_bench_names_its_benchmarks_when_given_an_unknown_one():
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "overhead,speed"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown benchmark 'speed'" in done.stderr and "model_load" in done.stderr
    assert not done.stdout  # nothing measured, nothing printed as a result


def test_hydra_cfg_and_info_flags_print_and_run_nothing(tmp_path, cli):
    proc = cli(["--cfg", "job", "rerank=none", "select=zoom", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_target_: stages.rerank.NoRerank" in proc.stdout and "zoom_symbol" in proc.stdout
    assert not (tmp_path / "run").exists()  # composed and printed, nothing ran
    proc = cli(["--cfg", "job", "--package", "pipeline"])
    assert proc.returncode == 0 and proc.stdout.startswith("# @package pipeline") and "name: answer" in proc.stdout
    proc = cli(["--info"])
    assert proc.returncode == 0 and "Installed Hydra Plugins" in proc.stdout
