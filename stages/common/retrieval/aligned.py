"""Definition-aligned evidence (docs/behaviour.md §5): a packed window shows the part of its definition that matches
the question under the headers of the definitions it starts inside, windows of one definition are shown as one, and
the in-program calls of the best definitions follow them within a token budget."""
from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Callable

from stages.common.retrieval.scoring import terms, window_fields
from stages.common.types import PackedWindow, ProgramIndex, Symbol

DEFINITION_KINDS = ("function", "class", "method")
MERGE_GAP = 3  # windows of one definition at most this many lines apart are shown as one window
FOLLOW_FROM = 2  # the best windows whose definitions' calls are followed
FOLLOW_AT = 5  # followed definitions go after this many ranked windows (which keep their ranks), before the rest
FOLLOW_DEPTH = 2  # callees of callees, no further
FOLLOW_VISITS = 64  # definitions looked at per question, whatever the budget
HEADER_CHARS = 160  # a signature in a context line is cut to this many characters
# "who calls X", "where is X used": the callers of the best definitions are followed before their callees
USAGE = re.compile(r"\b(who|where|which)\b[^?]*\b(uses?|used|calls?|called|invoked?|invokes|references?|referenced)\b"
                   r"|\bcallers?\b|\busages?\b", re.IGNORECASE)

Count = Callable[[PackedWindow], int]


def definitions_in(index: ProgramIndex, path: str) -> list[Symbol]:
    return index.derived(f"definitions_in:{path}",
                         lambda: [s for s in index.symbols_in(path) if s.kind in DEFINITION_KINDS])


def line_terms(index: ProgramIndex, path: str) -> list[frozenset[str]]:
    return index.derived(f"line_terms:{path}", lambda: [frozenset(terms(line)) for line in index.lines(path)])


def enclosing(index: ProgramIndex, path: str, line: int) -> list[Symbol]:
    """The definitions whose lines hold ``line``, outermost first."""
    found = [s for s in definitions_in(index, path) if s.start <= line <= s.end]
    return sorted(found, key=lambda s: (s.start, -s.end))


def _header(sym: Symbol) -> str:
    head = sym.signature if sym.kind == "class" else f"def {sym.signature}"
    return (head if len(head) <= HEADER_CHARS else head[:HEADER_CHARS] + "...") + ":"


def context_line(index: ProgramIndex, path: str, start: int) -> str:
    """`[in] class X(Base): / def f(a, b=1):  # first docstring line` for the definitions that start before
    ``start`` and hold it; "" when the window starts outside every definition or at its own header."""
    chain = [s for s in enclosing(index, path, start) if s.start < start]
    if not chain:
        return ""
    doc = chain[-1].doc.strip()
    return "[in] " + " / ".join(_header(s) for s in chain) + (f"  # {doc}" if doc else "")


def cut(index: ProgramIndex, path: str, start: int, end: int, score: float, aligned: bool) -> PackedWindow:
    lines = index.lines(path)
    end = min(end, len(lines))
    context = context_line(index, path, start) if aligned else ""
    return PackedWindow(path, start, end, "\n".join(lines[start - 1 : end]), score, context)


def _statement_starts(index: ProgramIndex, path: str) -> frozenset[int]:
    def compute() -> frozenset[int]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarnings of the analysed program are not ours
                tree = ast.parse(index.texts[path])
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return frozenset()
        return frozenset(n.lineno for n in ast.walk(tree) if isinstance(n, ast.stmt))
    return index.derived(f"statement_starts:{path}", compute)


def question_terms(index: ProgramIndex, prompt: str) -> dict[str, float]:
    """The prompt's terms the program has, with their idf over the windows index."""
    idf = window_fields(index).idf
    return {t: idf[t] for t in set(terms(prompt)) if t in idf}




def best_part(index: ProgramIndex, path: str, start: int, end: int, wanted: dict[str, float]) -> tuple[int, int]:
    """For a window cut from a longer function or method (its lines ``start``..``end`` starting at its header), the
    equally long run of its lines, starting at a statement, that holds most of the question's terms; the window
    itself unless some other run holds strictly more."""
    own = [s for s in definitions_in(index, path) if s.start == start and s.kind != "class" and s.end > end]
    if not own or not wanted:
        return start, end
    sym = max(own, key=lambda s: s.end)
    length = end - start + 1
    found = [f & wanted.keys() for f in line_terms(index, path)[sym.start - 1 : sym.end]]
    starts = _statement_starts(index, path) or frozenset(range(sym.start, sym.end + 1))
    # slide a window of ``length`` lines over the definition, keeping each term's count of lines in it
    counts: dict[str, int] = {}
    lines, best, best_start = 0, (-1.0, 0), start
    for at in range(len(found) + length - 1):
        if at < len(found):
            lines += bool(found[at])
            for t in found[at]:
                counts[t] = counts.get(t, 0) + 1
        first = at - length + 1
        if first >= 0 and (first == 0 or sym.start + first in starts):
            score = (round(sum(wanted[t] for t in counts), 6), lines)
            if score > best:
                best, best_start = score, sym.start + first
        if first >= 0:
            lines -= bool(found[first])
            for t in found[first]:
                counts[t] -= 1
                if not counts[t]:
                    del counts[t]
    return best_start, min(best_start + length - 1, sym.end)


def _outermost(index: ProgramIndex, window: PackedWindow) -> tuple[str, int] | None:
    chain = enclosing(index, window.path, window.start)
    return (window.path, chain[0].start) if chain else None


def merge(index: ProgramIndex, windows: list[PackedWindow], max_lines: int) -> list[PackedWindow]:
    """Windows of one top-level definition: one window when at most MERGE_GAP lines apart (and at most
    ``max_lines`` long together), else the later one right after the earlier ones, not spread among other files'."""
    out: list[PackedWindow] = []
    keys: list[tuple[str, int] | None] = []
    for window in windows:
        key = _outermost(index, window)
        mine = [i for i, k in enumerate(keys) if key is not None and k == key]
        for i in mine:
            other = out[i]
            lo, hi = min(other.start, window.start), max(other.end, window.end)
            if window.start - other.end <= MERGE_GAP + 1 and other.start - window.end <= MERGE_GAP + 1 \
                    and hi - lo + 1 <= max_lines:
                out[i] = cut(index, window.path, lo, hi, max(other.score, window.score), True)
                break
        else:
            at = mine[-1] + 1 if mine else len(out)
            out.insert(at, window)
            keys.insert(at, key)
    return out


def _held(index: ProgramIndex, window: PackedWindow) -> list[Symbol]:
    """The functions and methods a window shows: the innermost definition it starts inside, then those starting in it."""
    inside = [s for s in definitions_in(index, window.path) if window.start <= s.start <= window.end and s.kind != "class"]
    chain = enclosing(index, window.path, window.start)
    return ([chain[-1]] if chain and chain[-1] not in inside else []) + inside


def _calls(index: ProgramIndex) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The call graph's resolved `calls` edges between symbols as (callees, callers) of each, in call-site order."""
    def compute() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        out: dict[str, list[str]] = {}
        into: dict[str, list[str]] = {}
        for src, dst, _ in index.callgraph.edges(("calls",)):
            if src != dst and src.startswith("sym:") and dst.startswith("sym:"):
                out.setdefault(src, []).append(dst)
                into.setdefault(dst, []).append(src)
        return ({k: list(dict.fromkeys(v)) for k, v in out.items()}, {k: list(dict.fromkeys(v)) for k, v in into.items()})
    return index.derived("aligned_calls", compute)


def _neighbours(index: ProgramIndex, sym: Symbol, callers: bool) -> list[str]:
    """The symbol ids it calls (in call-site order) or that call it, each once."""
    return _calls(index)[1 if callers else 0].get(sym.node_id, [])


def _symbol(index: ProgramIndex, node: str) -> Symbol | None:
    path, _, qualname = node.removeprefix("sym:").partition("::")
    return next((s for s in index.symbols_in(path) if s.qualname == qualname), None)


def follow_calls(index: ProgramIndex, windows: list[PackedWindow], prompt: str, budget: int, window_lines: int,
                 count: Count) -> list[PackedWindow]:
    """The definitions the functions of the FOLLOW_FROM best windows call (their callers first for a usage question),
    a level at a time to FOLLOW_DEPTH, the calls of each function in turn (its first, then the next function's
    first, ...), while their blocks' tokens stay within ``budget``, after the first FOLLOW_AT windows; a definition
    already shown, or whose block would not fit the budget left, is skipped. A long one is shown as the part that
    holds most of the question's terms the best windows do not."""
    if budget <= 0 or not windows:
        return windows
    shown = {t for w in windows[:FOLLOW_FROM] for t in terms(w.text)}
    rest = {t: idf for t, idf in question_terms(index, prompt).items() if t not in shown}
    directions = (True, False) if USAGE.search(prompt) else (False,)
    ranked, used, visits = windows[:FOLLOW_AT], 0, 0
    followed: list[PackedWindow] = []
    seen = {s.node_id for w in ranked for s in _held(index, w)}  # one shown only further down may come forward
    level = [s for w in windows[:FOLLOW_FROM] for s in _held(index, w)]
    for _ in range(FOLLOW_DEPTH):
        calls = [[n for callers in directions for n in _neighbours(index, sym, callers)] for sym in level]
        level = []
        for node in (row[i] for i in range(max(map(len, calls), default=0)) for row in calls if i < len(row)):
            if node in seen or visits >= FOLLOW_VISITS:
                continue
            seen.add(node)
            visits += 1
            other = _symbol(index, node)
            if other is None or not other.is_definition:
                continue
            level.append(other)
            if any(w.path == other.path and w.start <= other.start and other.end <= w.end for w in ranked + followed):
                continue  # its lines are already shown before this point
            start, end = best_part(index, other.path, other.start, min(other.end, other.start + window_lines - 1), rest)
            window = cut(index, other.path, start, end, 0.0, True)
            cost = count(window)
            if used + cost <= budget:
                followed.append(window)
                used += cost
    return ranked + followed + windows[FOLLOW_AT:]


def window_lines(index: ProgramIndex) -> int:
    """The longest window of the index: the `index.window_lines` it was cut with (a short program's may be less)."""
    return index.derived("window_lines", lambda: max((w.end - w.start + 1 for w in index.windows), default=1))


def arrange(index: ProgramIndex, candidates: list[PackedWindow], prompt: str, follow: int, aligned: bool,
            count: Count) -> list[PackedWindow]:
    """The candidates in packing order: one definition's windows together (aligned), then the followed calls."""
    lines = window_lines(index)
    if aligned:
        candidates = merge(index, candidates, 2 * lines)
    return follow_calls(index, candidates, prompt, follow, lines, count)


def aligned_window(index: ProgramIndex, path: str, start: int, end: int, score: float, wanted: dict[str, float]
                   ) -> PackedWindow:
    """A window of the index as packed definition-aligned: the matching part of its definition, under its headers."""
    start, end = best_part(index, path, start, end, wanted)
    return cut(index, path, start, end, score, True)
