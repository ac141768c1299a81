"""Each statement of stages/common/grounding/claims.py checked against the AST facts of the definitions it is about
(stages/common/program/definitions.py), and what a contradiction costs the answer (mark, or drop the sentence).

A statement is contradicted only when it is wrong for every definition its name may be, and only on what the AST
settles: a function that never returns a value, a raise that no path of the function (nor of the program code it
calls outside a `try`) makes, a parameter it does not have. Anything the AST cannot settle (a builtin exception
raised implicitly, a function with `**kwargs`) is unchecked.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import textwrap
from typing import Literal

from stages.common.grounding.citations import parse_citations
from stages.common.grounding.claims import Statement, catalog, statements
from stages.common.program.definitions import DefinitionFacts, definitions
from stages.common.types import Answer, Citation, Evidence, ProgramIndex

Verdict = Literal["supported", "contradicted", "unchecked"]
ClaimAction = Literal["mark", "drop", "retry"]
DEPTH = 4  # how far calls are followed (by name, every definition of that name) for raises and calls
CALLABLE = ("function", "method", "staticmethod", "classmethod", "property")
# calls that raise nothing a reader would call "raising an exception" (or that this check may assume so)
QUIET = frozenset({"len", "isinstance", "issubclass", "str", "repr", "print", "bool", "list", "dict", "set", "tuple",
                   "frozenset", "sorted", "reversed", "enumerate", "zip", "range", "id", "hash", "type", "super",
                   "callable", "hasattr", "any", "all", "iter", "format", "append", "extend", "get", "items", "keys",
                   "values", "join", "split", "strip", "rstrip", "lstrip", "startswith", "endswith", "lower", "upper",
                   "replace", "setdefault", "update", "copy", "add", "insert", "isidentifier", "isdigit"})
# returned expressions that cannot be None
NOT_NONE = re.compile(r"^(?:[\[{(\"'0-9-]|f['\"]|True$|False$|self$|not |len\(|str\(|int\(|bool\(|float\(|tuple\(|list\(|"
                      r"dict\(|set\(|frozenset\(|sorted\(|isinstance\(|[A-Z]\w*\()|(?: == | != | is | in | < | > | <= | >= )")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One checked statement: what the answer says of ``qualname`` and what the code says."""

    sentence: tuple[int, int]  # character span of its sentence in the text checked
    name: str  # the subject as the answer wrote it
    qualname: str  # the definition checked ('' when several were and none settled it)
    kind: str
    value: str
    said: str
    verdict: Verdict
    code_says: str = ""  # for a contradicted claim: what the code says instead

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "qualname": self.qualname, "kind": self.kind, "value": self.value,
                "said": self.said, "verdict": self.verdict, "code_says": self.code_says}


@dataclasses.dataclass(frozen=True)
class ClaimsReport:
    """The claims node's report, the value on its `report` port: one `Claim` per statement checked."""

    claims: tuple[Claim, ...] = ()
    action: str = "mark"  # what a contradiction cost: mark | drop | retry (none: claims=none, nothing checked)
    dropped: int = 0  # sentences left out (action drop)

    @property
    def checked(self) -> int:
        return len(self.claims)

    @property
    def contradicted(self) -> int:
        return sum(c.verdict == "contradicted" for c in self.claims)

    def summary(self) -> dict[str, int]:
        return {"checked": self.checked, "contradicted": self.contradicted, "dropped": self.dropped}


# ------------------------------------------------------------------------------------------------ following calls


def _last(name: str) -> str:
    return name.rpartition(".")[2]


def _reachable(start: DefinitionFacts, index: ProgramIndex, unguarded: bool) -> list[DefinitionFacts]:
    """The program's definitions ``start`` may call, by name, ``DEPTH`` calls deep (a class's `__init__` for a
    class); with ``unguarded``, only calls made outside a `try` that catches."""
    names, seen, out, frontier = catalog(index), {start.qualname + start.path}, [], [start]
    for _ in range(DEPTH):
        following = []
        for facts in frontier:
            for call in facts.unguarded_calls if unguarded else facts.calls:
                for target in names.get(_last(call), []):
                    if target.kind == "class":
                        target = definitions(index, target.path).get(f"{target.qualname}.__init__", target)
                    key = target.qualname + target.path
                    if key not in seen and target.kind in CALLABLE:
                        seen.add(key)
                        out.append(target)
                        following.append(target)
        frontier = following
    return out


def _unknown_calls(chain: list[DefinitionFacts], index: ProgramIndex) -> bool:
    """Whether some call made outside a `try` goes to code this check cannot read (not the program's, not QUIET)."""
    names = catalog(index)
    return any(_last(c) not in names and _last(c) not in QUIET for f in chain for c in f.unguarded_calls)


def _ancestors(name: str, index: ProgramIndex) -> set[str]:
    """The last parts of a class's bases, transitively, by name."""
    names, out, todo = catalog(index), set(), [name]
    while todo:
        for facts in names.get(_last(todo.pop()), []):
            for base in facts.bases if facts.kind == "class" else ():
                if _last(base) not in out:
                    out.add(_last(base))
                    todo.append(base)
    return out


# ------------------------------------------------------------------------------------------------ one definition


def _params(facts: DefinitionFacts, index: ProgramIndex) -> DefinitionFacts | None:
    """The definition whose parameters a claim about ``facts`` means (a class: its own `__init__`)."""
    if facts.kind == "class":
        return definitions(index, facts.path).get(f"{facts.qualname}.__init__")
    return facts if facts.kind in ("function", "method", "staticmethod", "classmethod") else None


def _stub(facts: DefinitionFacts, index: ProgramIndex) -> bool:
    """An abstract or overloaded definition, or one whose body is only a docstring, `pass`, `...` or a raise of
    NotImplementedError (read from its own lines; one that does not parse alone counts as a stub: unchecked)."""
    if any(_last(d.split("(")[0]) in ("abstractmethod", "overload", "abstractproperty") for d in facts.decorators):
        return True
    lines = index.texts.get(facts.path, "").splitlines()[facts.start - 1:facts.end]
    try:
        tree = ast.parse(textwrap.dedent("\n".join(lines)))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if node is None:
        return True
    return all(isinstance(b, ast.Pass) or (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))
               or (isinstance(b, ast.Raise) and "NotImplementedError" in ast.unparse(b)) for b in node.body)


def verdict(statement: Statement, facts: DefinitionFacts, index: ProgramIndex) -> tuple[Verdict, str]:
    """(verdict, what the code says) of one statement about one definition."""
    kind, value, name = statement.kind, statement.value, facts.qualname
    if kind in ("param_count", "param_name"):
        target = _params(facts, index)
        if target is None:
            return "unchecked", ""
        params, selfish = target.params, int(target.kind in ("method", "classmethod"))  # "two arguments: self, x"
        named = [p.name for p in params]
        listing = f"{name} takes {len(params)} parameter{'s' * (len(params) != 1)}" + (
            f": {', '.join(named)}" if params else "")
        variadic = any(p.kind in ("varargs", "varkw") for p in params)
        if kind == "param_name":
            if value in named or value in ("self", "cls"):
                return "supported", ""
            return ("unchecked", "") if any(p.kind == "varkw" for p in params) else ("contradicted", listing)
        if not value.isdigit():
            return "unchecked", ""
        count = int(value)
        fixed = [p for p in params if p.kind not in ("varargs", "varkw")]
        required = sum(p.default is None for p in fixed)
        if count in (len(fixed), required, len(fixed) + selfish, required + selfish) and not variadic:
            return "supported", ""
        if count < required or (count > len(fixed) + selfish and not variadic):
            return "contradicted", listing
        return "unchecked", ""
    if kind in ("returns_none", "returns_value"):
        accessor = any(d.endswith((".setter", ".deleter")) for d in facts.decorators)  # the getter is hidden
        if facts.kind not in CALLABLE or facts.is_async and kind == "returns_none" or _stub(facts, index) or accessor:
            return "unchecked", ""
        if kind == "returns_value":
            return ("contradicted", f"{name} returns None") if facts.returns_none and facts.falls_through \
                else ("supported", "") if not facts.returns_none else ("unchecked", "")
        if facts.yields or not (facts.returns or facts.falls_through):
            return "unchecked", ""
        if "None" in facts.returns or facts.falls_through:
            return "supported", ""
        if all(NOT_NONE.search(r) for r in facts.returns):
            return "contradicted", f"{name} returns {facts.returns[0]}" + (
                f" (or {len(facts.returns) - 1} other values)" if len(facts.returns) > 1 else "")
        return "unchecked", ""
    if kind == "raises":
        if facts.kind not in CALLABLE:
            return "unchecked", ""
        chain = [facts, *_reachable(facts, index, unguarded=True)]
        raised = [r for f in chain for r in f.raises]
        if value == "":
            if raised or any(f.reraises for f in chain):
                return "supported", ""
            if _unknown_calls(chain, index):
                return "unchecked", ""
            return "contradicted", f"{name} raises no exception" + (
                " (the calls that may raise are inside a try)" if facts.calls != facts.unguarded_calls else "")
        wanted = _last(value)
        if any(_last(r) == wanted or wanted in _ancestors(r, index) for r in raised):
            return "supported", ""
        program_class = any(f.kind == "class" for f in catalog(index).get(wanted, []))
        if not program_class or any(f.reraises for f in chain) or _unknown_calls(chain, index):
            return "unchecked", ""  # a builtin exception may be raised implicitly (d[k], int(s))
        own = sorted({_last(r) for r in raised})
        return "contradicted", f"{name} raises " + (", ".join(own) if own else "no exception") + f", not {wanted}"
    if kind == "calls":
        if facts.kind not in CALLABLE and facts.kind != "class":
            return "unchecked", ""
        wanted = _last(value)
        inner = [f for f in definitions(index, facts.path).values() if facts.start <= f.start <= facts.end] \
            if facts.kind == "class" else [facts]
        chain = inner + [r for f in inner for r in _reachable(f, index, unguarded=False)]
        text = "\n".join(index.texts.get(facts.path, "").splitlines()[facts.start - 1:facts.end])
        if any(wanted in map(_last, f.calls) for f in chain) or re.search(rf"\b{re.escape(wanted)}\b", text):
            return "supported", ""
        return "contradicted", f"{name} does not call {wanted}"
    if kind == "kind":
        actual = {"staticmethod": "method", "classmethod": "method"}.get(facts.kind, facts.kind)
        if value == actual or (value == "function" and actual in ("method", "property")) or \
                (value == "method" and actual == "property") or (value == "constant" and actual == "attribute"):
            return "supported", ""
        wrong = {"class": ("function", "method", "property", "constant", "attribute"),
                 "function": ("class", "constant", "attribute"), "method": ("class", "constant", "attribute"),
                 "property": ("function", "method", "class"), "constant": ("function", "method", "class", "property")}
        article = "an" if actual[0] in "aeiou" else "a"
        return ("contradicted", f"{name} is {article} {actual}") if actual in wrong[value] else ("unchecked", "")
    if kind == "decorated":
        if facts.kind not in CALLABLE and facts.kind != "class":
            return "unchecked", ""
        if value == "" and facts.kind == "class":
            return "unchecked", ""  # "the class uses a decorator" may mean one it offers
        bases = [_last(d.split("(")[0]) for d in facts.decorators]
        if (value == "" and bases) or _last(value.split("(")[0]) in bases:
            return "supported", ""
        return "contradicted", f"{name} " + (f"is decorated with {', '.join('@' + d for d in facts.decorators)}"
                                             if bases else "has no decorator")
    return "unchecked", ""


def check(statement: Statement, index: ProgramIndex) -> Claim:
    """Contradicted when every definition the name may be contradicts it; supported when one supports it."""
    results = [(f, *verdict(statement, f, index)) for f in statement.candidates]
    supported = [r for r in results if r[1] == "supported"]
    contradicted = results if results and all(r[1] == "contradicted" for r in results) else []
    if not (supported or contradicted):
        return Claim(statement.sentence, statement.name, "", statement.kind, statement.value, statement.said,
                     "unchecked")
    facts, outcome, says = (supported or contradicted)[0]
    return Claim(statement.sentence, statement.name, facts.qualname, statement.kind, statement.value, statement.said,
                 outcome, says)


def check_text(text: str, index: ProgramIndex, evidence: Evidence | None) -> list[Claim]:
    """Every statement of ``text`` checked; unchecked ones are left out (they are not counted)."""
    claims = [check(s, index) for s in statements(text, index, evidence)]
    return [c for c in claims if c.verdict != "unchecked"]


def report(claims: list[Claim], action: str, dropped: int = 0) -> ClaimsReport:
    return ClaimsReport(claims=tuple(claims), action=action, dropped=dropped)


# ------------------------------------------------------------------------------------------------ what it costs


def _by_sentence(claims: list[Claim]) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for claim in claims:
        if claim.verdict == "contradicted" and claim.code_says not in out.get(claim.sentence, []):
            out.setdefault(claim.sentence, []).append(claim.code_says)
    return out


def mark(text: str, claims: list[Claim]) -> str:
    """After each sentence with a contradicted claim: `[the code says: ...]`."""
    out, cursor = [], 0
    for (_, end), says in sorted(_by_sentence(claims).items()):
        out += [text[cursor:end], f" [the code says: {'; '.join(says)}]"]
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


def drop(answer: Answer, claims: list[Claim], index: ProgramIndex) -> tuple[str, list[Citation], int]:
    """The text without the sentences that hold a contradicted claim, and the citations without one entry per
    citation those sentences held (the list keeps matching the text); the count of sentences left out."""
    text, spans = answer.text, sorted(_by_sentence(claims))
    citations = list(answer.citations)
    pieces, cursor = [], 0
    for start, end in spans:
        pieces.append(text[cursor:start])
        for _, _, path, a, b in parse_citations(text[start:end], index):
            at = next((i for i, c in enumerate(citations) if not c.removed and (c.path, c.start, c.end) == (path, a, b)),
                      None)
            if at is not None:
                citations.pop(at)
        cursor = end
        while cursor < len(text) and text[cursor] in " \t":
            cursor += 1
    pieces.append(text[cursor:])
    return "".join(pieces).strip(), citations, len(spans)
