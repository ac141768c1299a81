"""Stage `choose` (docs/behaviour.md §5 fallback): the answer is the better attempt.

Better = passed its checks, then fewer contradicted claims (when `claims_first` / `claims_retry` checked them:
claims.on_contradiction=retry), more valid citations, fewer invalid ones, fewer unknown names. The retry inputs
are optional: when the first check passed, the retry branch was skipped and the first
attempt is the answer.
"""
from __future__ import annotations

from pipeline.engine.stage import Stage
from stages.common.grounding.claimcheck import ClaimsReport
from stages.common.types import Answer, CitationReport, Draft


def rank(report: CitationReport, claims: ClaimsReport | None = None) -> tuple:
    """Passed first, then fewer contradicted claims, more valid citations, fewer invalid ones, fewer unknown names."""
    contradicted = claims.contradicted if claims is not None else 0
    return (report.passed, -contradicted, report.valid, -(report.total - report.valid), -len(report.unknown_names))


class ChooseBetter(Stage):
    outputs = {"answer": Answer}

    def run(self, draft: Draft, report: CitationReport, retry_draft: Draft | None = None,
            retry_report: CitationReport | None = None, claims: ClaimsReport | None = None,
            retry_claims: ClaimsReport | None = None) -> dict:
        if retry_draft is None or retry_report is None:
            return {"answer": Answer(draft.text, report.citations, draft, report, 0, False)}
        first_key, retry_key = rank(report, claims), rank(retry_report, retry_claims)
        if retry_key > first_key:
            return {"answer": Answer(retry_draft.text, retry_report.citations, retry_draft, retry_report, 1, True)}
        return {"answer": Answer(draft.text, report.citations, draft, report, 1, False)}
