"""What one Python file declares: symbols, imports, calls and windows, as JSON-able facts.

Facts depend only on the file's path and bytes, so they are cached by ``(path, sha256)``.
"""
from __future__ import annotations

import ast
import warnings
from typing import Any

from stages.common.lines import count_lines


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
        collector.visit(tree)
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


class _Collector(ast.NodeVisitor):
    def __init__(self) -> None:
        self.symbols: list[dict[str, Any]] = []
        self.imports: list[dict[str, Any]] = []
        self.calls: list[list[str]] = []
        self._scope: list[tuple[str, str]] = []  # (name, kind)

    def _qualname(self, name: str) -> str:
        return ".".join([n for n, _ in self._scope] + [name])

    def _add(self, node: ast.AST, kind: str) -> None:
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

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        kind = "method" if self._scope and self._scope[-1][1] == "class" else "function"
        self._add(node, kind)
        self._scope.append((node.name, "function"))
        self.generic_visit(node)
        self._scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._add(node, "class")
        self._scope.append((node.name, "class"))
        self.generic_visit(node)
        self._scope.pop()

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.append({"module": alias.name, "names": [], "level": 0})

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.imports.append({"module": node.module or "", "names": [a.name for a in node.names], "level": node.level})

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name:
            caller = ".".join(n for n, _ in self._scope)
            self.calls.append([caller, name])
        self.generic_visit(node)


def _unparse(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except (ValueError, RecursionError):
        return ""


def _names(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)] + [
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    ]
