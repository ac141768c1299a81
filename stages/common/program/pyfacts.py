"""What one Python file declares: symbols, imports, calls and windows, as JSON-able facts.

Facts depend only on the file's path and bytes, so they are cached by ``(path, sha256)``. Many files are parsed in
worker processes (``parse_many``): ``ast.parse`` holds the GIL, so threads would not help.
"""
from __future__ import annotations

import ast
import logging
import marshal
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from stages.common.program.lines import count_lines


def head_window(lines: int, window_lines: int) -> list:
    return [1, max(1, min(lines, window_lines)), "head", "head"]


def text_facts(text: str, window_lines: int) -> dict[str, Any]:
    lines = count_lines(text)
    return {"lines": lines, "parsed": False, "symbols": [], "imports": [], "calls": [],
            "windows": [head_window(lines, window_lines)] if lines else []}


def python_facts(text: str, window_lines: int) -> dict[str, Any]:
    facts = text_facts(text, window_lines)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings of the analysed program are not ours
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return facts  # indexed as plain text
    collector = _Collector()
    try:
        collector.visit_module(tree)
    except RecursionError:  # parses, but nests deeper than the visitor's stack (a generated 1,500-term sum)
        return facts
    facts["parsed"] = True
    facts["symbols"] = collector.symbols
    facts["imports"] = collector.imports
    facts["calls"] = collector.calls
    windows = facts["windows"]
    definitions = [sym for sym in collector.symbols if sym["kind"] in DEFINITION_KINDS]
    for sym in definitions:
        top_level = "." not in sym["qualname"]
        long_method = sym["kind"] == "method" and _outside_first_window(sym, definitions, window_lines)
        if top_level or long_method:
            end = min(sym["end"], sym["start"] + window_lines - 1)
            windows.append([sym["start"], end, sym["qualname"], sym["kind"]])
    windows.extend(_value_windows(collector.symbols, windows, text, window_lines))
    return facts


def _value_windows(symbols: list[dict], windows: list[list], text: str, window_lines: int) -> list[list]:
    """Windows for the constants and attributes no other window shows: a run of them with nothing else between
    (blank and comment lines aside, or at most two lines of other code) is one window, from the comment right above the first, at most window_lines
    long; a value inside a definition's or the head window rides in that window."""
    lines = text.splitlines()
    covered = [(w[0], w[1]) for w in windows]
    loose = [s for s in symbols if s["kind"] not in DEFINITION_KINDS
             and not any(a <= s["start"] and s["end"] <= b for a, b in covered)]
    out: list[list] = []
    for sym in sorted(loose, key=lambda s: s["start"]):
        start = sym["start"]
        while (start > 1 and lines[start - 2].lstrip().startswith("#") and sym["end"] - start + 1 < window_lines
               and not any(a <= start - 1 <= b for a, b in covered)):
            start -= 1  # the comment that explains the value
        near = out and (start - out[-1][1] <= 3 or _only_gaps(lines, out[-1][1], start))
        if near and sym["end"] - out[-1][0] < window_lines:
            out[-1][1] = max(out[-1][1], sym["end"])
            continue
        out.append([start, min(sym["end"], start + window_lines - 1), sym["qualname"], "constant"])
    return out


def _only_gaps(lines: list[str], after: int, before: int) -> bool:
    """Whether the lines strictly between ``after`` and ``before`` are blank or comments."""
    return all(not line.strip() or line.lstrip().startswith("#") for line in lines[after:before - 1])


# the kinds that define code (their own windows, call edges, lead choices); the others are values: "constant" (a
# module-level assignment) and "attribute" (a class-level one)
DEFINITION_KINDS = ("function", "class", "method")
VALUE_KINDS = ("constant", "attribute")
# a module-level name bound by a call is a value symbol only when the call builds a value (a regex, a type, a table)
_VALUE_CALLS = frozenset({"compile", "TypeVar", "NewType", "namedtuple", "NamedTuple", "TypedDict", "ParamSpec",
                          "frozenset", "set", "dict", "tuple", "list", "Enum", "IntEnum", "MappingProxyType",
                          "OrderedDict", "defaultdict", "Literal", "Union", "Optional", "Callable"})
SIGNATURE_CHARS = 80  # a value symbol's signature: `NAME = <value>`, its value cut to this many characters


def _outside_first_window(method: dict, symbols: list[dict], window_lines: int) -> bool:
    """A method the window of its (long) class does not reach gets a window of its own."""
    owner = method["qualname"].split(".")[0]
    for sym in symbols:
        if sym["qualname"] == owner and sym["kind"] == "class":
            return method["end"] > sym["start"] + window_lines - 1
    return False


# node types with no definition, import or call below them, and fields that never hold one
_LEAVES = frozenset({ast.Name, ast.Constant, ast.Load, ast.Store, ast.Del, ast.alias, *(
    c for base in (ast.operator, ast.unaryop, ast.cmpop, ast.boolop) for c in base.__subclasses__())})
_FIELDS: dict[type, tuple[str, ...]] = {}
_ASSIGNS = (ast.Assign, ast.AnnAssign)


def _child_fields(cls: type) -> tuple[str, ...]:
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = tuple(f for f in getattr(cls, "_fields", ()) if f not in ("ctx", "op", "type_comment"))
    return fields


class _Collector:
    """One recursive pass over the tree (what ``ast.NodeVisitor`` would do, without visiting leaves: the pass
    costs about as much as the parse itself on a big tree, so it skips names, constants and operators)."""

    def __init__(self) -> None:
        self.symbols: list[dict[str, Any]] = []
        self.imports: list[dict[str, Any]] = []
        self.calls: list[list[str]] = []
        self._scope: list[tuple[str, str]] = []  # (name, kind)
        self._caller = ""
        self._next: dict[int, ast.AST] = {}  # an assignment -> the statement after it
        self._handlers: dict[type, Callable[[Any], None]] = {ast.FunctionDef: self._function, ast.AsyncFunctionDef: self._function,
                          ast.ClassDef: self._class, ast.Import: self._import, ast.ImportFrom: self._import_from,
                          ast.Call: self._call, ast.Assign: self._assign, ast.AnnAssign: self._assign}

    def visit_module(self, tree: ast.AST) -> None:
        self._children(tree)

    def _visit(self, node: ast.AST) -> None:
        handler = self._handlers.get(type(node))
        if handler is not None:
            handler(node)
        else:
            self._children(node)

    def _children(self, node: ast.AST) -> None:
        leaves, visit = _LEAVES, self._visit
        for field in _child_fields(type(node)):
            value = getattr(node, field, None)
            if type(value) is list:
                for at, item in enumerate(value):
                    if type(item) not in leaves and isinstance(item, ast.AST):
                        if type(item) in _ASSIGNS and at + 1 < len(value):  # an attribute docstring follows it
                            self._next[id(item)] = value[at + 1]
                        visit(item)
            elif value is not None and type(value) not in leaves and isinstance(value, ast.AST):
                visit(value)

    def _qualname(self, name: str) -> str:
        return ".".join([n for n, _ in self._scope] + [name])

    def _add(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, kind: str) -> None:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        doc = ast.get_docstring(node, clean=True) or ""
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            signature = f"{node.name}({_unparse(node.args)})"
            if node.returns is not None:
                signature += f" -> {_unparse(node.returns)}"
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
                if arg.annotation is not None:
                    annotations.extend(_names(arg.annotation))
            if node.returns is not None:
                annotations.extend(_names(node.returns))
        else:
            bases = ", ".join(_unparse(b) for b in node.bases)
            signature = f"class {node.name}({bases})" if bases else f"class {node.name}"
        self.symbols.append({
            "name": node.name, "qualname": self._qualname(node.name), "kind": kind,
            "start": start, "end": node.end_lineno or node.lineno, "signature": signature,
            "doc": doc.strip().splitlines()[0] if doc.strip() else "",
            "is_public": not node.name.startswith("_"), "annotations": sorted(set(annotations)), "reads": [],
        })

    def _assign(self, node: ast.Assign | ast.AnnAssign) -> None:
        """A module- or class-level assignment to plain names: a value symbol (constant / attribute) each."""
        owner = self._scope[-1][1] if self._scope else "module"
        value = node.value
        if owner != "function" and (value is not None or owner == "class"):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])
                     if isinstance(t, ast.Name)]
            call = value.func if isinstance(value, ast.Call) else None
            called = call.id if isinstance(call, ast.Name) else call.attr if isinstance(call, ast.Attribute) else ""
            annotation = getattr(node, "annotation", None)
            type_alias = annotation is not None and _unparse(annotation).rpartition(".")[2] == "TypeAlias"
            alias = isinstance(value, (ast.Name, ast.Attribute)) and not type_alias
            for name in names:
                if owner == "module" and not name.isupper() and (alias or (call is not None and called not in _VALUE_CALLS)):
                    continue  # `log = getLogger(...)`, `get = api.get`: a handle or an alias, not a value of its own
                self._add_value(node, name, "attribute" if owner == "class" else "constant", annotation)
        self._children(node)

    def _add_value(self, node: ast.Assign | ast.AnnAssign, name: str, kind: str, annotation: ast.AST | None) -> None:
        value = _unparse(node.value) if node.value is not None else ""
        shown = f"{name}: {_unparse(annotation)}" if annotation is not None else name
        if value:
            shown += " = " + (value if len(value) <= SIGNATURE_CHARS else value[:SIGNATURE_CHARS] + "...")
        self.symbols.append({
            "name": name, "qualname": self._qualname(name), "kind": kind, "start": node.lineno,
            "end": node.end_lineno or node.lineno, "signature": " ".join(shown.split()), "doc": self._value_doc(node),
            "is_public": not name.startswith("_") or (name.startswith("__") and name.endswith("__")),
            "annotations": sorted(set(_names(annotation))) if annotation is not None else [],
            "reads": sorted(set(_names(node.value))) if node.value is not None else [],
        })

    def _value_doc(self, node: ast.AST) -> str:
        """The first line of the string right after the assignment (an attribute docstring), else ''."""
        following = self._next.get(id(node))
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                and isinstance(following.value.value, str) and following.value.value.strip():
            return following.value.value.strip().splitlines()[0]
        return ""

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, kind: str) -> None:
        self._scope.append((node.name, kind))
        outer, self._caller = self._caller, ".".join(n for n, _ in self._scope)
        try:
            self._children(node)
        finally:
            self._scope.pop()
            self._caller = outer

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        kind = "method" if self._scope and self._scope[-1][1] == "class" else "function"
        self._add(node, kind)
        self._scoped(node, "function")

    def _class(self, node: ast.ClassDef) -> None:
        self._add(node, "class")
        self._scoped(node, "class")

    def _import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.append({"module": alias.name, "names": [], "level": 0})

    def _import_from(self, node: ast.ImportFrom) -> None:
        self.imports.append({"module": node.module or "", "names": [a.name for a in node.names], "level": node.level})

    def _call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name:
            self.calls.append([self._caller, name])
        self._children(node)


def _unparse(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except (ValueError, RecursionError):
        return ""


def _names(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)] + [
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    ]


# ------------------------------------------------------------------ many files at once
log = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_many(texts: list[str], window_lines: int, workers: int) -> list[dict[str, Any]]:
    """``python_facts`` of every text, in order, parsed by ``workers`` fresh interpreters (``python -m`` this module:
    nothing of this process is forked — no model, no thread, no lock — and no caller's ``__main__`` is re-run).
    Files are dealt to the workers biggest first, so each gets about the same number of bytes. Texts go in and facts
    come back with ``marshal`` (plain data only: strings, numbers, lists, dicts). A worker that fails is reported and
    its files are parsed here."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(texts)), key=lambda i: -len(texts[i])):
        least = min(range(workers), key=load.__getitem__)
        shares[least].append(i)
        load[least] += len(texts[i]) + 1
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    procs = []
    for share in shares:
        if not share:
            continue
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=root)
        procs.append((share, proc))
    out: list[dict[str, Any] | None] = [None] * len(texts)
    try:
        for share, proc in procs:  # a worker reads all of its share before it writes: no pipe can fill up both ways
            try:
                stdin: IO[bytes] = proc.stdin  # type: ignore[assignment]  # PIPE: never None
                stdin.write(marshal.dumps((window_lines, [texts[i] for i in share])))
                stdin.close()
            except OSError:
                pass  # reported below, from its exit status
        for share, proc in procs:
            data = proc.stdout.read() if proc.stdout else b""
            errors = proc.stderr.read() if proc.stderr else b""
            facts = marshal.loads(data) if proc.wait() == 0 and data else None
            if not isinstance(facts, list) or len(facts) != len(share):
                why = errors.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                log.warning("a parse worker failed (%s); parsing its %d files in this process", why[0], len(share))
                continue
            for i, item in zip(share, facts):
                out[i] = item
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [facts if facts is not None else python_facts(texts[i], window_lines) for i, facts in enumerate(out)]


def _worker() -> None:
    window_lines, texts = marshal.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(marshal.dumps([python_facts(text, window_lines) for text in texts]))


if __name__ == "__main__":
    _worker()
