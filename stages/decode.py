"""Stage `decode` (SPEC §5): generate the reply with the (possibly adapter-mixed) model.

`Decode` is the first attempt; `RetryDecode` is the stage-2 retry: greedy and at least 256 new tokens.

Grounded decoding (options, each measured; README): `constrain` applies, inside `generate`
(stages/common/grounding/constraints.py), the prompt's lead choices (`lead`), its citation strings (`citations`: a citation the
model opens names a packed span) and its names (`code`: inline code the model opens names an identifier of the
evidence or the question) and its prose (`prose`: a word written like code, snake_case or camelCase, must be a
name of the evidence or the question) and its code (`quotes`: a line that starts as Python code must
stay a prefix of a packed line, stages/common/grounding/quoteguard.py) and its labels (`labels`: a citation right after
`` `name` ``, a definition of the program, may only name a span where that definition starts; none packed: no
citation there);
`penalize_prompt=false` keeps the repetition penalty off the prompt's tokens (with it on, every identifier of the
evidence is penalised, which pushes a small model toward invented names); `copy_bias` adds a bonus to the logits of
tokens that occur in the evidence; `cad_alpha` > 0 is context-aware decoding (the logits contrasted with those of
the same prompt without the evidence, one more forward pass per token). Logits are checked for NaN/inf at every
step (a one-line error, weights restored by `unmix`).

`max_paragraphs` ends the reply after that many paragraphs (the lead's included); `stop_at_repeated_line` ends it
when it writes a line a third time, and drops every repeated line: a small model's loops; `max_citation_run`
lets at most that many citations follow one another with only whitespace between (another loop: `[a.py:1-9]`
twelve times).

On a CUDA out-of-memory error the adapter is unmixed, the model moves to the CPU in float32, the adapter is
mixed again through its handle, and the decode runs once more (recorded in the draft's notes).
"""
from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pipeline.engine import resources
from pipeline.engine.errors import PipelineError
from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.adapters.mixing import AdapterMix, exclusive
from stages.common.generation.streaming import console_streamer
from stages.common.grounding.constraints import CITATION_OPENER, CODE_OPENER, GroundingProcessor, TokenTrie, token_texts
from stages.common.grounding.leads import LeadChoice
from stages.common.grounding.quoteguard import QuoteGuard
from stages.common.types import Draft, LanguageModel, Prompt

log = logging.getLogger(__name__)


class NonFiniteLogits(PipelineError):
    """The model produced NaN or infinite logits (a broken adapter or weights)."""


class Decode(Stage):
    outputs = {"draft": Draft}

    def __init__(self, do_sample: bool = False, temperature: Annotated[float, Range(gt=0)] = 0.7,
                 top_p: Annotated[float, Range(gt=0, le=1)] = 0.9, top_k: Annotated[int, Range(ge=0)] = 50,
                 repetition_penalty: Annotated[float, Range(gt=0)] = 1.1, penalize_prompt: bool = False,
                 min_new_tokens: Annotated[int, Range(ge=0)] = 64, max_new_tokens: Annotated[int, Range(ge=1)] = 256,
                 constrain: list[Literal["lead", "citations", "code", "prose", "quotes", "labels"]] = [
                     "lead", "citations", "code", "prose", "quotes", "labels"],
                 lead: Literal["likelihood", "greedy"] = "likelihood",
                 lead_prior: Annotated[float, Range(ge=0)] = 1.0, lead_calibrate: bool = True,
                 copy_bias: Annotated[float, Range(ge=0)] = 0.0, cad_alpha: Annotated[float, Range(ge=0)] = 0.0,
                 max_paragraphs: Annotated[int, Range(ge=1)] | None = 2, stop_at_repeated_line: bool = True,
                 max_citation_run: Annotated[int, Range(ge=1)] | None = 3,
                 seed: int = 0, prompt_lookup_num_tokens: Annotated[int, Range(ge=0)] = 0,
                 reuse_prefill: bool = True, prefill_chunk: Annotated[int, Range(ge=1)] | None = None):
        self.do_sample, self.temperature, self.top_p, self.top_k = do_sample, temperature, top_p, top_k
        self.repetition_penalty, self.penalize_prompt, self.seed = repetition_penalty, penalize_prompt, seed
        self.min_new_tokens, self.max_new_tokens = min(min_new_tokens, max_new_tokens), max_new_tokens
        self.constrain, self.copy_bias = list(constrain), copy_bias
        self.lead, self.lead_prior, self.lead_calibrate, self.cad_alpha = lead, lead_prior, lead_calibrate, cad_alpha
        self.max_paragraphs, self.stop_at_repeated_line = max_paragraphs, stop_at_repeated_line
        self.max_citation_run = max_citation_run
        self.prompt_lookup_num_tokens = prompt_lookup_num_tokens
        self.reuse_prefill, self.prefill_chunk = reuse_prefill, prefill_chunk

    def settings(self, prompt: Prompt) -> dict:
        hints = prompt.decode_hints
        return {
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": min(0.99, self.top_p + hints.get("top_p", 0.0)),
            "top_k": self.top_k,
            "repetition_penalty": max(1.0, self.repetition_penalty + hints.get("repetition_penalty", 0.0))
            if hints else self.repetition_penalty,
            "penalize_prompt": self.penalize_prompt,
            "min_new_tokens": self.min_new_tokens,
            "max_new_tokens": self.max_new_tokens,
            "constrain": self.constrain,
            "lead": self.lead,
            "lead_prior": self.lead_prior,
            "lead_calibrate": self.lead_calibrate,
            "copy_bias": self.copy_bias,
            "cad_alpha": self.cad_alpha,
            "max_paragraphs": self.max_paragraphs,
            "stop_at_repeated_line": self.stop_at_repeated_line,
            "max_citation_run": self.max_citation_run,
            "prompt_lookup_num_tokens": self.prompt_lookup_num_tokens,
            "prefill_chunk": self.prefill_chunk,
        }

    def run(self, lm: LanguageModel, prompt: Prompt, adapter_mix: AdapterMix | None = None,
            context: RunContext | None = None) -> dict:
        settings = self.settings(prompt)
        notes: list[str] = []
        reuse = self.reuse_prefill and context is not None and context.sweep
        try:
            result = generate(lm, prompt, settings, self.seed, weights_key(lm, adapter_mix) if reuse else None)
        except _oom_errors() as err:
            notes.append(f"CUDA out of memory ({str(err).splitlines()[0]}); retried on cpu in float32")
            log.warning(notes[-1])
            move_to_cpu(lm, adapter_mix)
            result = generate(lm, prompt, settings, self.seed, weights_key(lm, adapter_mix) if reuse else None)
        text = result.pop("text")
        notes.extend(result.pop("notes", []))
        prefill_chars = len(prompt.prefill.strip()) if text.startswith(prompt.prefill.strip()) else 0
        return {"draft": Draft(text, device=lm.device, attempt=prompt.attempt, notes=notes,
                               prefill_chars=prefill_chars, **result)}


class RetryDecode(Decode):
    """The stage-2 decode: greedy, with room for a citation per paragraph (max_new_tokens >= the floor)."""

    def __init__(self, max_new_tokens_floor: Annotated[int, Range(ge=1)] = 256, **decode_config):
        super().__init__(**decode_config)
        self.floor = max_new_tokens_floor

    def settings(self, prompt: Prompt) -> dict:
        settings = super().settings(prompt)
        settings["do_sample"] = False
        settings["max_new_tokens"] = max(self.floor, settings["max_new_tokens"])
        return settings

    def run(self, lm: LanguageModel, prompt: Prompt, adapter_mix: AdapterMix | None = None,
            context: RunContext | None = None) -> dict:
        draft = super().run(lm, prompt, adapter_mix, context)["draft"]
        # nothing of the first attempt's prefill can be reused: other weights, another prompt
        draft.notes.append("retry: prompt encoded again (the boosted remix changed the weights, the stronger "
                           "scaffold the prompt)")
        return {"draft": draft}


def weights_key(lm: LanguageModel, mix: AdapterMix | None) -> tuple:
    """What the model computes with: which model, in which dtype on which device, and what is mixed into it."""
    parameter = next(lm.model.parameters())
    mixed = mix.weights_key if mix is not None and mix.handle.active else None
    return (id(lm.model), lm.model_id, str(parameter.dtype), str(parameter.device), mixed or "unmixed")


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def move_to_cpu(lm: LanguageModel, handle: AdapterMix | None) -> None:
    """Unmix, move the model to the CPU in float32, mix the same adapter again: the restore promise holds
    (after the final unmix every weight is the original value, all in one dtype on one device)."""
    import torch

    settings = handle.settings if handle is not None and handle.handle.active else None
    with exclusive(lm.model):  # no other answer may take the model between unmix and re-mix
        if handle is not None:
            handle.restore()
        lm.model.to("cpu", dtype=torch.float32)
        lm.device = "cpu"
        if handle is not None and settings is not None:
            handle.apply(settings)


class _FiniteCheck:
    """First in the processor list: raw logits with NaN or inf stop the decode with a clear error."""

    def __call__(self, input_ids, scores):
        import torch

        # -inf is a mask (min_new_tokens hides end-of-sequence); NaN, +inf or no finite value at all is broken.
        # One reduction per row finds all three (max propagates NaN; +inf is the max; all -inf leaves -inf)
        top = scores.amax(dim=-1)
        if bool(torch.isnan(top).any() or torch.isinf(top).any()):
            raise NonFiniteLogits("the model produced non-finite logits (NaN or inf): a broken adapter or weights")
        return scores


class _CopyBias:
    """Adds ``bias`` to the logits of every token that occurs in the prompt (the evidence the answer may copy)."""

    def __init__(self, prompt_ids: list[int], vocab: int, bias: float):
        import torch

        self.bonus = torch.zeros(vocab)
        self.bonus[sorted({i for i in prompt_ids if 0 <= i < vocab})] = bias

    def __call__(self, input_ids, scores):
        return scores + self.bonus[: scores.shape[-1]].to(scores.device, scores.dtype)


class _ReplyStop:
    """A transformers `StoppingCriteria` over the reply's text: stop once it has ended ``paragraphs`` paragraphs
    (written that many blank lines after some text; the answer form is a lead and a short explanation), and, with
    ``repeated_lines``, once it completes a line for the `LOOP_REPEATS`-th time (a small model's loop: the rest
    would repeat too; one repeat is often the lead restated before the model goes on).
    ``before`` is the reply text the prompt already holds (the scaffold's prefill and the chosen lead)."""

    def __init__(self, texts: list[str], prompt_length: int, paragraphs: int | None, repeated_lines: bool,
                 before: str = ""):
        self.texts, self.prompt_length = texts, prompt_length
        self.paragraphs, self.repeated_lines = paragraphs, repeated_lines
        self.written, self.consumed, self.ended = "", 0, 0
        self.line = ""
        self.lines: dict[str, int] = {}  # line key -> times written
        for key in filter(None, map(_line_key, before.split("\n"))):
            self.lines[key] = self.lines.get(key, 0) + 1
        self.repeated = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[0, self.prompt_length:].tolist()
        for token in new[self.consumed:]:
            piece = self.texts[token] if 0 <= token < len(self.texts) else ""
            self.written += piece
            while "\n\n" in self.written:
                before, _, self.written = self.written.partition("\n\n")
                self.ended += bool(before.strip())
            self.line += piece
            while "\n" in self.line:
                done, _, self.line = self.line.partition("\n")
                key = _line_key(done)
                if key:
                    self.lines[key] = self.lines.get(key, 0) + 1
                    self.repeated |= self.repeated_lines and self.lines[key] >= LOOP_REPEATS
        self.consumed = len(new)
        stop = self.repeated or (self.paragraphs is not None and self.ended >= self.paragraphs)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


LOOP_REPEATS = 3  # a line written this often is a loop: once more than a lead the model restates, then goes on


def _line_key(line: str) -> str:
    """A line as the loop check compares it; short lines (a fence, a brace, "Example:") may repeat freely."""
    key = " ".join(line.split())
    return key if len(key) >= 12 else ""


def drop_repeated_lines(text: str) -> str:
    """``text`` without the lines that repeat an earlier one (each line's first writing stays)."""
    seen, kept = set(), []
    for line in text.split("\n"):
        key = _line_key(line)
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(line)
    return "\n".join(kept)


class _Clock:
    """Notes when the first decoding step starts: the prompt's forward pass (prefill) is done by then."""

    def __init__(self):
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def processors(lm: LanguageModel, prompt: Prompt, ids: list[int], settings: dict, lead_in_generate: bool,
               before: str = ""):
    """The logits processors, in the order that keeps sampling safe: checks and biases, then the grounding mask,
    then temperature / top-k / top-p (which only ever see allowed tokens)."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    clock = _Clock()
    chain = LogitsProcessorList([clock, _FiniteCheck()])
    if settings["cad_alpha"] and prompt.plain_ids:
        # context-aware decoding = classifier-free guidance with the prompt without evidence as the negative prompt:
        # log p(x | evidence) + α (log p(x | evidence) - log p(x | no evidence)); one more forward per token
        import torch
        from transformers import UnbatchedClassifierFreeGuidanceLogitsProcessor

        device = next(lm.model.parameters()).device
        plain = torch.tensor([prompt.plain_ids + ids[len(prompt.ids):]], device=device)
        chain.append(UnbatchedClassifierFreeGuidanceLogitsProcessor(1.0 + settings["cad_alpha"], lm.model, plain))
    if settings["repetition_penalty"] != 1.0:
        ignore = None if settings["penalize_prompt"] else len(ids)
        chain.append(RepetitionPenaltyLogitsProcessor(float(settings["repetition_penalty"]), prompt_ignore_length=ignore))
    if settings["copy_bias"]:
        chain.append(_CopyBias(prompt.ids, lm.model.config.vocab_size, settings["copy_bias"]))
    grounding = None
    constrain = set(settings["constrain"])
    tok = lm.tokenizer
    slots = {}
    if "citations" in constrain and prompt.citations:
        slots[CITATION_OPENER] = TokenTrie.of_strings(tok, [f"{span}]" for span in prompt.citations])
    if "code" in constrain and prompt.names:
        slots[CODE_OPENER] = TokenTrie.of_strings(tok, [f"{name}{call}`" for name in prompt.names for call in ("", "()")])
    lead = TokenTrie.of_strings(tok, prompt.lead) if lead_in_generate else None
    known = prompt.names if "prose" in constrain else None
    quotes = (QuoteGuard(token_texts(tok), prompt.quotes, max(64, settings["top_k"]), greedy=not settings["do_sample"])
              if "quotes" in constrain else None)
    labels = prompt.labels if "labels" in constrain and CITATION_OPENER in slots else None
    if slots or lead or known is not None or quotes:
        grounding = GroundingProcessor(tok, len(ids), slots, lead, known, quotes, before, labels,
                                       settings.get("max_citation_run"))
        chain.append(grounding)
    if settings["do_sample"]:
        chain.append(TemperatureLogitsWarper(settings["temperature"]))
        if settings["top_k"]:
            chain.append(TopKLogitsWarper(settings["top_k"]))
        chain.append(TopPLogitsWarper(settings["top_p"]))
    return chain, clock, grounding


def choose_lead(lm: LanguageModel, prompt: Prompt, ids: list[int], settings: dict,
                reuse: tuple | None = None) -> tuple[str, list[int], object, dict]:
    """The lead the model finds likeliest: each choice's name scored after the prompt in one batched pass over the
    prompt's KV cache, minus its score after the same prompt asking nothing in particular (`lead_calibrate`: what
    the choice owes to the question, not to how common the name is), minus `lead_prior` per packed-window position
    of its window, plus the choice's `lead_bonus` (the `leadsim` node: its name's similarity to the question).
    Returns the choice, its token ids, the prompt's cache (decoding goes on from it) and a record.

    With ``reuse`` (what the model computes with: `weights_key`), the prompt's cache and the choices' scores are
    kept for the next job of a sweep that asks the same model, mixed the same way, with the same prompt (jobs that
    differ only in how they decode): it gets a copy of the cache and pays no prefill."""
    import copy

    tok = lm.tokenizer
    names = [LeadChoice.parse(choice).label for choice in prompt.lead]  # "`qualname`"
    name_ids = tok(names, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    neutral_ids = prompt.neutral_ids + ids[len(prompt.ids):] if settings["lead_calibrate"] and prompt.neutral_ids else []
    computed = []

    def encode_and_score():
        computed.append(True)
        return _encode_and_score(lm.model, ids, neutral_ids, name_ids, settings["prefill_chunk"])

    if reuse is None:
        cache, scores = encode_and_score()
    else:
        key = (reuse, tuple(ids), tuple(map(tuple, name_ids)), tuple(neutral_ids), settings["prefill_chunk"])
        # two entries: a job whose retry runs (other weights, another prompt) must not evict its first attempt's
        kept, scores = resources.shared("prompt-prefill", key, encode_and_score, keep=2)
        cache = copy.deepcopy(kept)  # decoding extends the cache it is given
    ranks = prompt.lead_rank or [0] * len(prompt.lead)
    bonus = prompt.lead_bonus or [0.0] * len(prompt.lead)
    total = [score - settings["lead_prior"] * rank + extra for score, rank, extra in zip(scores, ranks, bonus)]
    best = max(range(len(total)), key=lambda i: (total[i], -i))
    chosen = prompt.lead[best]
    record = {"lead": chosen, "lead_score": round(total[best], 4), "lead_choices": len(prompt.lead),
              "lead_window": ranks[best], "prefill_reused": not computed}
    return chosen, tok(chosen, add_special_tokens=False, split_special_tokens=True)["input_ids"], cache, record


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

    # the two prompts share everything before the question (scaffold.question_first=false): encode that once, and
    # keep one cache: the neutral prompt extends it and is scored, the cache is cropped back to the shared part, and
    # the prompt itself extends it (the same values as two caches; one prompt's cache less at the peak)
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


def generate(lm: LanguageModel, prompt: Prompt, settings: dict, seed: int, reuse: tuple | None = None) -> dict:
    import torch
    from transformers import GenerationConfig

    from stages.common.generation.continuations import cache_kwarg, encode_prefix
    from stages.common.generation.heap import release_free_heap
    from stages.common.generation.kvcache import reserved_cache

    tok = lm.tokenizer
    prefill_ids = tok(prompt.prefill, add_special_tokens=False, split_special_tokens=True)["input_ids"] if prompt.prefill else []
    ids = (prompt.ids or tok(prompt.text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) + prefill_ids
    device = next(lm.model.parameters()).device
    use_lead = "lead" in settings["constrain"] and bool(prompt.lead)
    started = time.perf_counter()
    lead, cache = "", None
    record: dict[str, Any] = {}
    release_free_heap()  # what the stages before freed, before the prompt's activations come on top (its peak)
    if use_lead and settings["lead"] == "likelihood":
        lead, lead_ids, cache, record = choose_lead(lm, prompt, ids, settings, reuse)
        ids = ids + lead_ids
        release_free_heap()  # the prefill's activations, before decoding
    elif settings["prefill_chunk"] and len(ids) > settings["prefill_chunk"] + 1:
        # generate would encode the whole prompt in one forward: encode all but its last token in chunks here
        cache = encode_prefix(lm.model, ids[:-1], chunk=settings["prefill_chunk"]).cache
        release_free_heap()
    input_ids = torch.tensor([ids], device=device)
    chain, clock, grounding = processors(lm, prompt, ids, settings, use_lead and settings["lead"] == "greedy",
                                         prompt.prefill + lead)
    # every warper is ours (ordered after the grounding mask): generate adds none of its own
    config = GenerationConfig(
        max_new_tokens=settings["max_new_tokens"], min_new_tokens=settings["min_new_tokens"],
        do_sample=settings["do_sample"], repetition_penalty=1.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if settings["do_sample"] else {}),
    )
    # prompt-lookup decoding (issue 13): drafts copied from the prompt, verified in one forward; the grounding
    # processor and context-aware decoding's second model pass keep state from step to step and cannot see drafts
    # rejected, so lookup is off while either is on
    lookup, notes = settings.get("prompt_lookup_num_tokens", 0), []
    if lookup and grounding is not None:
        notes.append("prompt lookup off: grounding constraints are active (decode.constrain=[] allows it)")
        lookup = 0
    if lookup and settings["cad_alpha"] and prompt.plain_ids:
        notes.append("prompt lookup off: context-aware decoding is on (decode.cad_alpha=0 allows it)")
        lookup = 0
    if lookup:
        config.prompt_lookup_num_tokens = lookup
    if settings["do_sample"]:
        torch.manual_seed(seed)
    stops, reply_stop = [], None
    if settings["max_paragraphs"] or settings["stop_at_repeated_line"]:
        from transformers import StoppingCriteriaList

        reply_stop = _ReplyStop(token_texts(tok), len(ids), settings["max_paragraphs"],
                                settings["stop_at_repeated_line"], prompt.prefill + lead)
        stops = StoppingCriteriaList([reply_stop])
    with torch.no_grad():
        output = lm.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   generation_config=config, logits_processor=chain, stopping_criteria=stops,
                                   streamer=console_streamer(tok, prompt.attempt, prompt.prefill + lead),
                                   **{cache_kwarg(lm.model): cache if cache is not None else reserved_cache(lm.model)})
    seconds = time.perf_counter() - started
    if grounding is not None:
        grounding.update(output)
    new = output[0, input_ids.shape[1]:]
    text = prompt.prefill + lead + tok.decode(new, skip_special_tokens=True)
    if settings["stop_at_repeated_line"]:
        text = drop_repeated_lines(text)
    prefill_seconds = (clock.first - started) if clock.first else seconds
    return {"text": text.strip(), "prompt_tokens": int(input_ids.shape[1]), "generated_tokens": int(new.shape[0]),
            "seconds": seconds, "prefill_seconds": prefill_seconds, "lead": record,
            "constrained_citations": grounding.completed(CITATION_OPENER) if grounding else 0,
            "constrained_names": grounding.completed(CODE_OPENER) if grounding else 0,
            "steered_quotes": grounding.quotes.steered if grounding and grounding.quotes else 0, "notes": notes}
