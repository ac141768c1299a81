"""What one definition of the program does, read from its AST: parameters, returns, raises, calls, decorators.

The facts of the `facts` node (cards in the prompt) and of the `claims` node (what the answer may say about a
definition) come from here, so both read the code the same way. Files are parsed on demand from the index's text
(never imported, never run) and the result is kept per index.
"""
from __future__ import annotations

import ast
import dataclasses
import warnings
from collections.abc import Sequence
from typing import Literal

from stages.common.types import ProgramIndex

Kind = Literal["function", "method", "property", "staticmethod", "classmethod", "class", "constant", "attribute"]
MAX_TEXT = 80  # characters kept of a default, a return expression or a constant's value


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    default: str | None = None  # the default's source text; None: no default
    kind: Literal["positional", "keyword", "varargs", "varkw"] = "positional"


@dataclasses.dataclass(frozen=True)
class DefinitionFacts:
    """What the code of one definition says; ``qualname`` as Python writes it (``Class.method``)."""

    qualname: str
    path: str
    start: int
    end: int
    kind: Kind
    params: tuple[Param, ...] = ()  # without the self / cls of a method
    returns: tuple[str, ...] = ()  # each distinct returned expression; "None" for a bare `return`
    yields: bool = False
    raises: tuple[str, ...] = ()  # the exception names raised in its own body (not in nested definitions)
    calls: tuple[str, ...] = ()  # the names it calls, as written (`self._hook`, `len`), first call first
    decorators: tuple[str, ...] = ()
    bases: tuple[str, ...] = ()  # a class's bases
    reads: tuple[str, ...] = ()  # the module-level constants of its file it reads
    value: str = ""  # a constant's or attribute's value, cut to MAX_TEXT characters
    annotation: str = ""  # a constant's or attribute's annotation (`x: int = 3`), cut to MAX_TEXT characters
    is_async: bool = False
    reraises: bool = False  # a bare `raise` (re-raising what it caught) in its own body
    unguarded_calls: tuple[str, ...] = ()  # `calls` made outside the body of a `try` that has `except` handlers
    falls_through: bool = True  # its end may be reached (an implicit `return None`); True where unsure

    @property
    def name(self) -> str:
        return self.qualname.rpartition(".")[2]

    @property
    def returns_none(self) -> bool:
        """Every exit returns None (no `return` with a value, or only `return None`) and it is no generator."""
        return self.kind not in ("class", "constant", "attribute") and not self.yields and set(self.returns) <= {"None"}


def _text(node: ast.AST | None) -> str:
    if node is None:
        return ""
    try:
        text = ast.unparse(node)
    except (ValueError, RecursionError):
        return ""
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def _own_nodes(body: Sequence[ast.AST]):
    """The nodes of a definition's body in source order (not its decorators or defaults), not descending into
    nested functions, classes or lambdas."""
    stack = list(body)[::-1]
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(list(ast.iter_child_nodes(child))[::-1])


def _params(args: ast.arguments, method: bool) -> tuple[Param, ...]:
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [Param(a.arg, _text(d) if d is not None else None) for a, d in zip(positional, defaults)]
    if method and out and out[0].name in ("self", "cls"):
        out = out[1:]
    if args.vararg is not None:
        out.append(Param(args.vararg.arg, None, "varargs"))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append(Param(a.arg, _text(d) if d is not None else None, "keyword"))
    if args.kwarg is not None:
        out.append(Param(args.kwarg.arg, None, "varkw"))
    return tuple(out)


def _exception_name(node: ast.expr | None) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    return _text(node) if isinstance(node, (ast.Name, ast.Attribute)) else ""


def _falls_through(body: Sequence[ast.stmt]) -> bool:
    """Whether the end of ``body`` may be reached; True for any statement this does not follow (a loop, a `try`)."""
    if not body:
        return True
    last = body[-1]
    if isinstance(last, (ast.Return, ast.Raise)):
        return False
    if isinstance(last, ast.If):
        return _falls_through(last.body) or _falls_through(last.orelse)
    if isinstance(last, (ast.With, ast.AsyncWith)):
        return _falls_through(last.body)
    return True


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


class _Reader:
    def __init__(self, path: str, constants: set[str]) -> None:
        self.path, self.constants = path, constants
        self.found: dict[str, DefinitionFacts] = {}

    def body(self, nodes: list[ast.stmt], scope: str, in_class: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.function(node, scope, in_class)
            elif isinstance(node, ast.ClassDef):
                self.klass(node, scope)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                self.assignment(node, scope, in_class)

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, scope: str, in_class: bool) -> None:
        qualname = f"{scope}.{node.name}" if scope else node.name
        decorators = tuple(_text(d) for d in node.decorator_list)
        kind: Kind = "method" if in_class else "function"
        for decorator in decorators:
            base = decorator.split("(")[0]
            if base in ("staticmethod", "classmethod"):
                kind = "staticmethod" if base == "staticmethod" else "classmethod"
            elif base in ("property", "cached_property", "functools.cached_property") or base.endswith(
                    (".setter", ".getter", ".deleter")):
                kind = "property"
        returns, raises, calls, reads, yields = [], [], [], [], False
        guarded = {id(n) for t in _own_nodes(node.body) if isinstance(t, ast.Try) and t.handlers
                   for n in _own_nodes(t.body)}
        unguarded, reraises = [], False
        for child in _own_nodes(node.body):
            if isinstance(child, ast.Return):
                returns.append(_text(child.value) if child.value is not None else "None")
            elif isinstance(child, ast.Raise):
                raises.append(_exception_name(child.exc))
                reraises = reraises or child.exc is None
            elif isinstance(child, ast.Call):
                calls.append(_text(child.func).split("(")[0])
                if id(child) not in guarded:
                    unguarded.append(calls[-1])
            elif isinstance(child, (ast.Yield, ast.YieldFrom)):
                yields = True
            elif isinstance(child, ast.Name) and child.id in self.constants and isinstance(child.ctx, ast.Load):
                reads.append(child.id)
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        self.found[qualname] = DefinitionFacts(
            qualname, self.path, start, node.end_lineno or node.lineno, kind,
            params=_params(node.args, in_class and kind != "staticmethod"), returns=_unique(returns), yields=yields,
            raises=_unique(raises), calls=_unique(calls), decorators=decorators, reads=_unique(reads),
            is_async=isinstance(node, ast.AsyncFunctionDef), reraises=reraises, unguarded_calls=_unique(unguarded),
            falls_through=_falls_through(node.body))

    def klass(self, node: ast.ClassDef, scope: str) -> None:
        qualname = f"{scope}.{node.name}" if scope else node.name
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        self.found[qualname] = DefinitionFacts(
            qualname, self.path, start, node.end_lineno or node.lineno, "class",
            decorators=tuple(_text(d) for d in node.decorator_list), bases=tuple(_text(b) for b in node.bases))
        self.body(node.body, qualname, True)

    def assignment(self, node: ast.Assign | ast.AnnAssign, scope: str, in_class: bool) -> None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            if isinstance(target, ast.Name):
                qualname = f"{scope}.{target.id}" if scope else target.id
                self.found[qualname] = DefinitionFacts(
                    qualname, self.path, node.lineno, node.end_lineno or node.lineno,
                    "attribute" if in_class else "constant", value=_text(node.value),
                    annotation=_text(node.annotation) if isinstance(node, ast.AnnAssign) else "")


def read_definitions(text: str, path: str) -> dict[str, DefinitionFacts]:
    """Every module-level and class-level definition and assignment of one file, by qualname; {} when it does not
    parse (the claims and cards then say nothing about it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings of the analysed program are not ours
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return {}
    constants = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    reader = _Reader(path, constants)
    try:
        reader.body(tree.body, "", False)
    except RecursionError:
        return {}
    return reader.found


def definitions(index: ProgramIndex, path: str) -> dict[str, DefinitionFacts]:
    """`read_definitions` of one indexed file, computed once per index; {} for a file the index has no text of."""
    text = index.texts.get(path)
    if text is None or not path.endswith((".py", ".pyi")):
        return {}
    return index.derived(f"definitions:{path}", lambda: read_definitions(text, path))


def callers(index: ProgramIndex, path: str, qualname: str) -> list[str]:
    """The program's definitions that call ``qualname`` (call graph `calls` edges), as `path::qualname` ids."""
    node = f"sym:{path}::{qualname}"
    return sorted({src.removeprefix("sym:") for src, dst, _ in index.callgraph.edges(("calls",), {node}) if dst == node})


def callees(index: ProgramIndex, path: str, qualname: str) -> list[str]:
    """The program's definitions ``qualname`` calls (resolved by the call graph), as `path::qualname` ids."""
    node = f"sym:{path}::{qualname}"
    return sorted({dst.removeprefix("sym:") for src, dst, _ in index.callgraph.edges(("calls",), {node})
                   if src == node and dst.startswith("sym:")})
