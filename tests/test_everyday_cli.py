"""Issue 37, everyday use of the command line: `prompt=` required about another program, a short --help (Hydra's
behind --help-config), and no run folder left by a run that failed before any node ran."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import call_main

import pipeline.build as build_app
import pipeline.chat as chat_app
import pipeline.export as export_app
import pipeline.questions as questions_app
import pipeline.run as run_app
import pipeline.show as show_app
from pipeline import PROJECT_ROOT
from pipeline.api import compose
from pipeline.engine.errors import ConfigError
from pipeline.question_text import check_prompt_given

GOOD = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add."""\n    return a + b\n'}
TINY = ["model=tiny_random", "decode.max_new_tokens=4", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4"]
HYDRA_APPS = {"run": run_app, "chat": chat_app, "build": build_app, "export": export_app, "questions": questions_app,
              "show": show_app}


@pytest.fixture
def ws(tmp_path, make_tree):
    return {"tmp": tmp_path, "program": make_tree(tmp_path / "prog", GOOD), "outputs": tmp_path / "out"}


def no_model(monkeypatch):
    from stages.model import TinyRandomLlama

    monkeypatch.setattr(TinyRandomLlama, "run", lambda self: pytest.fail("the model loaded"))


# ---- #1 prompt= is required about a program that is not this project ------------------------------------------

def test_a_forgotten_prompt_is_one_line_and_exit_2_before_the_model_loads(ws, monkeypatch):
    no_model(monkeypatch)
    code, out, err = call_main(run_app.main, [*TINY, f"program_root={ws['program']}", f"paths.outputs={ws['outputs']}"])
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"error: prompt=... is required when asking about {ws['program']}: ")
    assert not ws["outputs"].exists()  # and nothing was left behind


def test_export_needs_the_prompt_too(ws, monkeypatch):
    no_model(monkeypatch)
    code, _, err = call_main(export_app.main, ["model=tiny_random", f"program_root={ws['program']}",
                                               f"paths.outputs={ws['outputs']}", f"out={ws['tmp'] / 'lora'}"],
                             prog="pipeline.export")
    assert code == 2 and err.startswith("error: prompt=... is required when asking about "), err


@pytest.mark.parametrize("overrides", [
    [],                                                   # the bundled program: its default question
    [f"program_root={PROJECT_ROOT / 'pipeline'}"],        # a part of it
    ["program_root={program}", "prompt=how does add work"],
    ["program_root={program}", "pipeline=build"],          # a graph that asks no question
    ["program_root={program}", "pipeline=eval", "questions=q.jsonl"],  # a question set, not one question
    ["program_root={tmp}/missing"],                       # the index node names the missing folder
], ids=["bundled", "project-part", "prompt-given", "build", "eval", "missing-folder"])
def test_when_the_default_question_is_fine(ws, overrides):
    overrides = [o.format(program=ws["program"], tmp=ws["tmp"]) for o in overrides]
    check_prompt_given(compose(overrides), overrides)


def test_the_check_reads_the_overrides_not_only_the_value(ws):
    cfg = compose([f"program_root={ws['program']}"])
    with pytest.raises(ConfigError, match=r"^prompt=\.\.\. is required when asking about "):
        check_prompt_given(cfg, [f"program_root={ws['program']}"])
    # typing the default question yourself is asking it
    check_prompt_given(cfg, [f"program_root={ws['program']}", f"prompt={cfg.prompt}"])


@pytest.mark.slow
def test_the_bundled_program_without_a_prompt_still_answers(tmp_path):
    # select=question: the check under test runs before any node; MiniLM over this whole project would cost ~25 s
    code, out, err = call_main(run_app.main, [*TINY, f"paths.outputs={tmp_path / 'out'}", "report=none", "select=question"])
    assert code == 0, err
    assert out.strip() and "run folder: " in err


# ---- #7 --help is our usage; Hydra's listing is --help-config --------------------------------------------------

@pytest.mark.parametrize("name", sorted(HYDRA_APPS))
def test_help_is_short_and_points_to_help_config(name):
    code, out, err = call_main(HYDRA_APPS[name].main, ["--help"], prog=f"pipeline.{name}")
    assert code == 0, err
    assert out.startswith(f"usage: python -m pipeline.{name}") and "--help-config" in out
    assert len(out.splitlines()) <= 40 and "== Configuration groups ==" not in out
    assert "program_root=<folder>" in out and "-v " in out


def test_run_help_leads_with_the_knobs_people_change_first():
    code, out, _ = call_main(run_app.main, ["-h"])
    knobs = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert code == 0 and knobs[:3] == ["program_root=<folder>", 'prompt="<question>"', "decode.max_new_tokens=<n>"]
    for knob in ("model=", "select=hybrid|question|zoom", "pack.context_tokens=", "synth=", "mix.alpha=", "pipeline=",
                 "--json"):
        assert any(k.startswith(knob) for k in knobs), knob
    assert "(default 256)" in out  # read from conf/decode/greedy.yaml


def test_json_flag_is_listed_only_where_an_answer_is_printed():
    from pipeline import build

    _, out, _ = call_main(build.main, ["--help"], prog="pipeline.build")
    assert out.startswith("usage: python -m pipeline.build") and "--json" not in out


@pytest.mark.parametrize("name", ["summary", "report"])
def test_the_other_commands_keep_their_help(name):
    proc = subprocess.run([sys.executable, "-m", f"pipeline.{name}", "--help"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr


@pytest.mark.parametrize("name", ["run", "build"])
def test_help_config_is_hydras_listing(name):
    code, out, err = call_main(HYDRA_APPS[name].main, ["--help-config", "select=zoom"], prog=f"pipeline.{name}")
    assert code == 0, err
    assert "== Configuration groups ==" in out and "select: hybrid, question, zoom" in out and "== Config ==" in out
    assert not out.startswith("usage:")


# ---- #10 a run that fails before any node runs leaves nothing behind ------------------------------------------

@pytest.mark.parametrize("bad", [
    "mix.alpah=3",                              # a mistyped key (Hydra refuses it while composing)
    "select=zom",                               # a mistyped option
    "pipeline.nodes.select.in.index=nope.x",    # the graph does not validate
    "max_question_tokens=0",                    # refused before the graph is built
], ids=["key", "option", "validation", "question-check"])
def test_a_failure_before_any_node_leaves_no_folder(ws, monkeypatch, bad):
    no_model(monkeypatch)
    code, _, err = call_main(run_app.main, [*TINY, f"paths.outputs={ws['outputs']}", "prompt=how does add work",
                                            f"program_root={ws['program']}", bad])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not ws["outputs"].exists(), sorted(str(p) for p in ws["outputs"].rglob("*"))


def test_ctrl_c_before_any_node_leaves_no_folder(ws, monkeypatch):
    import pipeline.app

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.app, "run_config", interrupt)
    code, out, err = call_main(run_app.main, [*TINY, f"paths.outputs={ws['outputs']}", "prompt=how does add work",
                                              f"program_root={ws['program']}"])
    assert (code, out, err) == (130, "", "error: interrupted before any node ran\n")
    assert not ws["outputs"].exists(), sorted(str(p) for p in ws["outputs"].rglob("*"))


def test_an_existing_run_folder_is_never_removed(ws, monkeypatch):
    no_model(monkeypatch)
    mine = ws["tmp"] / "mine"
    mine.mkdir()
    code, _, _ = call_main(run_app.main, [*TINY, f"hydra.run.dir={mine}", f"program_root={ws['program']}"])
    assert code == 2 and mine.is_dir()


def test_a_failure_at_a_node_keeps_its_folder_and_trace(ws, monkeypatch):
    no_model(monkeypatch)
    run_dir = ws["outputs"] / "runs" / "one"
    code, _, err = call_main(run_app.main, [*TINY, f"paths.outputs={ws['outputs']}", f"hydra.run.dir={run_dir}",
                                            f"program_root={ws['tmp'] / 'missing'}", "prompt=how does add work"])
    assert code == 2 and err.startswith("error: node 'index':"), err
    assert (run_dir / "trace.json").is_file()
