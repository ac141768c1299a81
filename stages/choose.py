"""Stage `choose` (SPEC §5 fallback): the answer is the better attempt by valid citations.

The retry inputs are optional: when the first check passed, the retry branch was skipped and the first
attempt is the answer.
"""
from __future__ import annotations

from pipeline.stage import Stage
from stages.common.types import Answer, CitationReport, Draft


class ChooseBetter(Stage):
    outputs = {"answer": Answer}

    def run(self, draft: Draft, report: CitationReport, retry_draft: Draft | None = None,
            retry_report: CitationReport | None = None) -> dict:
        if retry_draft is None or retry_report is None:
            return {"answer": Answer(draft.text, report.citations, draft, report, 0, False)}
        first_key = (report.passed, report.valid, -(report.total - report.valid))
        retry_key = (retry_report.passed, retry_report.valid, -(retry_report.total - retry_report.valid))
        if retry_key > first_key:
            return {"answer": Answer(retry_draft.text, retry_report.citations, retry_draft, retry_report, 1, True)}
        return {"answer": Answer(draft.text, report.citations, draft, report, 1, False)}
