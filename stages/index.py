"""Stage `index` (docs/behaviour.md §1): the program under ``program_root`` as a ``ProgramIndex`` (files, symbols, windows, graph).

How it is built, stored and reused is stages/common/program/indexing.py (``build_index``). This stage turns its
settings into the walk's budgets and the parsing plan, and leaves this run's own folder out of the walk.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.program.indexing import Parsing, build_index
from stages.common.program.walk import DEFAULT_IGNORE, Limits, resolve_program
from stages.common.types import ProgramIndex


class IndexProgram(Stage):
    outputs = {"index": ProgramIndex}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        ignore: tuple[str, ...] = DEFAULT_IGNORE  # globs of names or paths never walked
        max_file_bytes: Annotated[int, Range(ge=1)] = 1_000_000
        window_lines: Annotated[int, Range(ge=1)] = 80
        cache_dir: str | None = None  # where the index is stored between processes (None: not stored)
        progress: bool = True  # a bar over the files parsed in this process, on a terminal, when there are many
        # the walk's budgets: a root such as / is refused with a message naming the key instead of read for hours
        max_files: Annotated[int, Range(ge=1)] = 50_000
        max_total_bytes: Annotated[int, Range(ge=1)] = 500_000_000
        max_line_chars: Annotated[int, Range(ge=1)] = 10_000
        exclude: tuple[str, ...] = ()  # folders never walked wherever they are (our outputs folder)
        workers: Annotated[int, Range(ge=0)] = 0  # parsing processes: 0 = one per available core, 1 = this process
        parallel_min_files: Annotated[int, Range(ge=1)] = 64  # fewer files to parse: in this process

    config: Config

    def precheck(self, program_root: str) -> None:
        resolve_program(program_root)  # a missing, FIFO or /proc root fails before any model loads (one file is a program)

    def run(self, program_root: str, context: RunContext | None = None) -> dict:
        c = self.config
        exclude = tuple(str(p) for p in c.exclude if p)
        if context is not None:  # this run's own folder (hydra.run.dir may lie inside the program) is never evidence
            exclude = (*exclude, str(context.run_dir))
        limits = Limits(c.max_file_bytes, c.max_files, c.max_total_bytes, c.max_line_chars, exclude)
        index = build_index(program_root, list(c.ignore), c.max_file_bytes, c.window_lines,
                            Path(c.cache_dir) if c.cache_dir else None, c.progress, limits=limits,
                            parsing=Parsing(c.workers, c.parallel_min_files))
        return {"index": index}
