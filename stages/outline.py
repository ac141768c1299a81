"""Stage `outline` (docs/behaviour.md §1b): a map of the program for people, `python -m pipeline.outline`.

The program's files, classes, functions and values with their spans and one-line summaries, most central first
(PageRank over the call graph's `calls` and `imports` edges; stages/common/program/outline.py). With a `symbol`:
that symbol's callers, callees and its file's section instead. The result is one JSON-ready dict whose `text` is
what a person reads; the most central `report_files` files also go to `outline.json` in the run folder, which the
run report shows as "Map of the program".
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import InputError
from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.program.outline import build_map, closest, map_text, symbol_text, symbol_view
from stages.common.types import ProgramIndex

FILENAME = "outline.json"  # the name the report reads it by (conf/report/html.yaml)


class OutlineProgram(Stage):
    outputs = {"outline": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        damping: Annotated[float, Range(gt=0, lt=1)] = 0.85  # PageRank's damping: the share of rank that follows edges
        files: Annotated[int, Range(ge=0)] = 0  # files shown, most central first; 0: every file
        symbols_per_file: Annotated[int, Range(ge=0)] = 0  # symbols shown per file, most central first; 0: all
        report_files: Annotated[int, Range(ge=0)] = 20  # files written to outline.json for the run report; 0: none

    config: Config

    def run(self, index: ProgramIndex, symbol: str | None = None, context: RunContext | None = None) -> dict:
        c = self.config
        sections = None
        result: dict[str, Any]
        if symbol:
            try:
                views = symbol_view(index, symbol, c.damping)
            except LookupError:
                near = closest(index, symbol)
                raise InputError(f"symbol '{symbol}' is not defined in {index.location}"
                                 + (f" (closest: {', '.join(near)})" if near else "")) from None
            result = {"root": str(index.location), "symbol": symbol, "matches": views, "text": symbol_text(views)}
        else:
            sections = build_map(index, c.damping, c.files, c.symbols_per_file)
            result = {"root": str(index.location), "files_total": len(index.files),
                      "symbols_total": len(index.symbols), "files": [s.as_dict() for s in sections],
                      "text": map_text(index, sections)}
        if context is not None and c.report_files:
            whole = sections is not None and (not c.files or c.files >= c.report_files)
            top = sections[:c.report_files] if sections is not None and whole else \
                build_map(index, c.damping, c.report_files, c.symbols_per_file)
            record: dict[str, Any] = {"root": str(index.location), "files_total": len(index.files),
                                      "symbols_total": len(index.symbols), "files": [s.as_dict() for s in top]}
            write_atomic(Path(context.run_dir) / FILENAME, json.dumps(record, indent=1))
        return {"outline": result}
