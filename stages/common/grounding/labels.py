"""A citation labelled with a definition's name, `` `name` [path:A-B] ``, whose span does not define that name.

The lead line is built from a definition and its own span, so it is always right; later lines are the model's, and
it often writes a real definition's name beside another definition's span (`InterpolationResultNode._set_value`
[base.py:189-199] where 189-199 is `Node._get_flag`). A pair is *mislabelled* when the name is a definition of the
program (qualname, or its last part), no definition of that name starts inside the cited span and the span does not
start inside one (a part of a long function's body). Names that are no definition (a variable, a parameter) are
not judged. `repair.labels=mark` follows each with a marker (which does
not name what the span defines: a name the pipeline writes must not count as the model's, e.g. for symbol hit).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

from stages.common.grounding.citations import line_number
from stages.common.types import ProgramIndex, Symbol

LabelAction = Literal["mark", "keep"]
LABEL_NAME = re.compile(r"[A-Za-z_][\w.]*")
LABELLED = re.compile(rf"`({LABEL_NAME.pattern})`\s*\[([^\[\]\n]+?):([0-9]+)-([0-9]+)\]")  # ASCII digits only


@dataclasses.dataclass(frozen=True)
class Mislabel:
    end: int  # character offset just after the citation
    name: str
    path: str
    start_line: int
    end_line: int
    defines: str  # the first definition starting inside the span ('' when none does), for telemetry


def _names(symbol: Symbol) -> set[str]:
    if symbol.kind == "attribute":  # `name`, `type` are too common to stand for one class attribute
        return {symbol.qualname}
    return {symbol.qualname, symbol.name, symbol.qualname.rsplit(".", 1)[-1]}


def mislabels(text: str, index: ProgramIndex) -> list[Mislabel]:
    known = index.derived("labels.definition_names", lambda: set().union(*(_names(s) for s in index.symbols)))
    found = []
    for match in LABELLED.finditer(text):
        name, path = match.group(1), match.group(2)
        a, b = line_number(match.group(3)), line_number(match.group(4))
        if name not in known or path not in index.files:
            continue
        inside = sorted((s for s in index.symbols_in(path) if a <= s.start <= b), key=lambda s: s.start)
        if not any(name in _names(s) for s in inside) and not _within(index, name, path, a):
            found.append(Mislabel(match.end(), name, path, a, b, inside[0].qualname if inside else ""))
    return found


def _within(index: ProgramIndex, name: str, path: str, first: int) -> bool:
    """Whether a span starting at line ``first`` starts inside a function or method named ``name`` (a part of its
    body; a class is judged by where it starts)."""
    return any(_body_holds(s, first) and name in _names(s) for s in index.symbols_in(path))


def _body_holds(symbol: Symbol, first: int) -> bool:
    return symbol.kind in ("function", "method") and symbol.start < first <= symbol.end


def label_spans(index: ProgramIndex, names: list[str], spans: dict[str, tuple[str, int, int]]) -> dict[str, list[str]]:
    """For each of ``names`` that is a definition of the program: the citations (``spans``: `path:A-B` -> its path,
    A and B) a label with that name may carry, those inside which a definition of that name starts (empty: none of
    them; decode.constrain: labels then keeps the model from citing after the name)."""
    def definitions() -> dict[str, list[Symbol]]:
        found: dict[str, list[Symbol]] = {}
        for symbol in index.symbols:
            for name in _names(symbol):
                found.setdefault(name, []).append(symbol)
        return found

    by_name: dict[str, list[Symbol]] = index.derived("labels.definitions_by_name", definitions)  # once per index
    return {name: [c for c, (path, a, b) in spans.items()
                   if any(s.path == path and (a <= s.start <= b or _body_holds(s, a))
                          for s in by_name[name])]
            for name in names if name in by_name and LABEL_NAME.fullmatch(name)}


def mark_mislabels(text: str, index: ProgramIndex, action: LabelAction) -> str:
    """``mark``: after each mislabelled citation, `[not where `name` is defined]`; ``keep``: the text as it is."""
    if action == "keep":
        return text
    out, cursor = [], 0
    for found in mislabels(text, index):
        out.append(text[cursor:found.end])
        out.append(f" [not where `{found.name}` is defined]")
        cursor = found.end
    out.append(text[cursor:])
    return "".join(out)
