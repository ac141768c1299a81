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
    for sym in collector.symbols:
        top_level = "." not in sym["qualname"]
        long_method = sym["kind"] == "method" and _outside_first_window(sym, collector.symbols, window_lines)
        if top_level or long_method:
            end = min(sym["end"], sym["start"] + window_lines - 1)
            windows.append([sym["start"], end, sym["qualname"], sym["kind"]])
    return facts


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
        self._handlers: dict[type, Callable[[Any], None]] = {ast.FunctionDef: self._function, ast.AsyncFunctionDef: self._function,
                          ast.ClassDef: self._class, ast.Import: self._import, ast.ImportFrom: self._import_from,
                          ast.Call: self._call}

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
                for item in value:
                    if type(item) not in leaves and isinstance(item, ast.AST):
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
            "is_public": not node.name.startswith("_"), "annotations": sorted(set(annotations)),
        })

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
