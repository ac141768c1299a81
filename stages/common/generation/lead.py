"""The lead the model finds likeliest (`decode.lead=likelihood`): each lead choice's name scored after the prompt in
one batched pass over the prompt's KV cache (stages/common/generation/continuations.py); decoding goes on from that
cache."""
from __future__ import annotations

import copy
from typing import Any

from pipeline.engine import resources
from stages.common.generation.settings import DecodeSettings
from stages.common.grounding.leads import LeadChoice
from stages.common.tokens import encode_text, encode_texts
from stages.common.types import LanguageModel, Prompt


def choose_lead(lm: LanguageModel, prompt: Prompt, ids: list[int], settings: DecodeSettings,
                reuse: tuple | None = None) -> tuple[str, list[int], Any, dict[str, Any]]:
    """The lead the model finds likeliest: each choice's name scored after the prompt, minus its score after the
    same prompt asking nothing in particular (`lead_calibrate`: what the choice owes to the question, not to how
    common the name is), minus `lead_prior` per packed-window position of its window, plus the choice's `lead_bonus`
    (the `leadsim` node: its name's similarity to the question).
    Returns the choice, its token ids, the prompt's cache (decoding goes on from it) and a record.

    With ``reuse`` (what the model computes with: `stages.decode.weights_key`), the prompt's cache and the choices'
    scores are kept for the next job of a sweep that asks the same model, mixed the same way, with the same prompt
    (jobs that differ only in how they decode): it gets a copy of the cache and pays no prefill."""
    tok = lm.tokenizer
    name_ids = lead_names(prompt, tok)
    neutral_ids = neutral_prompt(prompt, ids, settings)
    computed = []

    def encode_and_score():
        computed.append(True)
        return _encode_and_score(lm.model, ids, neutral_ids, name_ids, settings.prefill_chunk)

    if reuse is None:
        cache, scores = encode_and_score()
    else:
        key = (reuse, tuple(ids), tuple(map(tuple, name_ids)), tuple(neutral_ids), settings.prefill_chunk)
        # two entries: a job whose retry runs (other weights, another prompt) must not evict its first attempt's
        kept, scores = resources.shared("prompt-prefill", key, encode_and_score, keep=2)
        cache = copy.deepcopy(kept)  # decoding extends the cache it is given
    chosen, record = pick_lead(prompt, scores, settings)
    record["prefill_reused"] = not computed
    return chosen, encode_text(tok, chosen), cache, record


def pick_lead(prompt: Prompt, scores: list[float], settings: DecodeSettings) -> tuple[str, dict[str, Any]]:
    """The lead choice with the best total (its model score, the window prior, the `leadsim` bonus) and a record."""
    ranks = prompt.lead_rank or [0] * len(prompt.lead)
    bonus = prompt.lead_bonus or [0.0] * len(prompt.lead)
    total = [score - settings.lead_prior * rank + extra for score, rank, extra in zip(scores, ranks, bonus)]
    best = max(range(len(total)), key=lambda i: (total[i], -i))
    chosen = prompt.lead[best]
    runner_up = max((t for i, t in enumerate(total) if i != best), default=None)
    return chosen, {"lead": chosen, "lead_score": round(total[best], 4), "lead_choices": len(prompt.lead),
                    "lead_window": ranks[best],
                    # the chosen score over the runner-up's (the badge's confidence); None: one choice only
                    "lead_margin": round(total[best] - runner_up, 4) if runner_up is not None else None}


def lead_names(prompt: Prompt, tok: Any) -> list[list[int]]:
    """Each lead choice's name (`` `qualname` ``) in token ids: what the likelihood scores."""
    return encode_texts(tok, [LeadChoice.parse(choice).label for choice in prompt.lead])


def neutral_prompt(prompt: Prompt, ids: list[int], settings: DecodeSettings) -> list[int]:
    """The prompt with the neutral question and the same reply prefix (`lead_calibrate`); [] when not calibrating."""
    return prompt.neutral_ids + ids[len(prompt.ids):] if settings.lead_calibrate and prompt.neutral_ids else []


def _encode_and_score(model, ids: list[int], neutral_ids: list[int], name_ids: list[list[int]],
                      chunk: int | None = None) -> tuple[Any, list[float]]:
    """The prompt's cache, and each name's score after it (minus its score after the neutral prompt, if any); the
    prompts are encoded ``chunk`` tokens a forward (`decode.prefill_chunk`)."""
    from stages.common.generation.continuations import (
        PrefixState,
        common_prefix,
        crop_to,
        encode_prefix,
        score_continuations,
    )

    # the two prompts share everything before the question: encode that once, and keep one cache: the neutral
    # prompt extends it and is scored, the cache is cropped back to the shared part, and the prompt itself extends
    # it (the same values as two caches; one prompt's cache less at the peak)
    shared = common_prefix(ids, neutral_ids)
    neutral_scores = None
    if neutral_ids and 0 < shared < min(len(ids), len(neutral_ids)):
        neutral = encode_prefix(model, neutral_ids, base=encode_prefix(model, ids[:shared], chunk=chunk), fork=False,
                                chunk=chunk)
        neutral_scores = score_continuations(model, neutral, name_ids)
        crop_to(neutral.cache, shared)
        state = encode_prefix(model, ids, base=PrefixState(list(ids[:shared]), neutral.cache, None), fork=False,
                              chunk=chunk)
        del neutral
    else:
        state = encode_prefix(model, ids, chunk=chunk)
        if neutral_ids:
            neutral_scores = score_continuations(model, encode_prefix(model, neutral_ids, chunk=chunk), name_ids)
    scores = [sum(s) for s in score_continuations(model, state, name_ids)]
    if neutral_scores is not None:
        scores = [a - sum(b) for a, b in zip(scores, neutral_scores)]
    return state.cache, scores
