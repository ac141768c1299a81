"""Stage `qgen` (docs/behaviour.md §9): a question set made from any Python program, and a copy of it without the answers.

For each documented def/class the question is the first sentence of its docstring and the answer is the
definition, `{question, path, start, end, symbol}` (start = first decorator line, as in the index). The stripped
copy drops those docstrings so the question's words are not sitting next to the answer, every line keeping its
number (stages/common/program/docstrings.py).
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Annotated

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import InputError
from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.program.docstrings import file_questions
from stages.common.program.walk import DEFAULT_IGNORE, resolve_root, walk


class DocstringQuestions(Stage):
    """Write `<out>/questions.jsonl` and the stripped program `<out>/<program name>/`."""

    outputs = {"questions": str, "program": str, "text": str}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        out: str | None = None  # folder for questions.jsonl and the stripped program (None: the run folder)
        min_words: Annotated[int, Range(ge=1)] = 4  # shorter first sentences ("Constructor.") make no question
        include_private: bool = True  # also _private defs
        ignore: tuple[str, ...] = DEFAULT_IGNORE
        max_file_bytes: Annotated[int, Range(ge=1)] = 1_000_000

    config: Config

    def run(self, context: RunContext, program_root: str) -> dict:
        c = self.config
        root = resolve_root(program_root)
        out = Path(c.out).expanduser() if c.out else Path(context.run_dir)
        program = out / (root.name or "program")
        if program.resolve() == root or root in program.resolve().parents:
            raise InputError(f"out '{out}' would write the stripped copy inside program_root '{program_root}'")
        sources, _ = walk(root, list(c.ignore), c.max_file_bytes)
        items, files = [], 0
        for src in sources:
            data = src.data
            stripped, found = file_questions(src.path, src.text, self.wanted) if src.path.endswith(".py") else (None, [])
            if stripped is not None:
                data, files = stripped.encode("utf-8"), files + 1
                items.extend(found)
            target = program / src.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        # a sentence shared by several definitions (overloads, copies) does not say which one it means
        counts = Counter(item["question"] for item in items)
        items = [item for item in items if counts[item["question"]] == 1]
        if not items:
            raise InputError(f"program_root '{program_root}' has no documented def/class with a "
                             f"{c.min_words}+ word first sentence")
        questions = out / "questions.jsonl"
        write_atomic(questions, "".join(json.dumps(item) + "\n" for item in items))
        text = (f"{len(items)} questions from {files} files -> {questions}\nstripped program -> {program}\n"
                f"evaluate: python -m pipeline.run pipeline=eval program_root={program} questions={questions}")
        return {"questions": str(questions), "program": str(program), "text": text}

    def wanted(self, name: str, sentence: str) -> bool:
        if not self.config.include_private and name.startswith("_"):
            return False
        return len(sentence.split()) >= self.config.min_words
