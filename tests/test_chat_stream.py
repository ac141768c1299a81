"""Issue 15 items 2-4: the answer streamed on a terminal (and only there), the chat, and what export prints."""
from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

from report_fixtures import telemetry, write_program, write_run

from pipeline import PROJECT_ROOT
from pipeline.chat import NOT_FOUND, show_answer
from pipeline.runfolder import settings_of
from stages.common.generation.streaming import DRAFT_BANNER, RETRY_BANNER

TINY = ["model=tiny_random", "decode.max_new_tokens=6", "decode.min_new_tokens=6", "fallback.max_new_tokens_floor=6"]
PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'}


def env() -> dict:
    out = dict(os.environ)
    out.pop("HYDRA_FULL_ERROR", None)
    out.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return out


def run_in_terminal(args: list[str], timeout: float = 240) -> tuple[int, str]:
    """`python -m <args>` with stdout and stderr on a pseudo-terminal, as a person at a terminal would run it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=PROJECT_ROOT, env=env(), stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


def test_the_answer_streams_on_a_terminal_with_the_retry_marked(tmp_path, make_tree):
    program = make_tree(tmp_path / "prog", PROGRAM)
    args = ["pipeline.run", *TINY, f"program_root={program}", "prompt=how does add work", "cite.min_citations=99",
            f"hydra.run.dir={tmp_path / 'run'}", f"paths.outputs={tmp_path / 'out'}"]
    code, screen = run_in_terminal(args)
    assert code == 0, screen[-3000:]
    tele = json.loads((tmp_path / "run" / "telemetry.json").read_text())
    assert DRAFT_BANNER.strip() in screen
    # no answer cites 99 windows: the first check fails, the retry runs and is announced before its tokens
    assert tele["retries"] == 1 and RETRY_BANNER.strip() in screen
    # the checked answer is the retry's draft as streamed and the cut notice (6 new tokens end no reply): the checks
    # line says only that, with the badge; the draft is not printed a second time
    assert screen.index(DRAFT_BANNER.strip()) < screen.index(RETRY_BANNER.strip()) < screen.index("run folder:")
    notice = " … [cut at max_new_tokens=6]"
    assert tele["answer"].endswith(notice) and tele["answer"].removesuffix(notice) in screen
    assert f"── checked: added{notice} · not grounded: " in screen and "cut at max_new_tokens=6 · confidence" in screen
    assert f"report: {tmp_path / 'run' / 'report.html'}" in screen


def test_nothing_extra_is_printed_when_stdout_is_not_a_terminal(tmp_path, make_tree, cli):
    program = make_tree(tmp_path / "prog", PROGRAM)
    proc = cli([*TINY, f"program_root={program}", "prompt=how does add work", f"hydra.run.dir={tmp_path / 'run'}",
                f"paths.outputs={tmp_path / 'out'}"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for banner in (DRAFT_BANNER, RETRY_BANNER, "── answer"):
        assert banner.strip() not in proc.stdout + proc.stderr


def test_chat_answers_question_after_question_from_stdin(tmp_path, make_tree):
    program = make_tree(tmp_path / "prog", PROGRAM)
    session = tmp_path / "chat"
    questions = "how does add work\n\nWhat's new in f(x), and why? ${x}\nexit\nnever asked\n"
    proc = subprocess.run([sys.executable, "-m", "pipeline.chat", *TINY, f"program_root={program}",
                           f"hydra.run.dir={session}", f"paths.outputs={tmp_path / 'out'}"], cwd=PROJECT_ROOT,
                          env=env(), input=questions, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the blank line is skipped, `exit` ends the chat: two questions, each with its own folder and report
    assert out.count("\n? ") == 2 and "never asked" not in out
    for number, question in ((1, "how does add work"), (2, "What's new in f(x), and why? ${x}")):
        folder = session / f"q{number:03d}"
        tele = json.loads((folder / "telemetry.json").read_text())
        assert tele["prompt"] == question  # as typed, never interpolated
        assert f"report: {folder / 'report.html'}" in out and (folder / "report.html").is_file()
        grounded = any(c["valid"] for c in tele["citations"])
        assert (NOT_FOUND in out) or grounded
    assert f"2 question(s); session folder: {session}" in out
    # one process: the model was loaded by the first question and reused by the second
    def model_seconds(folder):
        trace = json.loads((session / folder / "trace.json").read_text())
        return next(n["seconds"] for n in trace["nodes"] if n["node"] == "model")
    assert model_seconds("q002") < 0.2 * model_seconds("q001")
    assert "Traceback" not in proc.stderr and "node model" not in out  # node timings stay in the trace


def test_a_grounded_answer_shows_its_cited_code_and_an_ungrounded_one_says_so(tmp_path):
    program = write_program(tmp_path / "prog")
    run = write_run(tmp_path / "run", program, telemetry())
    settings = settings_of(None)
    settings["program_root"] = str(program)
    out = io.StringIO()
    show_answer(run, settings, out)
    text = out.getvalue()
    assert text.startswith("Numbers are added by `add`")
    assert "── pkg/core.py:4-6 (model citation)" in text and "    4 │ def add(a, b):" in text
    assert "── pkg/core.py:9-16 (attributed citation)" in text and "   16 │     return out" in text
    assert "pkg/missing.py" not in text.split("\n", 1)[1]  # an invalid citation shows no code
    for changes in ({"grounded": False}, {"grounded": None, "citations": []}):
        run = write_run(tmp_path / f"run{len(changes)}", program, telemetry(**changes))
        out = io.StringIO()
        show_answer(run, settings, out)
        assert out.getvalue().strip() == NOT_FOUND


def test_after_a_streamed_draft_chat_shows_only_what_the_checks_changed(tmp_path):
    program = write_program(tmp_path / "prog")
    run = write_run(tmp_path / "run", program, telemetry())
    settings = settings_of(None)
    settings["program_root"] = str(program)
    answer = json.loads((run / "telemetry.json").read_text())["answer"]
    out = io.StringIO()
    show_answer(run, settings, out, drafts=[answer])  # the draft as streamed is the answer: not printed again
    text = out.getvalue()
    assert "Numbers are added by `add`" not in text and "── pkg/core.py:4-6 (model citation)" in text
    out = io.StringIO()
    show_answer(run, settings, out, drafts=[answer.replace("added", "summed")])
    assert out.getvalue().startswith("── checked: summed → added ──"), out.getvalue()


def test_export_says_what_it_exported_and_where(tmp_path, make_tree):
    program = make_tree(tmp_path / "prog", PROGRAM)
    out = tmp_path / "lora"
    proc = subprocess.run([sys.executable, "-m", "pipeline.export", "model=tiny_random", f"program_root={program}",
                           "prompt=how does add work", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.outputs={tmp_path / 'out'}"], cwd=PROJECT_ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("exported the mixed"))
    assert lines[start + 1].split() == ["program:", str(program)]
    assert lines[start + 2].strip() == "question:  how does add work"
    assert lines[start + 3].split()[0] == "artifacts:" and str(tmp_path / "out" / "adapters") in lines[start + 3]
    assert lines[start + 4].split()[:2] == ["to:", str(out)]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
