"""Issue 12 item 8 and issue 15 item 4: questions as typed, Hydra's errors as one line with exit 2, our usage,
where a run went. Each command runs in this process (`python -m pipeline.run <args>`), the tiny model stays loaded."""
from __future__ import annotations

import json
import os

import pytest
from conftest import call_main

import pipeline.run as run_app
from pipeline.cli import escape_interpolation, hydra_quoted, prepare_argv

PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'}


def call(args: list[str]) -> tuple[int, str, str]:
    return call_main(run_app.main, args)


@pytest.fixture
def ws(tmp_path, make_tree):
    return {"tmp": tmp_path, "program": make_tree(tmp_path / "prog", PROGRAM), "outputs": tmp_path / "out"}


def run_args(ws, name="run") -> list[str]:
    return ["model=tiny_random", f"paths.outputs={ws['outputs']}", f"hydra.run.dir={ws['tmp'] / name}",
            f"program_root={ws['program']}", "decode.max_new_tokens=4", "decode.min_new_tokens=0",
            "fallback.max_new_tokens_floor=4"]


QUESTIONS = [
    "What's new in f(x), and why?",
    "what does ${x} mean",
    "Is ${oc.env:HOME} read?",
    'a "quoted" word, a back\\slash\\ and a trailing one\\',
    "key=value [1,2] {a: b} ~tilde +plus",
]


@pytest.mark.parametrize("question", QUESTIONS)
def test_a_question_is_asked_as_typed_and_never_interpolated(ws, tiny_lm, question):
    code, out, err = call(run_args(ws) + [f"prompt={question}"])
    assert code == 0, err
    tele = json.loads((ws["tmp"] / "run" / "telemetry.json").read_text())
    assert tele["prompt"] == question
    assert os.environ.get("HOME", "/") not in tele["prompt"] or "HOME" not in question
    assert "Traceback" not in err


def test_questions_already_quoted_for_hydra_sweep_as_hydra_would():
    assert prepare_argv(["prompt='a, b','c'"]) == ["prompt='a, b','c'"]
    assert prepare_argv(["+prompt=x ${y}"]) == ["+prompt='x \\${y}'"]
    assert prepare_argv(["prompt=null", "rerank=none", "~prompt"]) == ["prompt=null", "rerank=none", "~prompt"]
    # the escaping round-trips through Hydra's grammar and OmegaConf for awkward text
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for text in QUESTIONS + ["\\${x}", "\\\\${x}", "'", "\\", "", "${", "}"]:
        value = OverridesParser.create().parse_override(f"prompt={hydra_quoted(escape_interpolation(text))}").value()
        assert OmegaConf.create({"prompt": value, "inp": "${prompt}"}).inp == text


@pytest.mark.parametrize("override,expected", [
    ("mix.alpah=3", "error: unknown config key 'mix.alpah' (did you mean mix.alpha?)"),
    ("selct=zoom", "error: unknown config key 'selct' (did you mean select?)"),
    ("select=zom", "error: select=zom: no option 'zom' in group 'select' (did you mean select=zoom?); options: hybrid, question, zoom"),
    ("x=(", "error: cannot parse the override 'x=('"),
    ("hydra.verbos=true", "error: unknown config key 'hydra.verbos' (did you mean hydra.verbose?)"),
])
def test_a_mistyped_override_is_our_one_line_with_exit_2(ws, override, expected):
    code, out, err = call(run_args(ws) + [override])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), err
    assert "+mix.alpah" not in err and "append" not in err and "HYDRA_FULL_ERROR" not in err
    assert not (ws["tmp"] / "run").exists()  # nothing ran


def test_a_mistyped_override_shows_the_traceback_with_hydra_verbose(ws):
    code, out, err = call(run_args(ws) + ["mix.alpah=3", "hydra.verbose=true"])
    assert code == 1 and "Traceback" in err and "ConfigCompositionException" in err


def test_help_is_our_usage_and_hydras_is_help_config(ws):
    code, out, err = call(["--help"])
    assert code == 0, err
    assert out.startswith("usage: python -m pipeline.run")
    assert 'prompt="<question>"' in out and "select=hybrid|question|zoom" in out and "examples:" in out
    assert "== Configuration groups ==" not in out and "--help-config" in out


def test_a_run_says_where_it_went_and_the_result_stays_the_last_stdout_line(ws, tiny_lm):
    code, out, err = call(run_args(ws) + ["prompt=how does add work"])
    assert code == 0, err
    run = ws["tmp"] / "run"
    assert f"run folder: {run}" in err and f"report: {run / 'report.html'}" in err
    assert (run / "report.html").is_file()
    tele = json.loads((run / "telemetry.json").read_text())
    assert out.rstrip("\n").endswith(tele["answer"])
    code, out, err = call(run_args(ws, "quiet") + ["prompt=how does add work", "report=none"])
    assert code == 0 and not (ws["tmp"] / "quiet" / "report.html").exists() and "report:" not in err


def test_a_failed_run_names_its_report_on_the_one_error_line(ws, tiny_lm):
    code, out, err = call(run_args(ws) + [f"program_root={ws['tmp'] / 'nope'}"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: node 'index':"), err
    report = ws["tmp"] / "run" / "report.html"
    assert lines[0].endswith(f"(report: {report})") and report.is_file()
    assert 'data-node="index" data-status="failed"' in report.read_text()


def test_every_console_command_names_a_callable():
    import importlib
    import tomllib

    from pipeline import PROJECT_ROOT

    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"pca-run", "pca-chat", "pca-summary", "pca-report"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_the_python_api_passes_text_through_unchanged():
    from pipeline.api import _literal, compose

    for text in QUESTIONS + ["a\\b", "\\${x}", "it's"]:
        assert compose([f"prompt={_literal(text)}"]).pipeline.inputs.prompt == text


def test_a_run_folder_that_cannot_be_made_is_one_line(ws):
    blocker = ws["tmp"] / "a-file"
    blocker.write_text("")
    args = [a for a in run_args(ws) if not a.startswith("hydra.run.dir=")]
    code, out, err = call(args + [f"hydra.run.dir={blocker / 'run'}", "prompt=how does add work"])
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocker) in lines[0], err
