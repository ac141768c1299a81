"""`python -m pipeline.chat program_root=<tree> [overrides]` (`pca-chat`): question after question, one process.

The model, the program's index and its adapters are loaded by the first question and reused by every later one
(`pipeline/engine/resources.py`). Each question runs the composed graph into its own folder under the session folder,
with its report; on a terminal the answer streams as it decodes. After the checks, an answer that is grounded
(telemetry `grounded`, or at least one valid citation where a run does not report it) is printed with the code of
the windows it cites and its badge line (`── grounded · confidence 0.72 ──`); one whose citations passed but whose
text is not grounded (cut, degenerate, a contradicted claim) is printed the same way, its badge line saying why; one
whose citations failed says "I could not find this in the program" instead of guessing (and why, when the run says).
`exit`, `quit` or the end of input ends the chat; Ctrl-C ends it with exit code 130 (during an answer, after writing
its report with the partial draft); empty lines are skipped. A line that cannot be a question (bytes
that are not UTF-8, a control character, over `max_question_tokens`) gets one error line and the chat goes on.
A question is a follow-up of the last answer: its question, answer and cited code go into the prompt (graph input
`history`, pipeline/followup.py); `/new` starts afresh, `/sources` lists the cited windows, `/open N` prints one.
"""
from __future__ import annotations

import copy
import io
import sys
from pathlib import Path
from typing import Any, TextIO

import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import as_text, console, interrupted, run_config
from pipeline.cli import launch, text_override_value, usage
from pipeline.engine.errors import PipelineError
from pipeline.followup import Turn, cited_windows, command, is_command, turn_of
from pipeline.question_text import check_question, preview
from pipeline.report import write_after

NOT_FOUND = "I could not find this in the program."
MAX_LINES_SHOWN = 30


def show_answer(run_dir: Path, settings: dict, out: TextIO, drafts: list[str] | None = None) -> None:
    """The checked answer and the code of every window it cites, or NOT_FOUND. After streamed ``drafts`` the answer
    itself is not printed again: only what the checks changed (pipeline.output.checks_line)."""
    from pipeline.answer import badge_words
    from pipeline.output import checks_line
    from pipeline.runfolder import RunFolder

    run = RunFolder.load(run_dir, settings)
    record = run.record
    if record is None:
        print(f"(no {settings['files']['telemetry']} was written: {run.problems})", file=out)
        return
    badge = badge_words(record)
    if not run.found():
        print(NOT_FOUND + (f"\n── {badge} ──" if badge else ""), file=out)
        return
    line = checks_line(record.answer or "", drafts, record) if drafts else record.answer or ""
    if line is not None:
        print(line, file=out)
    if badge and not drafts:  # after streamed drafts the checks line carries it
        print(f"── {badge} ──", file=out)
    if record.claims_checked:  # the marks themselves are in the answer's text
        print(f"── claims checked against the code: {record.claims_checked}, contradicted "
              f"{record.claims_contradicted} ──", file=out)
    for window in cited_windows(run, settings):
        start, end = window.start, window.end
        print(f"\n── {window.path}:{start}-{end} ({window.source} citation)", file=out)
        if window.lines is None:
            print(f"   (code not shown: {window.why})", file=out)
            continue
        if window.why:
            print(f"   ({window.why})", file=out)
        for number, line in enumerate(window.lines[:MAX_LINES_SHOWN], start):
            print(f"{number:>5} │ {line}", file=out)
        if end - start + 1 > MAX_LINES_SHOWN:
            print(f"      … {end - start + 1 - MAX_LINES_SHOWN} more lines", file=out)


def chat(cfg: DictConfig, session: Path, overrides: list[str], stdin: TextIO, out: TextIO) -> int:
    from pipeline.runfolder import settings_of

    interactive = stdin.isatty() and out.isatty()
    print(f"Ask about {cfg.program_root} (exit, quit or Ctrl-D ends). The first answer loads the model.",
          file=out)
    asked = 0
    turn: Turn | None = None  # the last answer, which the next question follows up
    while True:
        if interactive:
            try:
                question = input("\n? ")
            except EOFError:
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat: one line, exit code 130
                print(f"\ninterrupted; {asked} question(s); session folder: {session}", file=out)
                return 130
        else:
            line = stdin.readline()
            if not line:
                break
            question = line.rstrip("\n")
        question = question.strip()
        if not question:
            continue
        if question.lower() in ("exit", "quit"):
            break
        if is_command(question):
            if not interactive:
                print(f"\n? {question}", file=out)
            turn = turn if command(question, turn, out) else None
            continue
        try:
            check_question(question, cfg.get("max_question_tokens"))
        except PipelineError as err:  # this line only: the session goes on to the next question
            if not interactive:
                print(f"\n? {preview(question)}", file=out)
            print(f"error: {err}", file=out)
            continue
        asked += 1
        run_dir = session / f"q{asked:03d}"
        job = copy.deepcopy(cfg)
        job.prompt = as_text(question)
        job.history = as_text(turn.history()) if turn is not None else ""
        if not interactive:
            print(f"\n? {question}", file=out)
        with console(out if out.isatty() else None) as terminal:
            try:
                run_config(job, run_dir, [*overrides, f"prompt={text_override_value(question)}"])
            except PipelineError as err:
                where = write_after(job, run_dir)
                print(f"\nerror: {str(err).splitlines()[0]}" + (f" (report: {where})" if where else ""), file=out)
                continue
            except KeyboardInterrupt:  # the report holds the partial draft; the chat ends with exit code 130
                where = write_after(job, run_dir)
                print(f"\n{interrupted(job, run_dir)} (report: {where or run_dir}); session folder: {session}", file=out)
                return 130
        where = write_after(job, run_dir)
        print("", file=out)
        show_answer(run_dir, settings_of(job), out, terminal.drafts if terminal is not None else None)
        turn = turn_of(run_dir, settings_of(job), question, NOT_FOUND)
        print(f"\nreport: {where or run_dir}", file=out)
    print(f"\n{asked} question(s); session folder: {session}", file=out)
    return 0


@hydra.main(config_path=str(CONF_DIR), config_name="chat", version_base="1.3")
def app(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    overrides = [str(o) for o in hydra_cfg.overrides.task if not str(o).lstrip("+").startswith("prompt=")]
    if isinstance(sys.stdin, io.TextIOWrapper):  # a line that is not UTF-8 reaches the question check, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    code = chat(cfg, Path(hydra_cfg.runtime.output_dir), overrides, sys.stdin, sys.stdout)
    if code:  # 130 after a Ctrl-C
        sys.exit(code)
    return code


def main() -> None:
    launch(app, usage("python -m pipeline.chat", "Ask question after question about one program; the model, the "
                      "index and the adapters load once.",
                      ["python -m pipeline.chat program_root=~/src/myproj",
                       "echo 'Where are config files parsed?' | python -m pipeline.chat program_root=~/src/myproj"],
                      ["model", "select", "synth", "decode", "report"]), "chat")


if __name__ == "__main__":
    main()
