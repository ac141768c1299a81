"""The logits processors of a decode, in the order that keeps sampling safe: checks, then penalties and
context-aware decoding, then the grounding mask (stages/common/grounding/constraints.py), then temperature / top-k /
top-p, which only ever see allowed tokens.

Logits are checked for NaN/inf at every step: a one-line error (the weights are restored by `unmix`).
"""
from __future__ import annotations

import time
from typing import Any

from pipeline.engine.errors import PipelineError
from stages.common.generation.settings import DecodeSettings
from stages.common.grounding.constraints import CITATION_OPENER, CODE_OPENER, GroundingProcessor, TokenTrie, token_texts
from stages.common.grounding.quoteguard import QuoteGuard
from stages.common.types import LanguageModel, Prompt


class NonFiniteLogits(PipelineError):
    """The model produced NaN or infinite logits (a broken adapter or weights)."""


class FiniteCheck:
    """First in the processor list: raw logits with NaN or inf stop the decode with a clear error."""

    def __call__(self, input_ids, scores):
        import torch

        # -inf is a mask (min_new_tokens hides end-of-sequence); NaN, +inf or no finite value at all is broken.
        # One reduction per row finds all three (max propagates NaN; +inf is the max; all -inf leaves -inf)
        top = scores.amax(dim=-1)
        if bool(torch.isnan(top).any() or torch.isinf(top).any()):
            raise NonFiniteLogits("the model produced non-finite logits (NaN or inf): a broken adapter or weights")
        return scores


class Clock:
    """Notes when the first decoding step starts (the prompt's forward pass, the prefill, is done by then) and keeps
    the sequence of the latest step (a reference, no copy): what a Ctrl-C keeps of the draft."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.ids: Any = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        self.ids = input_ids
        return scores


def processors(lm: LanguageModel, prompt: Prompt, ids: list[int], settings: DecodeSettings, lead_in_generate: bool,
               before: str = "") -> tuple[Any, Clock, GroundingProcessor | None]:
    """The processor list for a decode of ``ids``, its clock, and its grounding processor (None when nothing is
    constrained). ``before`` is the reply text the prompt already holds (the scaffold's prefill and the lead)."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    clock = Clock()
    chain = LogitsProcessorList([clock, FiniteCheck()])
    if settings.cad_alpha and prompt.plain_ids:
        # context-aware decoding = classifier-free guidance with the prompt without evidence as the negative prompt:
        # log p(x | evidence) + α (log p(x | evidence) - log p(x | no evidence)); one more forward per token
        import torch
        from transformers import UnbatchedClassifierFreeGuidanceLogitsProcessor

        device = next(lm.model.parameters()).device
        plain = torch.tensor([prompt.plain_ids + ids[len(prompt.ids):]], device=device)
        chain.append(UnbatchedClassifierFreeGuidanceLogitsProcessor(1.0 + settings.cad_alpha, lm.model, plain))
    if settings.repetition_penalty != 1.0:
        ignore = None if settings.penalize_prompt else len(ids)
        chain.append(RepetitionPenaltyLogitsProcessor(float(settings.repetition_penalty), prompt_ignore_length=ignore))
    grounding = grounding_processor(lm, prompt, ids, settings, lead_in_generate, before)
    if grounding is not None:
        chain.append(grounding)
    if settings.do_sample:
        chain.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k:
            chain.append(TopKLogitsWarper(settings.top_k))
        chain.append(TopPLogitsWarper(settings.top_p))
    return chain, clock, grounding


def grounding_processor(lm: LanguageModel, prompt: Prompt, ids: list[int], settings: DecodeSettings,
                        lead_in_generate: bool, before: str) -> GroundingProcessor | None:
    """The constraints of ``settings.constrain`` that the prompt gives material for, as one processor."""
    constrain = set(settings.constrain)
    tok = lm.tokenizer
    slots = {}
    if "citations" in constrain and prompt.citations:
        slots[CITATION_OPENER] = TokenTrie.of_strings(tok, [f"{span}]" for span in prompt.citations])
    if "code" in constrain and prompt.names:
        slots[CODE_OPENER] = TokenTrie.of_strings(tok, [f"{name}{call}`" for name in prompt.names for call in ("", "()")])
    lead = TokenTrie.of_strings(tok, prompt.lead) if lead_in_generate else None
    known = prompt.names if "prose" in constrain else None
    quotes = (QuoteGuard(token_texts(tok), prompt.quotes, max(64, settings.top_k), greedy=not settings.do_sample)
              if "quotes" in constrain else None)
    labels = prompt.labels if "labels" in constrain and CITATION_OPENER in slots else None
    if not (slots or lead or known is not None or quotes):
        return None
    return GroundingProcessor(tok, len(ids), slots, lead, known, quotes, before, labels, settings.max_citation_run)
