"""Stage `cite` (SPEC §5): parse the draft's `path:START-END` citations and check them (pass/fail).

A citation is valid when its path is a file of the program, its lines exist, and its span overlaps a packed
window; pass = at least `min_citations` valid (or one per paragraph) and no invalid one.
"""
from __future__ import annotations

from typing import Annotated

from pipeline.stage import Range, Stage
from stages.common.citations import check
from stages.common.types import CitationReport, Draft, Evidence, ProgramIndex


class CheckCitations(Stage):
    outputs = {"report": CitationReport, "passed": bool}

    def __init__(self, min_citations: Annotated[int, Range(ge=0)] = 3, citations_per_paragraph: bool = False,
                 must_cite: list[str] = []):
        self.min_citations, self.per_paragraph, self.must_cite = min_citations, citations_per_paragraph, list(must_cite)

    def run(self, draft: Draft, index: ProgramIndex, evidence: Evidence) -> dict:
        report = check(draft.text, index, evidence, self.min_citations, self.per_paragraph, self.must_cite,
                       draft.source_at)
        return {"report": report, "passed": report.passed}
