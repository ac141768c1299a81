"""Stage `telemetry` (docs/behaviour.md §6): one record per answer (pipeline/engine/records.py), `telemetry.json` in the run
folder (and at `telemetry_out` if set).

It runs also after a failure (node `always: true`): then `status` is `failed` and `error` names the node. After a
Ctrl-C during decode, `interrupted` is true and `answer` is the draft decoded so far (unchecked).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from pipeline.engine.cache import write_atomic
from pipeline.engine.records import CitationRecord, ClaimRecord, Span, Telemetry
from pipeline.engine.stage import RunContext, Stage
from stages.common.generation.generate import DecodeInterrupted
from stages.common.grounding.badge import Badge
from stages.common.grounding.claimcheck import ClaimsReport
from stages.common.grounding.labels import mislabels
from stages.common.grounding.quotes import check_code
from stages.common.types import Answer, CitationReport, Draft, Evidence, LanguageModel, ProgramIndex, Selection

FILENAME = "telemetry.json"  # the name the report and the summary read it by (conf/report/html.yaml, conf/summary.yaml)


class WriteTelemetry(Stage):
    outputs = {"telemetry": Telemetry}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        telemetry_out: str | None = None  # a second copy of the record, e.g. for a script that asks via the API

    config: Config

    def run(self, context: RunContext, prompt: str = "", answer: Answer | None = None,
            selection: Selection | None = None, evidence: Evidence | None = None, lm: LanguageModel | None = None,
            mix_report: dict | None = None, remix_report: dict | None = None, draft: Draft | None = None,
            retry_draft: Draft | None = None, first_report: CitationReport | None = None,
            index: ProgramIndex | None = None, badge: Badge | None = None, claims: ClaimsReport | None = None) -> dict:
        partial = context.error.draft if isinstance(context.error, DecodeInterrupted) else None
        drafts = [d for d in (draft, retry_draft, partial) if d is not None]
        timings = {k: round(v, 4) for k, v in context.timings.items()}
        record = Telemetry(
            status="failed" if context.failure else "ok",
            error=context.failure,
            prompt=prompt,
            overrides=tuple(context.overrides),
            files_selected=tuple(selection.files) if selection else (),
            modules_selected=tuple(selection.modules) if selection else (),
            windows_packed=tuple(Span(**w.span()) for w in evidence.windows) if evidence else (),
            file_scores={f: _rounded(selection.scores.get(f)) for f in selection.files} if selection else {},
            window_scores=_window_scores(selection, evidence),
            grounded=False,
            first_check={"passed": first_report.passed, "reason": first_report.reason} if first_report else None,
            decoding=_decoding(drafts),
            fallback_mix=remix_report,
            timings=timings,
            elapsed_sec=round(sum(timings.values()), 4),
            model=lm.model_id if lm else None,
            device=lm.device if lm else None,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        if answer is not None:
            record = _answered(record, answer, evidence, index, drafts)
            if claims is not None:
                record = dataclasses.replace(
                    record, claims_checked=claims.checked, claims_contradicted=claims.contradicted,
                    claims_dropped=claims.dropped, claims=tuple(ClaimRecord(**c.as_dict()) for c in claims.claims))
            if badge is not None:  # the badge node's verdict replaces the citation check's alone
                record = dataclasses.replace(record, grounded=badge.grounded, not_grounded=dict(badge.reasons),
                                             confidence=badge.confidence, confidence_parts=dict(badge.parts),
                                             cut_at=badge.cut_at)
        elif partial is not None:
            record = dataclasses.replace(
                record, answer=partial.text, lead=partial.lead, notes=tuple(note for d in drafts for note in d.notes),
                tokens={"prompt": partial.prompt_tokens, "generated": partial.generated_tokens})
        if isinstance(context.error, KeyboardInterrupt):
            record = dataclasses.replace(record, interrupted=True)
        record = record.with_entries(mix_report or {})
        data = record.to_json()
        blob = json.dumps(data, indent=2, default=str)
        write_atomic(Path(context.run_dir) / FILENAME, blob)
        if self.config.telemetry_out:
            write_atomic(Path(self.config.telemetry_out), blob)
        return {"telemetry": record}


def _answered(record: Telemetry, answer: Answer, evidence: Evidence | None, index: ProgramIndex | None,
              drafts: list[Draft]) -> Telemetry:
    """``record`` with the answer, its citations and what its checks found."""
    citations = answer.citations
    valid = sum(c.valid for c in citations)
    names = answer.report.names
    # Python-looking lines the model wrote (its own text, before repair) that no packed window contains
    code = check_code(answer.draft.text, evidence) if evidence else None
    return dataclasses.replace(
        record,
        answer=answer.text,
        citations=tuple(CitationRecord(**c.as_dict()) for c in citations),
        citations_total=len(citations),
        citations_valid=valid,
        citations_model=sum(c.source == "model" for c in citations),
        citations_attributed=sum(c.source == "attributed" for c in citations),
        citations_must=answer.report.must,
        citation_precision=valid / len(citations) if citations else 0.0,
        first_check_passed=answer.report.passed if not answer.fallback_used else None,
        retries=answer.retries,
        fallback_used=answer.fallback_used,
        citations_model_valid=sum(c.valid and c.source == "model" for c in citations),
        grounded=bool(answer.report.passed and valid),
        code_identifiers=len(names.names) if names is not None else 0,
        unknown_identifiers=tuple(names.unknown) if names is not None else (),
        unknown_identifier_rate=round(names.rate, 4) if names is not None else 0.0,
        code_lines=len(code.lines) if code else 0,
        code_lines_unverified=tuple(code.texts) if code else (),
        # `name` [path:A-B] pairs of the model's text whose span does not define that name
        citations_mislabelled=tuple(f"{m.name} [{m.path}:{m.start_line}-{m.end_line}] defines {m.defines or 'nothing'}"
                                    for m in mislabels(answer.draft.text, index)) if index else (),
        lead=answer.draft.lead,
        tokens={"prompt": answer.draft.prompt_tokens, "generated": answer.draft.generated_tokens},
        notes=tuple(note for d in drafts for note in d.notes),
    )


def _decoding(drafts: list[Draft]) -> dict:
    decoding = sum(d.seconds - d.prefill_seconds for d in drafts)
    generated = sum(d.generated_tokens for d in drafts)
    return {
        "attempts": len(drafts), "new_tokens": generated,
        "prefill_seconds": round(sum(d.prefill_seconds for d in drafts), 4),
        "decode_seconds": round(decoding, 4),
        "tokens_per_second": round(generated / decoding, 3) if decoding > 0 else 0.0,
        "constrained_citations": sum(d.constrained_citations for d in drafts),
        "constrained_names": sum(d.constrained_names for d in drafts),
        "steered_quotes": sum(d.steered_quotes for d in drafts),
    }


def _rounded(value) -> float | None:
    return round(float(value), 4) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _window_scores(selection: Selection | None, evidence: Evidence | None) -> tuple[float | None, ...]:
    if evidence is None:
        return ()
    ranked = (selection.window_ranking or {}) if selection else {}
    scores = {(w.path, w.start, w.end): score for pairs in ranked.values() for score, w in pairs}
    return tuple(_rounded(scores.get((w.path, w.start, w.end))) for w in evidence.windows)
