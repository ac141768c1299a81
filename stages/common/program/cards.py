"""Fact cards: one line per definition of the packed windows saying what its AST says (the `facts` node).

A card reads like `_check_wiring(graph, nodes, registry) [pipeline/engine/graph.py:208-237]: returns None; raises
ConfigError; calls port_type, describe; called by build_graph`. Everything on it comes from
`stages.common.program.definitions` (the same reading the `claims` node checks answers against) and the index's
call graph; nothing is run. Cards are program text, so whoever puts them in a prompt must keep them data.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from stages.common.program.definitions import DefinitionFacts, Param, callees, callers, definitions
from stages.common.types import Evidence, ProgramIndex

FUNCTIONS = ("function", "method", "property", "staticmethod", "classmethod")
KIND_DECORATORS = ("property", "staticmethod", "classmethod", "cached_property", "functools.cached_property")


@dataclasses.dataclass(frozen=True)
class FactCards:
    """What the AST says of each packed definition, one card a line, best window first (the `facts` node's value)."""

    cards: tuple[str, ...] = ()
    tokens: int = 0  # the cards' tokens, counted with the model's tokenizer
    dropped: int = 0  # cards left out by the token budget

    def block(self) -> str:
        """The cards as a prompt block after the [ctx] blocks; "" without cards."""
        lines = [f"- {card}" for card in self.cards]
        return "\n".join(["[facts] what the code above says, read from its syntax tree:", *lines]) if lines else ""

    def summary(self) -> dict[str, Any]:
        return {"cards": len(self.cards), "tokens": self.tokens, "dropped": self.dropped}


def _names(items: Iterable[str], limit: int) -> str:
    """``a, b, c`` with at most ``limit`` items, then ``+N more``."""
    items = list(dict.fromkeys(items))
    shown = ", ".join(items[:limit])
    return shown + (f" +{len(items) - limit} more" if len(items) > limit else "")


def signature(params: tuple[Param, ...]) -> str:
    """``(a, b=1, *rest, limit=3, **extra)``: the parameters as Python writes them, defaults as source text."""
    out, starred = [], False
    for p in params:
        if p.kind == "varargs":
            out.append(f"*{p.name}")
            starred = True
        elif p.kind == "varkw":
            out.append(f"**{p.name}")
        else:
            if p.kind == "keyword" and not starred:
                out.append("*")
                starred = True
            out.append(p.name if p.default is None else f"{p.name}={p.default}")
    return f"({', '.join(out)})"


def _short(ids: list[str]) -> list[str]:
    """`path::qualname` ids of definitions -> their qualnames (module-level call sites left out)."""
    return [i.partition("::")[2] for i in ids if "::" in i]


def _last(qualname: str) -> str:
    return qualname.rpartition(".")[2]


def _sure(qualnames: list[str]) -> list[str]:
    """The callees whose name no other callee shares: a call the graph resolved to several same-named methods
    (`super().__init__` to every `__init__` of the file) says nothing sure, so it is left off."""
    names = [_last(q) for q in qualnames]
    return [q for q, n in zip(qualnames, names) if names.count(n) == 1]


def resolved_callees(index: ProgramIndex, fact: DefinitionFacts) -> list[str]:
    return _sure(_short(callees(index, fact.path, fact.qualname)))


def resolved_callers(index: ProgramIndex, fact: DefinitionFacts) -> list[str]:
    """The definitions that call ``fact``, where their call resolved to it alone."""
    out = []
    for caller in callers(index, fact.path, fact.qualname):
        path, _, qualname = caller.partition("::")
        if qualname and fact.qualname in _sure(_short(callees(index, path, qualname))):
            out.append(qualname)
    return out


def assigned(fact: DefinitionFacts, name: str) -> str:
    """``name: annotation = value`` of a constant or attribute, as much of it as the code writes."""
    typed = f"{name}: {fact.annotation}" if fact.annotation else name
    return f"{typed} = {fact.value}" if fact.value else typed


def _returns(fact: DefinitionFacts, limit: int) -> str:
    if fact.yields:
        return "yields (a generator)"
    if fact.returns_none:
        return "returns None"
    return "returns " + " | ".join(fact.returns[:limit]) + (" | …" if len(fact.returns) > limit else "")


def card(index: ProgramIndex, fact: DefinitionFacts, span: tuple[int, int], every: dict[str, DefinitionFacts],
         max_names: int) -> str:
    """One line of what ``fact``'s code says; ``span`` is the lines it is shown with (its window's part of it)."""
    where = f"[{fact.path}:{span[0]}-{span[1]}]" if span[1] > span[0] else f"[{fact.path}:{span[0]}]"
    owner = fact.qualname.rpartition(".")[0]
    parts: list[str] = []
    if fact.kind in FUNCTIONS:
        head = f"{'async ' * fact.is_async}{fact.qualname}{signature(fact.params)} {where}"
        if fact.kind != "function":
            parts.append(f"{fact.kind} of {owner}")
        decorators = [d for d in fact.decorators if d.split("(")[0] not in KIND_DECORATORS
                      and not d.endswith((".setter", ".getter", ".deleter"))]
        if decorators:
            parts.append("decorated " + _names((f"@{d}" for d in decorators), max_names))
        parts.append(_returns(fact, max_names))
        if fact.raises:
            parts.append("raises " + _names(fact.raises, max_names))
        called = resolved_callees(index, fact)
        if called:
            parts.append("calls " + _names(called, max_names))
        if fact.reads:
            parts.append("reads " + _names(fact.reads, max_names))
        by = resolved_callers(index, fact)
        if by:
            parts.append("called by " + _names(by, max_names))
    elif fact.kind == "class":
        head = f"class {fact.qualname}{'(' + ', '.join(fact.bases) + ')' if fact.bases else ''} {where}"
        if fact.decorators:
            parts.append("decorated " + _names((f"@{d}" for d in fact.decorators), max_names))
        prefix = fact.qualname + "."
        members = [f for q, f in every.items() if q.startswith(prefix) and "." not in q[len(prefix):]]
        methods = [f.name for f in members if f.kind in FUNCTIONS]
        if methods:
            parts.append("methods " + _names(methods, max_names))
        attributes = [assigned(f, f.name) for f in members if f.kind == "attribute"]
        if attributes:
            parts.append("attributes " + _names(attributes, max_names))
        by = resolved_callers(index, fact)
        if by:
            parts.append("created by " + _names(by, max_names))
    else:
        head = f"{assigned(fact, fact.qualname)} {where}"
        if fact.kind == "attribute":
            parts.append(f"attribute of {owner}")
    return head + (": " + "; ".join(parts) if parts else "")


def packed_definitions(evidence: Evidence, index: ProgramIndex) -> list[tuple[DefinitionFacts, tuple[int, int]]]:
    """Each indexed definition that starts inside a packed window (best window first, then source order, each
    once), with its span clipped to the window: the definitions the scaffold offers as lead choices. A class's
    attributes are on its card, so they get none of their own when the class has one."""
    out: dict[str, tuple[DefinitionFacts, tuple[int, int]]] = {}
    for window in evidence.windows:
        facts = definitions(index, window.path)
        for symbol in index.symbols_in(window.path):
            start, end = symbol.start, min(symbol.end, window.end)
            key = f"{window.path}::{symbol.qualname}"
            if window.start <= start <= end and symbol.qualname in facts and key not in out:
                out[key] = (facts[symbol.qualname], (start, end))
    return [(fact, span) for key, (fact, span) in out.items()
            if fact.kind != "attribute" or key.rpartition(".")[0] not in out]


def build_cards(evidence: Evidence, index: ProgramIndex, max_names: int) -> list[str]:
    """The card of every packed definition, best window first."""
    return [card(index, fact, span, definitions(index, fact.path), max_names)
            for fact, span in packed_definitions(evidence, index)]
