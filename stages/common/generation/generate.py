"""The generate loop of the `decode` stage: the prompt (and the scaffold's prefill) through transformers' `generate`
with our logits processors (stages/common/generation/processors.py) and reply stops (stops.py), after the lead
chosen by likelihood (lead.py) when the prompt offers lead choices. A Ctrl-C during the loop raises `DecodeInterrupted`
with the draft decoded so far (telemetry keeps it, marked interrupted)."""
from __future__ import annotations

import time
import traceback
from typing import Any

from stages.common.generation.continuations import cache_kwarg, encode_prefix
from stages.common.generation.heap import release_free_heap
from stages.common.generation.kvcache import reserved_cache
from stages.common.generation.lead import choose_lead
from stages.common.generation.processors import processors
from stages.common.generation.settings import DecodeSettings
from stages.common.generation.stops import ReplyStop, drop_repeated_lines, drop_repeated_words, keep_sentences
from stages.common.generation.streaming import console_streamer
from stages.common.grounding.constraints import CITATION_OPENER, CODE_OPENER, token_texts
from stages.common.tokens import encode_text
from stages.common.types import Draft, LanguageModel, Prompt


class DecodeInterrupted(KeyboardInterrupt):
    """Ctrl-C during the generate loop, carrying the draft decoded so far (kept in telemetry, marked interrupted)."""

    def __init__(self, draft: Draft):
        super().__init__(f"Ctrl-C during decode after {draft.generated_tokens} new tokens (partial draft kept)")
        self.draft = draft


def generate(lm: LanguageModel, prompt: Prompt, settings: DecodeSettings, reuse: tuple | None = None) -> Draft:
    """The reply to ``prompt``, decoded with ``settings``; ``reuse`` (see `choose_lead`) lets a sweep's next job
    reuse this prompt's cache."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    tok = lm.tokenizer
    ids = (prompt.ids or encode_text(tok, prompt.text)) + encode_text(tok, prompt.prefill)
    device = next(lm.model.parameters()).device
    use_lead = "lead" in settings.constrain and bool(prompt.lead)
    started = time.perf_counter()
    lead, cache = "", None
    record: dict[str, Any] = {}
    release_free_heap()  # what the stages before freed, before the prompt's activations come on top (its peak)
    if use_lead and settings.lead == "likelihood":
        lead, lead_ids, cache, record = choose_lead(lm, prompt, ids, settings, reuse)
        ids = ids + lead_ids
        release_free_heap()  # the prefill's activations, before decoding
    elif settings.prefill_chunk and len(ids) > settings.prefill_chunk + 1:
        # generate would encode the whole prompt in one forward: encode all but its last token in chunks here
        cache = encode_prefix(lm.model, ids[:-1], chunk=settings.prefill_chunk).cache
        release_free_heap()
    input_ids = torch.tensor([ids], device=device)
    chain, clock, grounding = processors(lm, prompt, ids, settings, use_lead and settings.lead == "greedy",
                                         prompt.prefill + lead)
    # every warper is ours (ordered after the grounding mask): generate adds none of its own
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
        do_sample=settings.do_sample, repetition_penalty=1.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if settings.do_sample else {}),
    )
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    stops = StoppingCriteriaList()
    reply_stop = make_reply_stop(tok, ids, settings, prompt.prefill + lead)
    if reply_stop is not None:
        stops.append(reply_stop)
    try:
        with torch.no_grad():
            output = lm.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       generation_config=config, logits_processor=chain, stopping_criteria=stops,
                                       streamer=console_streamer(tok, prompt.attempt, prompt.prefill + lead),
                                       **{cache_kwarg(lm.model): cache if cache is not None else reserved_cache(lm.model)})
    except KeyboardInterrupt as err:
        traceback.clear_frames(err.__traceback__)  # the frames inside generate hold the cache and activations
        # the clock holds the sequence of the last step: what was decoded before the Ctrl-C
        new = clock.ids[0, len(ids):] if clock.ids is not None else input_ids[0, :0]
        text = prompt.prefill + lead + tok.decode(new, skip_special_tokens=True)
        raise DecodeInterrupted(Draft(
            text.strip(), len(ids), int(new.shape[0]), time.perf_counter() - started, lm.device, attempt=prompt.attempt,
            prefill_seconds=(clock.first or time.perf_counter()) - started, lead=record,
            notes=[f"interrupted (Ctrl-C) after {int(new.shape[0])} new tokens: the draft is partial and unchecked"],
        )) from err
    seconds = time.perf_counter() - started
    if grounding is not None:
        grounding.update(output)
    return finish(lm, prompt, settings, len(ids), output[0, input_ids.shape[1]:].tolist(), prompt.prefill + lead,
                  seconds, (clock.first - started) if clock.first else seconds, record, grounding, reply_stop)


def make_reply_stop(tok: Any, ids: list[int], settings: DecodeSettings, before: str) -> ReplyStop | None:
    """Where the reply ends (stops.py), or None when no stop is set; ``before`` is the reply the prompt holds."""
    if not (settings.max_paragraphs or settings.max_sentences or settings.stop_at_repeated_line
            or settings.stop_at_repeated_words):
        return None
    return ReplyStop(token_texts(tok), len(ids), settings.max_paragraphs, settings.stop_at_repeated_line, before,
                     settings.stop_at_repeated_words, settings.max_sentences)


def finish(lm: LanguageModel, prompt: Prompt, settings: DecodeSettings, prompt_tokens: int, new: list[int],
           before: str, seconds: float, prefill_seconds: float, record: dict[str, Any], grounding: Any,
           reply_stop: ReplyStop | None) -> Draft:
    """The draft of a finished decode: ``before`` (prefill and lead) and the new tokens' text, loops and sentences
    past the limit dropped, whether it ran into max_new_tokens, and what the constraints did."""
    tok = lm.tokenizer
    text = before + tok.decode(new, skip_special_tokens=True)
    if settings.stop_at_repeated_line:
        text = drop_repeated_lines(text)
    if settings.stop_at_repeated_words:
        text = drop_repeated_words(text, settings.stop_at_repeated_words)
    if settings.max_sentences:  # the token that ended the last sentence may have begun the next one
        text = keep_sentences(text, settings.max_sentences)
    ended = (reply_stop is not None and reply_stop.done) or (len(new) > 0 and new[-1] in eos_ids(tok))
    return Draft(text.strip(), prompt_tokens, len(new), seconds, lm.device, attempt=prompt.attempt,
                 prefill_seconds=prefill_seconds, lead=record,
                 constrained_citations=grounding.completed(CITATION_OPENER) if grounding else 0,
                 constrained_names=grounding.completed(CODE_OPENER) if grounding else 0,
                 steered_quotes=grounding.quotes.steered if grounding and grounding.quotes else 0,
                 cut_at=settings.max_new_tokens if len(new) >= settings.max_new_tokens and not ended else None)


def eos_ids(tok: Any) -> set[int]:
    """The tokenizer's end-of-text ids (one, several or none)."""
    return _ids(tok.eos_token_id)


def _ids(token: int | list[int] | None) -> set[int]:
    """A tokenizer's end-of-text id (one, several or none) as a set."""
    return set() if token is None else {token} if isinstance(token, int) else set(token)
