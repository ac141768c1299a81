"""Issue 36 items 1-2: a question's length (`max_question_tokens`) and its bytes, on every way in: the command line,
the chat (a bad line costs that line only) and the Python API. Each refusal is one line, exit code 2 on the command
line, before any model loads where the characters already tell."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import call_main

import pipeline.run as run_app
from pipeline import PROJECT_ROOT
from pipeline.engine.errors import InputError, PipelineError
from pipeline.question_text import MAX_CHARS_PER_TOKEN, preview, question_problem, text_problem

PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'}
TINY = ["model=tiny_random", "decode.max_new_tokens=4", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4"]
LIMIT = 512  # conf/config.yaml max_question_tokens


@pytest.fixture
def ws(tmp_path, make_tree):
    return {"tmp": tmp_path, "program": make_tree(tmp_path / "prog", PROGRAM), "outputs": tmp_path / "out"}


def run_args(ws, name="run") -> list[str]:
    return [*TINY, f"paths.outputs={ws['outputs']}", f"hydra.run.dir={ws['tmp'] / name}", f"program_root={ws['program']}"]


def env() -> dict:
    out = dict(os.environ)
    out.pop("HYDRA_FULL_ERROR", None)
    out.pop("PYTHONIOENCODING", None)
    # a UTF-8 locale: Python reads stdin strictly there, so a line that is not UTF-8 would raise while reading
    out.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0"})
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    from stages.model import TinyRandomLlama

    monkeypatch.setattr(TinyRandomLlama, "run", lambda self: pytest.fail("the model loaded"))


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (code, err[-2000:])
    assert "Traceback" not in out + err
    return err.strip()


# ---- the checks themselves ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("how does add work?\n\tand why?\r\n", None),
    ("naïve café ✓ 😀 U+2028\u2028 ok", None),
    ("a\udcff b", "is not UTF-8 text (byte 0xff at character 2)"),
    ("ab\ud800", "is not UTF-8 text (a lone surrogate U+D800 at character 3)"),
    ("\x00x", "holds the control character U+0000 at character 1"),
    ("red \x1b[31m", "holds the control character U+001B at character 5"),
    ("c1 \x85", "holds the control character U+0085 at character 4"),
])
def test_text_that_is_not_typed_text_is_named(text, expected):
    problem = text_problem(text)
    assert problem == expected if expected is None else problem.startswith(expected)


def test_the_character_bound_follows_the_token_limit():
    assert question_problem("x" * (16 * MAX_CHARS_PER_TOKEN), 16) is None
    problem = question_problem("x" * (16 * MAX_CHARS_PER_TOKEN + 1), 16)
    assert problem == ("the question (prompt) is 129 characters; a question may have max_question_tokens=16 tokens "
                       "(at most 128 characters): ask a shorter one")


def test_a_preview_is_one_printable_line():
    assert preview("a\udcff\x00b") == "'a\\xff\\x00b'"
    assert preview("two\nlines\r\tand a tab") == "'two\\x0alines\\x0d\\x09and a tab'"
    assert preview("x" * 200_000) == f"'{'x' * 60}…' (200,000 characters)"


# ---- the command line -------------------------------------------------------------------------------------------

def test_a_long_question_fails_fast_before_the_model_loads(ws, no_model_load):
    started = time.monotonic()
    code, out, err = call_main(run_app.main, [*run_args(ws), "prompt=" + "where is add? " * 3600])  # 50,400 characters
    line = one_line_error(code, out, err)
    assert line == ("error: the question (prompt) is 50,400 characters; a question may have max_question_tokens=512 "
                    "tokens (at most 4,096 characters): ask a shorter one")
    assert time.monotonic() - started < 30
    assert not (ws["tmp"] / "run" / "trace.json").exists()  # no graph ran


@pytest.mark.parametrize("prompt, expected", [
    ("a\x1b[31m red", "holds the control character U+001B at character 2"),
    ("a\x7f b", "holds the control character U+007F at character 2"),
])
def test_control_characters_in_the_question_are_refused(ws, no_model_load, prompt, expected):
    line = one_line_error(*call_main(run_app.main, [*run_args(ws), f"prompt={prompt}"]))
    assert line.startswith(f"error: the question (prompt) {expected}")


def test_bytes_that_are_not_utf8_in_the_earlier_turn_are_refused(ws, no_model_load, monkeypatch):
    """`history=` may hold control characters (it carries the cited code, form feeds and all), never non-UTF-8 bytes."""
    import os
    import sys

    args = [*run_args(ws), "prompt=and then?", "history=" + os.fsdecode(b"Q: caf\xe9")]
    monkeypatch.setattr(sys, "argv", ["pipeline.run", *args])
    line = one_line_error(*call_main(run_app.main, args))
    assert line.startswith("error: the argument 'history=Q: caf\\xe9' is not UTF-8 text (byte 0xe9"), line


def test_max_question_tokens_is_a_positive_whole_number(ws, no_model_load):
    line = one_line_error(*call_main(run_app.main, [*run_args(ws), "max_question_tokens=0", "prompt=how"]))
    assert line == "error: max_question_tokens must be a whole number >= 1, got 0"


def test_the_tokens_are_counted_by_the_models_tokenizer_at_scaffold(ws, tiny_lm):
    """Within the character bound but over the tokens (the tiny model's tokens are bytes): the `scaffold` node
    refuses it, the weights come back as they were; a question that fits is answered."""
    snap = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    question = "how does add work with ü"  # 24 characters, 25 byte tokens
    code, out, err = call_main(run_app.main, [*run_args(ws), "max_question_tokens=24", f"prompt={question}"])
    line = one_line_error(code, out, err)
    assert line.startswith("error: node 'scaffold': the question (prompt) is 25 tokens; a question may have "
                           "max_question_tokens=24 tokens: ask a shorter one (report: ")
    assert all(torch.equal(v, snap[k]) for k, v in tiny_lm.model.state_dict().items())
    trace = json.loads((ws["tmp"] / "run" / "trace.json").read_text())
    assert trace["failed_node"] == "scaffold"
    code, out, err = call_main(run_app.main, [*run_args(ws, "fits"), "max_question_tokens=25", f"prompt={question}"])
    assert code == 0, err[-2000:]


def cli_bytes(args: list[bytes], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable.encode(), b"-m", b"pipeline.run", *args], cwd=PROJECT_ROOT, env=env(),
                          capture_output=True, timeout=120, **kwargs)


@pytest.mark.parametrize("arg, expected", [
    (b"prompt=a\xff b", "error: the question (prompt) is not UTF-8 text (byte 0xff at character 2)"),
    (b"program_root=/tmp/pr\xffog", "error: the argument 'program_root=/tmp/pr\\xffog' is not UTF-8 text "
                                     "(byte 0xff at character 21)"),
])
def test_bytes_that_are_not_utf8_on_the_command_line(ws, arg, expected):
    args = [a.encode() for a in run_args(ws)] + [arg]
    proc = cli_bytes(args)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and err == expected + "\n", err[-2000:]
    assert not (ws["tmp"] / "run").exists()  # refused before Hydra made the run folder


def test_the_longest_question_stays_small_in_memory(ws):
    """At the character bound the tiny model's byte tokens are 8x the limit: refused at scaffold, well under 2 GB."""
    question = ("where is add? " * 400)[: LIMIT * MAX_CHARS_PER_TOKEN]
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", *run_args(ws), f"prompt={question}"],
                          cwd=PROJECT_ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "node 'scaffold': the question (prompt) is 4,096 tokens" in proc.stderr
    trace = json.loads((ws["tmp"] / "run" / "trace.json").read_text())
    assert max(n.get("peak_rss_mb", 0.0) for n in trace["nodes"]) < 2000


# ---- the chat ---------------------------------------------------------------------------------------------------

def test_the_chat_survives_bad_lines_and_answers_the_next(ws):
    lines = [b"\x00\x01bad\xff\xfe ?", b"x" * 200_000, b"caf\xe9 au lait", b"how does add work", b"exit"]
    session = ws["tmp"] / "chat"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.chat", *run_args(ws), f"hydra.run.dir={session}"],
                          cwd=PROJECT_ROOT, env=env(), input=b"\n".join(lines) + b"\n", capture_output=True,
                          timeout=300)
    out, err = proc.stdout.decode(), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in out + err, (out[-3000:], err[-3000:])
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: the question (prompt) holds the control character U+0000 at character 1 (only tabs and line breaks "
        "may appear)",
        "error: the question (prompt) is 200,000 characters; a question may have max_question_tokens=512 tokens "
        "(at most 4,096 characters): ask a shorter one",
        "error: the question (prompt) is not UTF-8 text (byte 0xe9 at character 4)",
    ]
    assert "? 'xxxxxxxx" in out and "x" * 100 not in out  # a refused line is echoed short
    assert "1 question(s)" in out and sorted(p.name for p in session.glob("q*")) == ["q001"]
    assert json.loads((session / "q001" / "telemetry.json").read_text())["prompt"] == "how does add work"
    assert time.monotonic() - started < 240


# ---- the Python API ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    ("a\udcff b", "the question (prompt) is not UTF-8 text (byte 0xff at character 2)"),
    ("a\x00b", "the question (prompt) holds the control character U+0000 at character 2"),
    ("x" * 50_000, "the question (prompt) is 50,000 characters; a question may have max_question_tokens=512"),
])
@pytest.mark.parametrize("call", ["generate_answer", "retrieve"])
def test_the_python_api_raises_one_line(ws, no_model_load, prompt, expected, call):
    import pipeline

    outputs = [f"paths.outputs={ws['outputs']}"]
    with pytest.raises(PipelineError) as caught:
        if call == "generate_answer":
            pipeline.generate_answer("tiny_random", None, str(ws["program"]), prompt, overrides=outputs)
        else:
            pipeline.retrieve(str(ws["program"]), prompt, model_id="tiny_random", overrides=outputs)
    assert isinstance(caught.value, InputError)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_the_python_api_takes_the_limit_as_an_override(ws, no_model_load):
    import pipeline

    with pytest.raises(InputError, match=r"is 200 characters; a question may have max_question_tokens=16 tokens"):
        pipeline.retrieve(str(ws["program"]), "y" * 200, model_id="tiny_random",
                          overrides=[f"paths.outputs={ws['outputs']}", "max_question_tokens=16"])
