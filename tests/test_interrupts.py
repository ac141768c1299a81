"""Issue 37 item 2: Ctrl-C anywhere ends cleanly. On a real pseudo-terminal (the child's controlling terminal, so the
interrupt character becomes SIGINT to its process group, as at a person's keyboard): exit code 130, one line, no
traceback; during an answer the partial draft is kept in telemetry (marked interrupted), the report is written and
the weights are restored."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import call_main

import pipeline.run as run_app
from pipeline import PROJECT_ROOT
from stages.common.adapters.mixing import model_lock
from stages.common.generation.processors import Clock
from stages.common.generation.streaming import DRAFT_BANNER

PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'}
# a decode that runs for minutes unless interrupted (the tiny random model writes a few hundred tokens a second)
LONG = ["decode.max_new_tokens=50000", "decode.min_new_tokens=50000", "fallback.max_new_tokens_floor=4"]


class Terminal:
    """`python -m <args>` as a person at a terminal runs it: stdin, stdout and stderr on a pseudo-terminal that is
    the child's controlling terminal."""

    def __init__(self, args: list[str]):
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a new session whose controlling terminal is the pty
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # as from a shell (a background job inherits it ignored)
            os.chdir(PROJECT_ROOT)
            os.execve(sys.executable, [sys.executable, "-m", *args], env)
        self.screen, self.closed = "", False

    def read_until(self, done: Callable[[str], bool], timeout: float = 240) -> str:
        """Read the screen until ``done(screen)`` holds; fails with the screen so far after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done(self.screen):
            assert not self.closed and time.monotonic() < deadline, self.screen[-3000:]
            self._read(1.0)
        return self.screen

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def interrupt(self) -> None:
        """Ctrl-C, a person's half second after the screen showed what they react to: readline prints its prompt
        before it waits for input, and a SIGINT between the two is only seen at the next key."""
        time.sleep(0.5)
        self.send(b"\x03")

    def wait(self, timeout: float = 60) -> int:
        """Read the screen to its end; the exit code (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._read(1.0)
        if not self.closed:
            os.kill(self.pid, 9)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def _read(self, seconds: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if not ready:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            self.closed = True
        self.screen += data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def streaming(after: str, chars: int = 20, seconds: float = 3.0) -> Callable[[str], bool]:
    """Done once the draft streams after ``after``: ``chars`` characters of it on the screen, or ``seconds`` after
    its banner (the streamer shows text word by word, and a random model's words can be long)."""
    banner, since = DRAFT_BANNER.strip(), []

    def done(screen: str) -> bool:
        tail = screen[screen.find(after):] if after in screen else ""
        if banner not in tail:
            return False
        since.append(time.monotonic())
        return len(tail.split(banner, 1)[1].strip()) >= chars or since[-1] - since[0] >= seconds
    return done


def common(tmp_path: Path, make_tree) -> list[str]:
    program = make_tree(tmp_path / "prog", PROGRAM)
    return ["model=tiny_random", f"program_root={program}", f"paths.outputs={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'run'}"]


def check_partial(folder: Path) -> dict:
    """The interrupted answer's run folder: the partial draft in telemetry (marked interrupted), its report."""
    record = json.loads((folder / "telemetry.json").read_text())
    assert record["interrupted"] is True and record["status"] == "failed", record
    assert "Ctrl-C during decode" in record["error"] and record["answer"].strip(), record
    assert any("interrupted (Ctrl-C)" in note for note in record["notes"]), record["notes"]
    assert record["tokens"]["generated"] > 0
    assert (folder / "report.html").is_file()
    assert "interrupted (Ctrl-C)" in (folder / "report.html").read_text()
    trace = json.loads((folder / "trace.json").read_text())
    unmix = next(n for n in trace["nodes"] if n["node"] == "unmix")
    assert unmix["status"] == "ok" and unmix["outputs"]["restored"] is True  # the weights are the original ones
    return record


def test_ctrl_c_at_the_chat_prompt_ends_it_with_one_line(tmp_path, make_tree):
    term = Terminal(["pipeline.chat", *common(tmp_path, make_tree)])
    term.read_until(lambda screen: "\n? " in screen, timeout=120)
    term.interrupt()
    code = term.wait()
    screen = term.screen
    assert code == 130, screen[-3000:]
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen
    after = [line for line in screen.split("\n? ", 1)[1].splitlines() if line.strip() not in ("", "^C")]
    assert len(after) == 1 and after[0].startswith("interrupted; 0 question(s); session folder: "), after


@pytest.mark.parametrize("app", ["run", "chat"])
def test_ctrl_c_during_an_answer_keeps_the_partial_draft(tmp_path, make_tree, app):
    args = [f"pipeline.{app}", *common(tmp_path, make_tree), *LONG]
    if app == "run":
        term = Terminal([*args, "prompt=how does add work"])
        term.read_until(streaming(""))
    else:
        term = Terminal(args)
        term.read_until(lambda screen: "\n? " in screen, timeout=120)
        term.send(b"how does add work\n")
        term.read_until(streaming("how does add work"))
    term.interrupt()
    code = term.wait()
    screen = term.screen
    assert code == 130, screen[-3000:]
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen[-3000:]
    folder = tmp_path / "run" / ("q001" if app == "chat" else "")
    after = [line for line in screen.rsplit("^C", 1)[1].splitlines() if line.strip()]  # what the Ctrl-C printed
    said = "interrupted (model weights restored, partial draft kept in telemetry) (report: "
    assert len(after) == 1 and said in after[0] and str(folder / "report.html") in after[0], screen[-3000:]
    check_partial(folder)


@pytest.mark.parametrize("mode", ["hooks", "merge"])
def test_a_ctrl_c_inside_the_generate_loop_keeps_the_draft_and_restores_the_weights(tmp_path, make_tree, tiny_lm,
                                                                                     monkeypatch, mode):
    real, steps = Clock.__call__, []

    def ctrl_c_at_step_8(self, input_ids, scores):  # as SIGINT would, between two decoding steps
        steps.append(1)
        if len(steps) == 8:
            raise KeyboardInterrupt
        return real(self, input_ids, scores)

    monkeypatch.setattr(Clock, "__call__", ctrl_c_at_step_8)
    snap = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    code, out, err = call_main(run_app.main, [*common(tmp_path, make_tree), *LONG, f"mix.mode={mode}",
                                              "prompt=how does add work"])
    folder = tmp_path / "run"
    said = f"error: interrupted (model weights restored, partial draft kept in telemetry) (report: {folder}/report.html)"
    assert code == 130 and err.strip() == said and not out.strip(), (out, err)
    assert all(torch.equal(v, snap[k]) for k, v in tiny_lm.model.state_dict().items())
    assert not model_lock(tiny_lm).held and not any(m._forward_hooks for m in tiny_lm.model.modules())
    record = check_partial(folder)
    assert record["tokens"]["generated"] == 6  # the 7 steps before the Ctrl-C saw 0 to 6 new tokens
