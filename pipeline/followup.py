"""Chat follow-ups (pipeline/chat.py): the previous turn carried into the next question, and the chat commands.

After each answer the chat keeps a `Turn`: the question, the answer as shown, and the code of the windows it cites.
The next question's run gets `Turn.history()` as the graph input `history`; stage `scaffold` puts it before the
evidence, cut to `scaffold.history_tokens`, as message content (data: a chat marker in it stays text). The cited
code travels in that block rather than through `pack`: it reaches the model under every `pack=` option. Retrieval
searches with the question plus the earlier question and the cited definitions' names (stage `query`, which reads the
`Question: ` line and the `[earlier] path:` headers written here), so "and where is it called?" finds the code the
conversation is about. A follow-up's own citations are still checked against its own packed windows.
`/new` forgets the turn, `/sources` lists its cited windows, `/open N` prints the N-th one's code.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from pipeline.runfolder import RunFolder

COMMANDS = "/new, /sources, /open N"
COMMAND = re.compile(r"/[a-z]+(\s.*)?")


@dataclasses.dataclass(frozen=True)
class Cited:
    """One window an answer cites, with its code as read after the run (None and why when it cannot be shown)."""

    path: str
    start: int
    end: int
    source: str
    lines: list[str] | None
    why: str = ""

    @property
    def span(self) -> str:
        return f"{self.path}:{self.start}-{self.end}"


@dataclasses.dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    cited: list[Cited]

    def history(self) -> str:
        """The text of the graph input `history`: question, answer, then each cited window's code."""
        parts = [f"Question: {self.question}", f"Answer: {self.answer}"]
        for window in self.cited:
            if window.lines is not None:
                parts += [f"[earlier] path: {window.span}", *window.lines]
        return "\n".join(parts)


def cited_windows(run: RunFolder, settings: dict) -> list[Cited]:
    """Each window the run's answer validly cites, once, with its code as the program holds it now."""
    from pipeline.runfolder import read_lines, source_hashes

    cited: list[Cited] = []
    seen: set[tuple[str, int, int]] = set()
    hashes = source_hashes(run)
    for citation in run.record.citations if run.record is not None else ():
        span = (citation.path, citation.start, citation.last)
        if citation.valid and span not in seen:
            seen.add(span)
            lines, why = read_lines(settings.get("program_root"), *span, hashes.get(citation.path))
            cited.append(Cited(*span, citation.source, lines, why))
    return cited


def turn_of(run_dir: Path, settings: dict, question: str, not_found: str) -> Turn | None:
    """The turn a finished run leaves: its answer (``not_found`` when its citations did not find it, as the chat
    shows it) and its valid cited windows."""
    from pipeline.runfolder import RunFolder

    run = RunFolder.load(run_dir, settings)
    record = run.record
    if record is None:
        return None
    if not run.found():  # what the chat showed: NOT_FOUND, or the answer with its badge
        return Turn(question, not_found, [])
    return Turn(question, record.answer or "", cited_windows(run, settings))


def is_command(line: str) -> bool:
    """``/word`` or ``/word args``: a chat command (a path such as ``/etc/hosts`` is not one)."""
    return COMMAND.fullmatch(line) is not None


def command(line: str, turn: Turn | None, out: TextIO) -> bool:
    """Carry out a chat command; False for `/new` (the turn is to be forgotten), True otherwise. Each mistake is
    one line."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/new":
        print("(new conversation: the next question starts without the earlier one)", file=out)
        return False
    cited = turn.cited if turn is not None else []
    if name == "/sources":
        if not cited:
            print("(no cited windows: " + ("no answer yet)" if turn is None else "the last answer cites none)"),
                  file=out)
        for number, window in enumerate(cited, 1):
            print(f"{number:>3}  {window.span} ({window.source} citation)", file=out)
    elif name == "/open":
        if not arg.isdigit() or not 1 <= int(arg) <= len(cited):
            print(f"error: /open {arg or '?'}: the last answer cites {len(cited)} window(s); /open N takes N from "
                  f"1 to {len(cited)} (/sources lists them)" if cited else
                  f"error: /open {arg or '?'}: no cited windows (/sources lists them)", file=out)
        else:
            show_window(cited[int(arg) - 1], out)
    else:
        print(f"error: unknown command {name}; commands: {COMMANDS}", file=out)
    return True


def show_window(window: Cited, out: TextIO) -> None:
    print(f"── {window.span} ({window.source} citation)", file=out)
    if window.lines is None:
        print(f"   (code not shown: {window.why})", file=out)
        return
    if window.why:
        print(f"   ({window.why})", file=out)
    for number, line in enumerate(window.lines, window.start):
        print(f"{number:>5} │ {line}", file=out)
