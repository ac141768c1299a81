"""Code-like names in an answer, and which of them the program (or the question) does not contain (docs/behaviour.md §5).

Code-like: every identifier inside a backticked span, and outside backticks the words written in snake_case,
camelCase, PascalCase with an inner capital, or dotted `a.b`. A name is *known* when it occurs as an
identifier in the program's text or in the question, or is a definition's qualname, a module name or a file
path of the program; a dotted name is also known when each of its parts is. Citation spans are not names.
Each name counts once per answer (a name repeated ten times is one claim).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from stages.common.types import ProgramIndex

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+"
# written to match in linear time (no nested choice of where a run ends): a run-on word of a long answer stays cheap
_SNAKE = r"_*[0-9]*[A-Za-z][A-Za-z0-9]*+(?:_++[A-Za-z0-9]++)+_*|__[A-Za-z0-9]+__|_[A-Za-z][A-Za-z0-9]*"
_CAMEL = r"[a-z][a-z0-9]*[A-Z][A-Za-z0-9]*"
_PASCAL = r"[A-Z][a-z0-9]+[A-Z][A-Za-z0-9]*|[A-Z]{2,}[a-z]{2,}[A-Za-z0-9]*"  # not a plural acronym (URLs, IDs)
# outside backticks: one of the shapes above, as a whole word (not part of a longer word or a path)
CODE_WORD = re.compile(rf"(?<![\w./-])(?:{DOTTED}|{_SNAKE}|{_CAMEL}|{_PASCAL})(?![\w/-])(?!\.[A-Za-z_])")
CODE_SHAPE = re.compile(rf"{_SNAKE}|{_CAMEL}|{_PASCAL}")  # one word (no dots) written like code: fullmatch
BACKTICKS = re.compile(r"```.*?(?:```|\Z)|`([^`\n]+)`", re.S)
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")


@dataclasses.dataclass(frozen=True)
class NameCheck:
    """The code-like names of one answer (distinct, in order of appearance) and those unknown to the program."""

    names: list[str]
    unknown: list[str]

    @property
    def rate(self) -> float:
        return len(self.unknown) / len(self.names) if self.names else 0.0

    def summary(self) -> dict:
        return {"names": len(self.names), "unknown": self.unknown[:10]}


def code_names(text: str, skip: Sequence[tuple[int, int]] = ()) -> list[str]:
    """Distinct code-like names of ``text`` in order of appearance; character spans in ``skip`` (citations,
    markers the pipeline wrote) are ignored."""
    masked = list(text)
    for start, end in skip:
        masked[start:end] = " " * (end - start)
    text = URL.sub(lambda m: " " * len(m.group()), "".join(masked))
    found: list[tuple[int, str]] = []
    outside = list(text)
    for match in BACKTICKS.finditer(text):
        if match.group(1) is not None:
            body, offset = match.group(1), match.start(1)
        else:  # a fenced block: its first line names the language
            newline = match.group().find("\n")
            body, offset = ("", 0) if newline < 0 else (match.group()[newline:], match.start() + newline)
        for hit in re.finditer(rf"{DOTTED}|{IDENT.pattern}", body):
            found.append((offset + hit.start(), hit.group()))
        outside[match.start():match.end()] = " " * (match.end() - match.start())
    for match in CODE_WORD.finditer("".join(outside)):
        found.append((match.start(), match.group().rstrip(".")))
    seen, names = set(), []
    for _, name in sorted(found):
        if name and name not in seen and not all(len(part) == 1 for part in name.split(".")):
            seen.add(name)
            names.append(name)
    return names


def known_names(index: ProgramIndex) -> frozenset[str]:
    """Every identifier of the program's text, its definitions' qualnames, module names and file paths."""
    def compute() -> frozenset[str]:
        known: set[str] = set()
        for text in index.texts.values():
            known.update(IDENT.findall(text))
        for symbol in index.symbols:
            known.update((symbol.name, symbol.qualname))
        for path, record in index.files.items():
            known.add(path)
            known.update(path.split("/"))
            if record.module:
                known.update(record.module.split("."))
                known.add(record.module)
        return frozenset(known)

    return index.derived("known_names", compute)


def is_known(name: str, known: frozenset[str], question_names: set[str]) -> bool:
    if name in known or name in question_names:
        return True
    parts = name.split(".")
    return len(parts) > 1 and all(p in known or p in question_names for p in parts)


def check_names(text: str, index: ProgramIndex, question: str, skip: Sequence[tuple[int, int]] = ()) -> NameCheck:
    names = code_names(text, skip)
    known = known_names(index)
    question_names = set(IDENT.findall(question)) | set(re.findall(DOTTED, question))
    return NameCheck(names, [n for n in names if not is_known(n, known, question_names)])


UNKNOWN_MARK = " [not in program]"


def mark_unknown(text: str, unknown: list[str]) -> str:
    """Put ``[not in program]`` after the first occurrence of each unknown name (after its closing backtick
    when it is inside one), so a reader sees which names the program does not contain."""
    for name in unknown:
        match = re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text)
        if match is None:
            continue
        at = match.end()
        closing = text.find("`", at)
        line_end = text.find("\n", at)
        if closing >= 0 and (line_end < 0 or closing < line_end) and text[:match.start()].count("`") % 2 == 1:
            at = closing + 1
        text = text[:at] + UNKNOWN_MARK + text[at:]
    return text
