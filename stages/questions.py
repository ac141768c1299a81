"""Stage `qgen` (SPEC §9): a question set made from any Python program, and a copy of it without the answers.

For each documented def/class the question is the first sentence of its docstring and the answer is the
definition, `{question, path, start, end}` (start = first decorator line, as in the index). The stripped copy
drops those docstrings so the question's words are not sitting next to the answer: the docstring expression
becomes `""` (the body stays valid Python) and its other lines become blank, so every line keeps its number.
"""
from __future__ import annotations

import ast
import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Annotated

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import InputError
from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.program.walk import DEFAULT_IGNORE, resolve_root, walk

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


class DocstringQuestions(Stage):
    """Write `<out>/questions.jsonl` and the stripped program `<out>/<program name>/`."""

    outputs = {"questions": str, "program": str, "text": str}

    def __init__(self, out: str | None = None, min_words: Annotated[int, Range(ge=1)] = 4,
                 include_private: bool = True, ignore: list[str] = list(DEFAULT_IGNORE),
                 max_file_bytes: Annotated[int, Range(ge=1)] = 1_000_000):
        self.out, self.min_words, self.include_private = out, min_words, include_private
        self.ignore, self.max_file_bytes = list(ignore), max_file_bytes

    def run(self, context: RunContext, program_root: str) -> dict:
        root = resolve_root(program_root)
        out = Path(self.out).expanduser() if self.out else Path(context.run_dir)
        program = out / (root.name or "program")
        if program.resolve() == root or root in program.resolve().parents:
            raise InputError(f"out '{out}' would write the stripped copy inside program_root '{program_root}'")
        sources, _ = walk(root, self.ignore, self.max_file_bytes)
        items, files = [], 0
        for src in sources:
            data = src.data
            tree = _parse(src.text) if src.path.endswith(".py") else None
            chosen = [(d, doc) for d, doc in documented(tree) if self._wanted(d, doc)] if tree else []
            if chosen and tree is not None:
                stripped = strip_docstrings(src.text, [doc for _, doc in chosen])
                after = _parse(stripped)
                before = definitions(tree)
                if after is None or not _same_starts(before, definitions(after)):
                    raise InputError(f"program file '{src.path}': stripping its docstrings would move its definitions")
                data, files = stripped.encode("utf-8"), files + 1
                # the answer span is the definition as it stands in the stripped program that is evaluated
                in_copy = dict(zip(map(id, before), definitions(after)))
                for definition, doc in chosen:
                    start = min([definition.lineno] + [d.lineno for d in definition.decorator_list])
                    items.append({"question": first_sentence(str(doc.value)), "path": src.path, "start": start,
                                  "end": in_copy[id(definition)].end_lineno, "symbol": definition.name})
            target = program / src.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        # a sentence shared by several definitions (overloads, copies) does not say which one it means
        counts = Counter(item["question"] for item in items)
        items = [item for item in items if counts[item["question"]] == 1]
        if not items:
            raise InputError(f"program_root '{program_root}' has no documented def/class with a "
                             f"{self.min_words}+ word first sentence")
        questions = out / "questions.jsonl"
        write_atomic(questions, "".join(json.dumps(item) + "\n" for item in items))
        text = (f"{len(items)} questions from {files} files -> {questions}\nstripped program -> {program}\n"
                f"evaluate: python -m pipeline.run pipeline=eval program_root={program} questions={questions}")
        return {"questions": str(questions), "program": str(program), "text": text}

    def _wanted(self, definition: Definition, doc: ast.Constant) -> bool:
        if not self.include_private and definition.name.startswith("_"):
            return False
        return len(first_sentence(str(doc.value)).split()) >= self.min_words
