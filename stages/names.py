"""Stage `names` (docs/behaviour.md §5 grounded decoding): the code-like names of a draft that the program does not contain.

Feeds `cite` (an answer naming more than `cite.max_unknown_names` unknown names fails its check, which is what
sends a question to the stage-2 retry), then `repair` marks them for the reader and `telemetry` lists them.
"""
from __future__ import annotations

from pipeline.engine.stage import Stage
from stages.common.grounding.citations import parse_citations
from stages.common.grounding.identifiers import NameCheck, check_names
from stages.common.types import Draft, ProgramIndex


class CheckNames(Stage):
    outputs = {"names": NameCheck}

    def run(self, draft: Draft, index: ProgramIndex, prompt: str) -> dict:
        spans = [(start, end) for start, end, *_ in parse_citations(draft.text, index)]
        return {"names": check_names(draft.text, index, prompt, spans)}
