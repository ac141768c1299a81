"""How one reply is decoded: the settings of the `decode` stage that the generate loop reads (conf/decode/greedy.yaml).

`constrain` names the grounding constraints applied inside `generate` (stages/common/grounding/constraints.py):
`lead` (the reply starts with one of the prompt's lead choices), `citations` (a citation the model opens names a
packed span), `code` (inline code names an identifier of the evidence or the question), `prose` (a word written like
code, snake_case or camelCase, must be such a name), `quotes` (a line that starts as Python code stays a prefix of a
packed line, stages/common/grounding/quoteguard.py) and `labels` (a citation right after `` `name` `` names a span
where that definition starts); `()` decodes freely.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pipeline.engine.stage import Range
from stages.common.models.requantize import EngineWeights

Constraint = Literal["lead", "citations", "code", "prose", "quotes", "labels"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeSettings:
    """What the generate loop reads; `Decode.Config` (stages/decode.py) is these and what only the stage reads."""

    do_sample: bool = False
    temperature: Annotated[float, Range(gt=0)] = 0.7
    top_p: Annotated[float, Range(gt=0, le=1)] = 0.9
    top_k: Annotated[int, Range(ge=0)] = 50
    repetition_penalty: Annotated[float, Range(gt=0)] = 1.1
    # true penalises the prompt's tokens too, every identifier of the evidence: a small model then invents names
    penalize_prompt: bool = False
    min_new_tokens: Annotated[int, Range(ge=0)] = 64
    max_new_tokens: Annotated[int, Range(ge=1)] = 256
    constrain: tuple[Constraint, ...] = ("lead", "citations", "code", "prose", "quotes", "labels")
    # likelihood: every lead choice scored after the prompt (generation/lead.py); greedy: spelled token by token
    lead: Literal["likelihood", "greedy"] = "likelihood"
    lead_prior: Annotated[float, Range(ge=0)] = 1.0  # subtracted from a lead choice's score per window position
    lead_calibrate: bool = True  # minus the choice's score after the same prompt with a neutral question
    # context-aware decoding: log p(x|evidence) + alpha (log p(x|evidence) - log p(x|no evidence)); one more forward
    cad_alpha: Annotated[float, Range(ge=0)] = 0.0
    max_paragraphs: Annotated[int, Range(ge=1)] | None = 2  # the reply ends after this many (the lead's included)
    max_sentences: Annotated[int, Range(ge=1)] | None = 6  # the reply ends after this many (the lead's included)
    stop_at_repeated_line: bool = True  # a line written a third time ends the reply; every repeat is dropped
    # a sequence of this many words (citations left out) written a second time ends the reply at the sentence before it
    stop_at_repeated_words: Annotated[int, Range(ge=3)] | None = 8
    max_citation_run: Annotated[int, Range(ge=1)] | None = 1  # citations in a row, only whitespace between
    seed: int = 0
    prefill_chunk: Annotated[int, Range(ge=1)] | None = None  # prompt tokens per forward (None: all at once)
    # who computes the logits: transformers (the loaded model, adapter mixed in) or llama.cpp (the model's GGUF, no
    # adapter; generation/llamacpp_generate.py); auto: llama.cpp where it can, else transformers (pick_engine says
    # why); our processors, lead choice and stops run on both
    engine: Literal["auto", "transformers", "llamacpp"] = "auto"
    # the file llama.cpp reads: the GGUF as fetched, or a copy in one type (models/requantize.py says why)
    engine_weights: EngineWeights = "gguf"
    engine_cache: str | None = None  # where such copies are kept (conf: the model cache)
