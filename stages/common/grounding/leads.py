"""A lead choice: a definition inside a packed window as an answer's first line names it, `` `qualname` [path:A-B] ``.

`scaffold` makes the choices (`Prompt.lead`), `leadsim` embeds their names, `decode` scores them and writes one.
"""
from __future__ import annotations

import dataclasses
import re

from stages.common.types import Symbol

TABLE_LINES = 3  # a value this many lines long or longer (a dict, a regex, a template) is a lead choice by itself
_CHOICE = re.compile(r"`(?P<name>[^`]+)` \[(?P<path>.+):(?P<start>[0-9]+)-(?P<end>[0-9]+)\]")


@dataclasses.dataclass(frozen=True)
class LeadChoice:
    name: str  # the definition's qualname
    path: str
    start: int
    end: int

    @property
    def label(self) -> str:
        """The name as the answer writes it: `` `qualname` ``."""
        return f"`{self.name}`"

    @property
    def span(self) -> str:
        return f"{self.path}:{self.start}-{self.end}"

    @property
    def text(self) -> str:
        return f"{self.label} [{self.span}]"

    @classmethod
    def parse(cls, text: str) -> LeadChoice:
        match = _CHOICE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a lead choice (`qualname` [path:A-B]): {text!r}")
        return cls(match["name"], match["path"], int(match["start"]), int(match["end"]))


def offered(symbol: Symbol, named: set[str]) -> bool:
    """Whether a symbol inside a packed window is a lead choice: every definition; a value (constant, attribute)
    when the question names it (``named``: node ids, stages.common.retrieval.names) or when it is a table of
    TABLE_LINES or more lines. The rule for skipping the others: a one-line value the question does not name is
    seldom what it asks about, and each choice is a continuation the decode scores."""
    return symbol.is_definition or symbol.node_id in named or symbol.end - symbol.start + 1 >= TABLE_LINES
