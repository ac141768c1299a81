"""Issue 37 item 10 for sweeps: a job of a `-m` sweep that fails before any node ran leaves no job folder, a sweep
whose every job failed so leaves no sweep folder, and a job that ran keeps its folder (pipeline/callbacks.py).

In-process (`call_main`) with the retrieval graph and the tiny model, so a sweep costs about a second."""
from __future__ import annotations

import pytest
from conftest import call_main

import pipeline.run as run_app

GOOD = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add."""\n    return a + b\n'}


@pytest.fixture
def ws(tmp_path, make_tree):
    return {"tmp": tmp_path, "program": make_tree(tmp_path / "prog", GOOD), "outputs": tmp_path / "out"}


def sweep(ws, *extra: str, sweep_dir=None) -> tuple[int, str, str]:
    """`python -m pipeline.run -m ...` over the retrieval graph; the sweep folder is Hydra's default under outputs."""
    where = [f"hydra.sweep.dir={sweep_dir}"] if sweep_dir is not None else []
    return call_main(run_app.main, ["-m", "pipeline=retrieve", "model=tiny_random", "select=question",
                                    f"program_root={ws['program']}", "prompt=how does add work",
                                    f"paths.outputs={ws['outputs']}", *where, *extra])


def left(folder) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("bad", [
    "select.top_k=-1,2",    # the first job does not validate (one line, exit 2: the sweep ends there)
    "select.top_kk=1,2",    # no job composes
], ids=["validation", "compose"])
def test_a_sweep_whose_jobs_failed_before_any_node_leaves_no_folder(ws, bad):
    code, _, err = sweep(ws, bad)
    assert code == 2 and err.splitlines()[-1].startswith("error: "), err
    assert not ws["outputs"].exists(), left(ws["outputs"])  # no job folder, no sweep folder, no parent it made


def test_a_job_that_ran_keeps_its_folder_and_the_failed_one_leaves_none(ws):
    sweep_dir = ws["outputs"] / "multirun" / "mine"
    code, _, err = sweep(ws, "select.top_k=2,-1", sweep_dir=sweep_dir)
    assert code == 2 and err.splitlines()[-1] == "error: node 'select': config key 'top_k' must be >= 1, got -1", err
    assert (sweep_dir / "0" / "trace.json").is_file() and (sweep_dir / "multirun.yaml").is_file()
    assert not (sweep_dir / "1").exists(), left(sweep_dir)


def test_ctrl_c_before_a_jobs_first_node_leaves_no_folder(ws, monkeypatch):
    import pipeline.app

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.app, "run_config", interrupt)
    code, out, err = sweep(ws, "select.top_k=2,4")
    assert (code, out, err.splitlines()[-1]) == (130, "", "error: interrupted before any node ran"), err
    assert not ws["outputs"].exists(), left(ws["outputs"])


def test_a_sweep_folder_that_existed_is_never_removed(ws):
    mine = ws["tmp"] / "mine"
    mine.mkdir()
    code, _, _ = sweep(ws, "select.top_k=-1,2", sweep_dir=mine)
    assert code == 2 and mine.is_dir()
