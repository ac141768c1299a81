"""Scale-out without code changes: real `-m` sweeps through the joblib and submitit launchers and the Optuna
sweeper (the `sweeps` extra), then `pipeline.summary` over the multirun folder they wrote."""
from __future__ import annotations

import json

import pytest

from pipeline.summary import summarize

# a two-file program: each job embeds its windows cold (select=hybrid), ~24 s a job for this project's pipeline/
PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'}


@pytest.fixture
def retrieve(tmp_path, make_tree):
    """The retrieve graph with the tiny model over a two-file program."""
    program = make_tree(tmp_path / "prog", PROGRAM)
    return ["pipeline=retrieve", "model=tiny_random", f"program_root={program}", "prompt='how does add work'"]


def job_folders(sweep):
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def check_jobs(proc, sweep, count):
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_folders(sweep)
    assert len(jobs) == count
    for job in jobs:
        trace = json.loads((job / "trace.json").read_text())
        assert trace["failure"] is None and trace["pipeline"] == "retrieve"
    return jobs


def test_joblib_launcher_runs_the_sweep_and_summary_reads_it(cli, tmp_path, retrieve):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = cli(["-m", *retrieve, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "rerank=heuristic,none",
                f"paths.outputs={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}"])
    check_jobs(proc, sweep, 2)
    text, csv_path, png_path = summarize(sweep, metric=None)
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["job", "rerank", "status"] and lines[2].split()[:2] == ["0", "heuristic"]
    assert csv_path.read_text().count("\n") == 3 and "trace.seconds" in lines[1]
    assert png_path.name == "summary_trace.seconds.png" and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_submitit_local_launcher_runs_each_job_in_its_own_process(cli, tmp_path, retrieve):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = cli(["-m", *retrieve, "hydra/launcher=submitit_cpu", "hydra.launcher.timeout_min=5", "select.top_k=2,4",
                f"paths.outputs={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}"])
    check_jobs(proc, sweep, 2)
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # submitit's executor really ran them
