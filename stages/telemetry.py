"""Stage `telemetry` (SPEC §6): one JSON per answer, in the run folder (and at `telemetry_out` if set).

It runs also after a failure (node `always: true`): then `status` is `failed` and `error` names the node.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pipeline.engine.cache import write_atomic
from pipeline.engine.stage import RunContext, Stage
from stages.common.grounding.labels import mislabels
from stages.common.grounding.quotes import check_code
from stages.common.types import Answer, CitationReport, Draft, Evidence, LanguageModel, ProgramIndex, Selection


class WriteTelemetry(Stage):
    outputs = {"telemetry": dict}

    def __init__(self, telemetry_out: str | None = None, filename: str = "telemetry.json"):
        self.telemetry_out, self.filename = telemetry_out, filename

    def run(self, context: RunContext, prompt: str = "", answer: Answer | None = None,
            selection: Selection | None = None, evidence: Evidence | None = None, lm: LanguageModel | None = None,
            mix_report: dict | None = None, remix_report: dict | None = None, draft: Draft | None = None,
            retry_draft: Draft | None = None, first_report: CitationReport | None = None,
            index: ProgramIndex | None = None) -> dict:
        record: dict[str, Any] = {
            "status": "failed" if context.failure else "ok",
            "error": context.failure,
            "prompt": prompt,
            "answer": answer.text if answer else None,
            "overrides": list(context.overrides),
            "files_selected": selection.files if selection else [],
            "modules_selected": selection.modules if selection else [],
            "windows_packed": [w.span() for w in evidence.windows] if evidence else [],
            # what ranked them: the selection score of each selected file, and of each packed window when the
            # selection ranked windows itself (select=hybrid, rerank=lm); null where nothing scored it
            "file_scores": {f: _rounded(selection.scores.get(f)) for f in selection.files} if selection else {},
            "window_scores": _window_scores(selection, evidence),
        }
        citations = answer.citations if answer else []
        record.update({
            "citations": [c.as_dict() for c in citations],
            "citations_total": len(citations),
            "citations_valid": sum(c.valid for c in citations),
            "citations_model": sum(c.source == "model" for c in citations),
            "citations_attributed": sum(c.source == "attributed" for c in citations),
            "citations_must": answer.report.must if answer else 0,
            "citation_precision": (sum(c.valid for c in citations) / len(citations)) if citations else 0.0,
            "first_check_passed": answer.report.passed if answer and not answer.fallback_used else None,
            # why the retry ran (the first draft's check), also when the retry's answer was kept
            "first_check": {"passed": first_report.passed, "reason": first_report.reason} if first_report else None,
            "retries": answer.retries if answer else 0,
            "fallback_used": answer.fallback_used if answer else False,
        })
        model_valid = sum(c.valid and c.source == "model" for c in citations)
        names = answer.report.names if answer and answer.report.names is not None else None
        record.update({
            "citations_model_valid": model_valid,
            "grounded": bool(answer and answer.report.passed and any(c.valid for c in citations)),
            "code_identifiers": len(names.names) if names else 0,
            "unknown_identifiers": list(names.unknown) if names else [],
            "unknown_identifier_rate": round(names.rate, 4) if names else 0.0,
        })
        # Python-looking lines the model wrote (its own text, before repair) that no packed window contains
        code = check_code(answer.draft.text, evidence) if answer and evidence else None
        record.update({
            "code_lines": len(code.lines) if code else 0,
            "code_lines_unverified": code.texts if code else [],
            # `name` [path:A-B] pairs of the model's text whose span does not define that name
            "citations_mislabelled": [f"{m.name} [{m.path}:{m.start_line}-{m.end_line}] defines {m.defines or 'nothing'}"
                                      for m in mislabels(answer.draft.text, index)] if answer and index else [],
        })
        drafts = [d for d in (draft, retry_draft) if d is not None]
        decoding = sum(d.seconds - d.prefill_seconds for d in drafts)
        generated = sum(d.generated_tokens for d in drafts)
        record["decoding"] = {
            "attempts": len(drafts), "new_tokens": generated,
            "prefill_seconds": round(sum(d.prefill_seconds for d in drafts), 4),
            "decode_seconds": round(decoding, 4),
            "tokens_per_second": round(generated / decoding, 3) if decoding > 0 else 0.0,
            "constrained_citations": sum(d.constrained_citations for d in drafts),
            "constrained_names": sum(d.constrained_names for d in drafts),
            "steered_quotes": sum(d.steered_quotes for d in drafts),
        }
        record["lead"] = answer.draft.lead if answer else {}
        record.update({"rank": None, "gsub": None, "alpha": None, "entropy": None, "delta_norms": {}})
        if mix_report:
            record.update(mix_report)
        record["fallback_mix"] = remix_report
        timings = {k: round(v, 4) for k, v in context.timings.items()}
        record.update({
            "timings": timings,
            "elapsed_sec": round(sum(timings.values()), 4),
            "tokens": {"prompt": answer.draft.prompt_tokens, "generated": answer.draft.generated_tokens} if answer else {},
            "model": lm.model_id if lm else None,
            "device": lm.device if lm else None,
            "notes": [note for d in (draft, retry_draft) if d is not None for note in d.notes] if answer else [],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        blob = json.dumps(record, indent=2, default=str)
        write_atomic(Path(context.run_dir) / self.filename, blob)
        if self.telemetry_out:
            write_atomic(Path(self.telemetry_out), blob)
        return {"telemetry": record}


def _rounded(value) -> float | None:
    return round(float(value), 4) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _window_scores(selection: Selection | None, evidence: Evidence | None) -> list[float | None]:
    if evidence is None:
        return []
    ranked = (selection.window_ranking or {}) if selection else {}
    scores = {(w.path, w.start, w.end): score for pairs in ranked.values() for score, w in pairs}
    return [_rounded(scores.get((w.path, w.start, w.end))) for w in evidence.windows]
