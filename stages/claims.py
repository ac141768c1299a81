"""Stage `claims` (docs/behaviour.md §5, claims): what the answer's prose says about the definitions it names, checked
against their AST (stages/common/grounding/claims.py reads the statements, claimcheck.py checks them).

- `claims=check`: parameters (how many, which names), returns None or a value, raises X, calls X, is a class /
  function / method / property / constant, decorated by X. A statement is checked only when its subject is clear;
  it is contradicted only when wrong for every definition its name may be. `on_contradiction` decides the cost:
  `mark` puts `[the code says: ...]` after the sentence, `drop` leaves the sentence out with its citations,
  `retry` also sends a first draft with a contradicted claim to stage 2 (the `claims_first` node) and marks what
  the final answer still contradicts.
- `claims=none`: the answer passes through; nothing is checked.
"""
from __future__ import annotations

import dataclasses

from pipeline.engine.stage import Stage
from stages.common.grounding.claimcheck import ClaimAction, ClaimsReport, check_text, drop, mark, report
from stages.common.types import Answer, Draft, Evidence, ProgramIndex


class CheckClaims(Stage):
    """`claims=check`: check the final answer's statements; mark or drop the contradicted ones."""

    outputs = {"answer": Answer, "report": ClaimsReport}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        on_contradiction: ClaimAction = "mark"  # mark: `[the code says: ...]` | drop the sentence | retry stage 2

    config: Config

    def run(self, answer: Answer, index: ProgramIndex, evidence: Evidence | None = None) -> dict:
        claims = check_text(answer.text, index, evidence)
        action = self.config.on_contradiction
        if action == "drop":
            text, citations, dropped = drop(answer, claims, index)
            return {"answer": dataclasses.replace(answer, text=text, citations=citations),
                    "report": report(claims, action, dropped)}
        return {"answer": dataclasses.replace(answer, text=mark(answer.text, claims)), "report": report(claims, action)}


class CheckDraft(Stage):
    """The `claims_first` and `claims_retry` nodes (config `claims`): with `on_contradiction=retry`, a draft that
    passed its citation check but contradicts the code does not pass; otherwise `passed` is the citation check's."""

    outputs = {"passed": bool, "report": ClaimsReport}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(CheckClaims.Config):
        pass

    config: Config

    def run(self, draft: Draft, index: ProgramIndex, passed: bool, evidence: Evidence | None = None) -> dict:
        if self.config.on_contradiction != "retry":
            return {"passed": passed, "report": ClaimsReport(action=self.config.on_contradiction)}
        checked = report(check_text(draft.text, index, evidence), "retry")
        return {"passed": passed and not checked.contradicted, "report": checked}


class NoClaims(Stage):
    """`claims=none`: the answer passes through unchecked (same ports as `claims=check`)."""

    outputs = {"answer": Answer, "report": ClaimsReport}

    def run(self, answer: Answer, index: ProgramIndex, evidence: Evidence | None = None) -> dict:
        return {"answer": answer, "report": ClaimsReport(action="none")}
