"""What a run shows a person or a script: stdout the answer alone (or one JSON object with `output=json`), logs on
stderr only from WARNING up unless verbose, a progress line on a terminal, and after a streamed draft only what the
checks changed."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pipeline.engine.errors import ConfigError
from pipeline.engine.execute import listening
from pipeline.engine.records import CitationRecord, Telemetry
from pipeline.runfolder import ReportError, RunFolder

OUTPUTS = ("text", "json")
# the handler conf/config.yaml's hydra.job_logging names for the terminal (Hydra's default one, sent to stderr)
CONSOLE_HANDLER = "console"
# the most word-level edits (and characters) the line after a streamed draft lists; more: the citations, or the answer
MAX_EDITS, MAX_EDITS_CHARS = 6, 240


def output_mode(cfg: Any) -> str:
    """The config's `output` (text | json); another value is a ConfigError naming it."""
    mode = str(cfg.get("output", "text") or "text") if hasattr(cfg, "get") else "text"
    if mode not in OUTPUTS:
        raise ConfigError(f"output={mode}: choose one of {', '.join(OUTPUTS)}")
    return mode


def show_logs(verbose: bool) -> None:
    """Verbose: the terminal's log handler lets every record through (Hydra has already lowered the loggers)."""
    if verbose:
        for handler in logging.getLogger().handlers:
            if handler.get_name() == CONSOLE_HANDLER:
                handler.setLevel(logging.NOTSET)


# ------------------------------------------------------------------------------------------------- --json


def _span(c: CitationRecord) -> str:
    return f"{c.path}:{c.start}" + (f"-{c.end}" if c.end is not None and c.end != c.start else "")


def answer_object(run_dir: Path, value: Any, timings: dict[str, float], report: str | Path | None = None) -> dict:
    """`--json`: the answer, its citations with the cited lines, grounded and why not, the confidence (null when the
    run computed none), the run folder and the timings
    (those of the run's telemetry when it wrote one), as the API's `Answer` (pipeline/answer.py) reads them."""
    from pipeline.answer import Answer, answer_of

    try:
        answer = answer_of(value, run_dir, RunFolder.load(run_dir).settings)
    except ReportError:  # no run files (a graph that writes none): the result and the timings only
        answer = Answer(text="" if value is None else str(value), why="the run wrote no telemetry", run_dir=run_dir)
    record = answer.telemetry
    if record is not None and record.timings:
        timings = dict(record.timings)
    return {"answer": answer.text if value is not None or record is not None else None,
            "citations": [dataclasses.asdict(c) for c in answer.citations], "grounded": answer.grounded,
            "why": answer.why, "confidence": answer.confidence, "run_folder": str(run_dir),
            "report": str(report) if report else None, "timings": timings,
            "elapsed_sec": record.elapsed_sec if record is not None else round(sum(timings.values()), 3)}


def print_json(obj: dict, out: TextIO) -> None:
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")  # one line per run: a sweep prints JSON lines
    out.flush()


# ------------------------------------------------------------------------------------------------- a terminal


def _plain(text: str) -> str:
    return " ".join(text.split())


def _edits(draft: str, final: str) -> str:
    """The word-level edits from ``draft`` to ``final`` as one short text ('' when there are many)."""
    import difflib

    a, b = draft.split(), final.split()
    edits = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old, new = " ".join(a[i1:i2]), " ".join(b[j1:j2])
        edits += [] if op == "equal" else [f"added {new}" if op == "insert" else f"removed {old}" if op == "delete"
                                            else f"{old} → {new}"]
    text = "; ".join(edits)
    return text if len(edits) <= MAX_EDITS and len(text) <= MAX_EDITS_CHARS else ""


def checks_line(answer: str, drafts: list[str], record: Telemetry | None) -> str | None:
    """After the streamed drafts: one short line saying what the checks changed (the few edits, else the citations
    removed or attributed; an earlier draft kept), with the badge and its confidence when the run has them
    (`── checked: … · not grounded: … · confidence 0.31 ──`); when it cannot say what changed, the line announces the
    checked answer, which then follows. None when the answer is the last draft as streamed and there is no badge."""
    from pipeline.answer import badge_words

    line, badge = _changes(answer, drafts, record), badge_words(record)
    if badge is None:
        return line
    if line is None:
        return f"── {badge} ──"
    head, _, rest = line.partition(" ──")
    return f"{head} · {badge} ──{rest}"


def _changes(answer: str, drafts: list[str], record: Telemetry | None) -> str | None:
    """What the checks changed (checks_line), without the badge."""
    final = _plain(answer)
    if drafts and final == _plain(drafts[-1]):
        return None
    for number, draft in enumerate(drafts[:-1], 1):
        if final == _plain(draft):
            return f"── checked: draft {number} is the answer (the later one was not better) ──"
    edits = _edits(drafts[-1], answer) if drafts else ""
    if edits:
        return f"── checked: {edits} ──"
    citations = record.citations if record is not None else ()
    removed = [_span(c) for c in citations if c.removed]
    added = [_span(c) for c in citations if c.source == "attributed" and not c.removed]
    parts = ([f"removed {len(removed)} citation{'s' * (len(removed) != 1)} ({', '.join(removed)})"] if removed
             else []) + ([f"added {len(added)} ({', '.join(added)})"] if added else [])
    if parts:
        return f"── checked: {'; '.join(parts)} ──"
    return "── checked answer (it differs from the draft) ──\n" + answer


class Progress:
    """A line on a terminal's stderr naming the node that has run longer than ``after`` seconds, redrawn each
    ``tick``; it steps aside (until the next node) when the console streams text, and is cleared when the node ends."""

    def __init__(self, stream: TextIO, after: float = 2.0, tick: float = 0.5):
        self.stream, self.after, self.tick = stream, after, tick
        self.node: str | None = None
        self.started = 0.0
        self.shown = self.paused = False
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        with self.lock:
            self._clear()

    def __call__(self, node: str, seconds: float | None) -> None:
        """The executor's listener: a node started (seconds None) or ended."""
        with self.lock:
            self._clear()
            self.node, self.started, self.paused = (node if seconds is None else None), time.monotonic(), False

    def pause(self) -> None:
        """Text is about to go to the terminal: clear the line and draw none until the next node starts."""
        with self.lock:
            self._clear()
            self.paused = True

    def _loop(self) -> None:
        while not self.stop.wait(self.tick):
            with self.lock:
                elapsed = time.monotonic() - self.started
                if _bar_open():  # a stage's own tqdm bar (a known count) says more: leave the line to it
                    self._clear()
                elif self.node is not None and not self.paused and elapsed >= self.after:
                    self.stream.write(f"\r\x1b[K… {self.node} {elapsed:.0f} s")
                    self.stream.flush()
                    self.shown = True

    def _clear(self) -> None:
        """Erase the line drawn (the cursor back at its start)."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _bar_open() -> bool:
    tqdm = sys.modules.get("tqdm")  # only a process that imported tqdm can have a bar open
    return bool(tqdm is not None and getattr(tqdm.tqdm, "_instances", None))


@contextlib.contextmanager
def progress(terminal: Any, verbose: bool) -> Iterator[Progress | None]:
    """A progress line on stderr while the block runs, when stderr is a terminal and the logs are not shown there."""
    if verbose or not sys.stderr.isatty():
        yield None
        return
    with Progress(sys.stderr) as line, listening(line):
        if terminal is not None:
            terminal.before_write = line.pause
        yield line


def show_result(value: Any, mode: str, terminal: Any, run_dir: Path, timings: dict[str, float],
                report: str | Path | None) -> None:
    """stdout: the JSON object, or the answer; after a streamed draft only what the checks changed."""
    if mode == "json":
        print_json(answer_object(run_dir, value, timings, report), sys.stdout)
        return
    if value is None:
        return
    if terminal is None or not terminal.drafts:
        print(value)
        return
    try:
        record = RunFolder.load(run_dir).record
    except ReportError:
        record = None
    line = checks_line(str(value), terminal.drafts, record)
    print("" if line is None else f"\n{line}")
