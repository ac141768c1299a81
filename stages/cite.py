"""Stage `cite` (docs/behaviour.md §5): parse the draft's `path:START-END` citations and check them (pass/fail).

A citation is valid when its path is a file of the program, its lines exist, and its span overlaps a packed
window; pass = at least `min_citations` valid (or one per paragraph), no invalid one, and (when the `names` node
feeds it) at most `max_unknown_names` code-like names that the program does not contain.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

from pipeline.engine.stage import Range, Stage
from stages.common.grounding.citations import check
from stages.common.grounding.identifiers import NameCheck
from stages.common.types import CitationReport, Draft, Evidence, ProgramIndex


class CheckCitations(Stage):
    outputs = {"report": CitationReport, "passed": bool}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        min_citations: Annotated[int, Range(ge=0)] = 1
        citations_per_paragraph: bool = False
        must_cite: tuple[str, ...] = ()  # files a passing answer cites (when packed)
        max_unknown_names: Annotated[int, Range(ge=0)] | None = 0  # None: unknown names never fail the check

    config: Config

    def run(self, draft: Draft, index: ProgramIndex, evidence: Evidence, names: NameCheck | None = None) -> dict:
        c = self.config
        report = check(draft.text, index, evidence, c.min_citations, c.citations_per_paragraph, c.must_cite,
                       draft.source_at)
        if names is not None:
            report.names = names
            if c.max_unknown_names is not None and len(names.unknown) > c.max_unknown_names:
                report.passed = False
                report.reason = (report.reason + "; " if report.reason else "") + (
                    f"{len(names.unknown)} unknown names ({', '.join(names.unknown[:5])})")
        return {"report": report, "passed": report.passed}
