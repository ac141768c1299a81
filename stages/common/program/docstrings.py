"""Docstrings of a Python program as questions: the first sentence of each documented def/class, and the program
with those docstrings taken out while every line keeps its number (the question set of stages/qgen.py).
"""
from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Callable

from pipeline.engine.errors import InputError

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")  # the line breaks Python's tokenizer counts
_ROLE = re.compile(r":[\w:.-]+:`~?([^`]+)`")  # :func:`echo` -> echo
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")

# what a question is made from: a documented def or class
Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def first_sentence(doc: str) -> str:
    paragraph = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.splitlines())
    text = _ROLE.sub(r"\1", text).replace("``", "")
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


def documented(tree: ast.AST) -> list[tuple[Definition, ast.Constant]]:
    """(definition, docstring node) of every def/class with a non-empty docstring, in source order."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str) and first.value.value.strip():
                found.append((node, first.value))
    return sorted(found, key=lambda pair: pair[0].lineno)


def strip_docstrings(text: str, docs: list[ast.Constant]) -> str:
    """``text`` with each docstring replaced by ``""`` on its first line and blank lines after it."""
    lines = _LINE.findall(text)
    for doc in sorted(docs, key=lambda d: -d.lineno):  # bottom up: earlier spans are untouched by later edits
        end_line, end_col = doc.end_lineno or doc.lineno, doc.end_col_offset or 0  # set by ast.parse
        first, last = lines[doc.lineno - 1].encode(), lines[end_line - 1].encode()  # ast columns are bytes
        prefix, suffix = first[: doc.col_offset], last[end_col:]
        body = suffix.rstrip(b"\r\n")
        ending = suffix[len(body):].decode()
        count = end_line - doc.lineno + 1
        head = (prefix + b'""' + body).decode()
        block = [head + ending] if count == 1 else [head + "\n", *["\n"] * (count - 2), ending or "\n"]
        lines[doc.lineno - 1 : doc.end_lineno] = block
    return "".join(lines)


def _parse(text: str) -> ast.AST | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings of the analysed program are not ours
            return ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def definitions(tree: ast.AST) -> list[Definition]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def _same_starts(before: list[Definition], after: list[Definition]) -> bool:
    """Every definition keeps its name and first line (a def whose body was only its docstring ends earlier)."""
    return [(n.name, n.lineno) for n in before] == [(n.name, n.lineno) for n in after]


def file_questions(path: str, text: str, wanted: Callable[[str, str], bool]) -> tuple[str | None, list[dict]]:
    """The questions of one Python file (``{question, path, start, end, symbol}``, for each documented definition
    whose name and first sentence are ``wanted``) and its text without their docstrings (None: nothing to strip)."""
    tree = _parse(text)
    chosen = [(d, doc) for d, doc in documented(tree) if wanted(d.name, first_sentence(str(doc.value)))] if tree else []
    if not chosen or tree is None:
        return None, []
    stripped = strip_docstrings(text, [doc for _, doc in chosen])
    after = _parse(stripped)
    before = definitions(tree)
    if after is None or not _same_starts(before, definitions(after)):
        raise InputError(f"program file '{path}': stripping its docstrings would move its definitions")
    # the answer span is the definition as it stands in the stripped program that is evaluated
    in_copy = dict(zip(map(id, before), definitions(after)))
    items = []
    for definition, doc in chosen:
        start = min([definition.lineno] + [d.lineno for d in definition.decorator_list])
        items.append({"question": first_sentence(str(doc.value)), "path": path, "start": start,
                      "end": in_copy[id(definition)].end_lineno, "symbol": definition.name})
    return stripped, items
