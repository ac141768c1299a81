"""Stage `badge` (docs/behaviour.md §5, the honest badge): the final answer's badge, last before telemetry.

`grounded` holds when the citation check passed with a valid citation, no claim is contradicted (when a claims report
is wired to `claims`), the text is not degenerate (a bracket run, a word loop, an empty explanation after the lead)
and the reply was not cut at `max_new_tokens`; otherwise `Badge.reasons` says why, one phrase per failed check. A cut
reply ends at its last full sentence and says so (`… [cut at max_new_tokens=N]`), and the citations of the text cut
away leave the answer. The confidence in [0, 1] is the lead's margin and the cited evidence's score, times a factor
per failed check (stages/common/grounding/badge.py).
"""
from __future__ import annotations

import dataclasses

from pipeline.engine.stage import Stage
from stages.common.grounding.badge import Badge, BadgeSettings, judge, trim_cut
from stages.common.grounding.claimcheck import ClaimsReport
from stages.common.types import Answer, Evidence, ProgramIndex


class HonestBadge(Stage):
    outputs = {"answer": Answer, "badge": Badge}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(BadgeSettings):
        pass

    config: Config

    def run(self, answer: Answer, index: ProgramIndex, evidence: Evidence | None = None,
            claims: ClaimsReport | None = None) -> dict:
        """``claims``: the claims node's report (its ``contradicted`` count); absent, no claim counts against it."""
        shown = trim_cut(answer, index, self.config.cut)
        contradicted = claims.contradicted if claims is not None else 0
        return {"answer": shown, "badge": judge(shown, evidence, contradicted, self.config)}
