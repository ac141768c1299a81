"""Names in the question (docs/behaviour.md §5): the identifiers, dotted names and quoted strings a question writes,
looked up in the program, and the windows that define them or, for a string, hold it.

- exactly: a code-like word (`TimestampSigner`, `python_version`, `Version.parse`, anything in backticks or quotes)
  is a symbol's name, qualname or module-qualified name;
- fuzzily: two or three plain words joined as one name, case and underscores ignored, among definitions and module
  constants (`canonicalize name` -> `canonicalize_name`, `hook caller` -> `HookCaller`), and a code-like word that
  names nothing exactly;
- a quoted string that names no symbol (`"="`) is found where the program's source writes it as a string literal.

A name that fits more than ``MAX_MATCHES`` symbols or windows (`name`, `__init__`) points nowhere in particular and
is left out. Each window gets the strength of the best name it shows: 1 / the number of places that name fits.
"""
from __future__ import annotations

import dataclasses
import re

from stages.common.types import ProgramIndex, Symbol

MAX_MATCHES = 4  # distinct (path, qualname): overloads of one function count once
MAX_PHRASE_WORDS = 3
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# quotes around a short text: backticks anywhere; ' and " only at word edges (so "doesn't ... it's" is no quote)
QUOTED = re.compile(r"`([^`\n]{1,60})`|(?<!\w)\"([^\"\n]{1,60})\"(?!\w)|(?<!\w)'([^'\n]{1,60})'(?!\w)")
WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")


@dataclasses.dataclass(frozen=True)
class NamesFound:
    symbols: tuple[Symbol, ...]  # the symbols the question names (exactly or fuzzily)
    windows: dict[int, float]  # window position -> strength in (0, 1]: shows a named symbol or holds a quoted string
    # a named symbol's window -> every window inside its definition (a class: its methods' too); the boost goes to
    # the best of them, so `TimestampSigner` lifts the method that matches the question, not the class's header
    parts: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)


def _key(name: str) -> str:
    return name.replace("_", "").lower()


def _code_like(word: str) -> bool:
    """snake_case, CamelCase, UPPER_CASE, a dotted name or a dunder: written as code, not as English."""
    return "_" in word or "." in word or (word.isupper() and len(word) > 2) or bool(re.search(r"[a-z][A-Z]|[A-Z]{2,}[a-z]", word))


def _tables(index: ProgramIndex) -> tuple[dict[str, list[Symbol]], dict[str, list[Symbol]]]:
    def build() -> tuple[dict[str, list[Symbol]], dict[str, list[Symbol]]]:
        exact: dict[str, list[Symbol]] = {}
        loose: dict[str, list[Symbol]] = {}
        for sym in index.symbols:
            keys = {sym.name, sym.qualname} | ({f"{sym.module}.{sym.qualname}"} if sym.module else set())
            for key in keys:
                exact.setdefault(key, []).append(sym)
            loose.setdefault(_key(sym.name), []).append(sym)
        return exact, loose

    return index.derived("names.tables", build)


def _symbol_window(index: ProgramIndex, sym: Symbol) -> int | None:
    """The window that shows ``sym``: the one anchored at it, else the tightest holding its first line."""
    best: tuple[tuple[int, int], int] | None = None
    for i in _positions(index).get(sym.path, []):
        w = index.windows[i]
        if w.start <= sym.start <= w.end:
            # anchored: the longest (of overloads, the implementation); else the tightest window around it
            rank = (0, w.start - w.end) if w.anchor == sym.qualname else (1, w.end - w.start)
            if best is None or rank < best[0]:
                best = (rank, i)
    return best[1] if best else None


def _positions(index: ProgramIndex) -> dict[str, list[int]]:
    def build() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, w in enumerate(index.windows):
            out.setdefault(w.path, []).append(i)
        return out

    return index.derived("names.window_positions", build)


def _wanted(question: str) -> tuple[list[str], list[tuple[int, int, str]], list[str]]:
    """(exact names, fuzzy phrases as (first word, last word + 1, key), quoted strings) the question writes. A
    capitalised English-looking word (`Command`) is no name here: questions name the classes a method works with as
    often as the one they are about (on click's docstring set such words moved the class's window into the file's
    two packed windows, ahead of the answer); the words still weigh in BM25F's name field and the dense vectors."""
    quoted = [next(g for g in m.groups() if g is not None) for m in QUOTED.finditer(question)]
    exact: list[str] = []
    fuzzy: list[tuple[int, int, str]] = []
    for text in quoted:
        if IDENTIFIER.fullmatch(text.strip("()")):
            exact.append(text.strip("()"))
    words = list(IDENTIFIER.finditer(question))
    exact.extend(word for match in words if _code_like(word := match.group().rstrip(".")))
    plain = [m.group().lower() for m in WORD.finditer(question)]
    for size in range(MAX_PHRASE_WORDS, 1, -1):  # longest first: `bool param type` before `param type`
        fuzzy.extend((i, i + size, "".join(plain[i : i + size])) for i in range(len(plain) - size + 1))
    return list(dict.fromkeys(exact)), fuzzy, quoted


def _literal_lines(index: ProgramIndex, text: str) -> list[tuple[str, int]]:
    """(path, line) of every line whose source writes ``text`` as a string literal."""
    needles = (f'"{text}"', f"'{text}'")
    found: list[tuple[str, int]] = []
    for path in index.files:
        source = index.texts.get(path, "")
        if not any(n in source for n in needles):
            continue
        found.extend((path, number) for number, line in enumerate(index.lines(path), 1) if any(n in line for n in needles))
    return found


def find_names(index: ProgramIndex, question: str) -> NamesFound:
    exact_table, loose_table = _tables(index)
    exact, fuzzy, quoted = _wanted(question)
    groups: list[list[Symbol]] = []
    for name in exact:
        # a code-like name that names nothing exactly is tried case- and underscore-blind (`hook_caller` -> HookCaller)
        groups.append(exact_table.get(name) or loose_table.get(_key(name.rpartition(".")[2]), []))
    taken: set[int] = set()  # words of a longer phrase that named something
    for first, last, key in fuzzy:
        # plain words name definitions and module constants; an attribute (`exit_code`, `COMMANDLINE`) is named as code
        found = [s for s in loose_table.get(key, []) if s.kind != "attribute"]
        if found and not taken.intersection(range(first, last)):
            groups.append(found)
            taken.update(range(first, last))
    symbols: dict[str, Symbol] = {}
    windows: dict[int, float] = {}
    parts: dict[int, tuple[int, ...]] = {}
    for found in groups:
        distinct = {sym.node_id for sym in found}
        if not found or len(distinct) > MAX_MATCHES:
            continue
        for sym in found:
            symbols.setdefault(sym.node_id, sym)
            at = _symbol_window(index, sym)
            if at is not None:
                windows[at] = max(windows.get(at, 0.0), 1.0 / len(distinct))
                if sym.is_definition:
                    parts[at] = tuple(i for i in _positions(index)[sym.path]
                                      if sym.start <= index.windows[i].start <= sym.end or i == at)
    for text in quoted:
        if IDENTIFIER.fullmatch(text.strip("()")) and exact_table.get(text.strip("()")):
            continue  # a quoted name of a symbol: found above
        places = {at for path, line in _literal_lines(index, text) if (at := _line_window(index, path, line)) is not None}
        if places and len(places) <= MAX_MATCHES:
            for at in places:
                windows[at] = max(windows.get(at, 0.0), 1.0 / len(places))
    return NamesFound(tuple(symbols.values()), windows, parts)


def _line_window(index: ProgramIndex, path: str, line: int) -> int | None:
    """The tightest window holding ``line``."""
    holding = [i for i in _positions(index).get(path, []) if index.windows[i].start <= line <= index.windows[i].end]
    return min(holding, key=lambda i: index.windows[i].end - index.windows[i].start) if holding else None


def boost(scores, found: NamesFound, weight: float):
    """``scores`` (a float array over the windows, >= 0) plus ``weight`` × strength × the best score for the best
    window inside each named definition (by ``scores``) and each window holding a quoted string: at weight 1 a named
    definition ties with the best match."""
    if not found.windows or weight == 0 or not len(scores):
        return scores
    out = scores.copy()
    top = float(scores.max()) or 1.0
    lifted: dict[int, float] = {}
    for at, strength in found.windows.items():
        best = max(found.parts.get(at, (at,)), key=lambda i: (scores[i], i == at))
        lifted[best] = max(lifted.get(best, 0.0), strength)
    for at, strength in lifted.items():
        out[at] += weight * strength * top
    return out
