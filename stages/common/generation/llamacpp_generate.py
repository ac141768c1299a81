"""The generate loop of `decode.engine=llamacpp`: llama.cpp computes the logits (stages/common/generation/llamacpp.py),
everything else is the transformers path's own: the lead chosen by likelihood (each choice scored after the prompt and
after the neutral prompt), our logits processors (checks, penalty, grounding constraints, warpers), the reply stops,
the console streamer and the draft's post-processing. What it cannot carry is refused in one line: an adapter mixed
into the model (llama.cpp reads the GGUF's base weights) and context-aware decoding (a second, evidence-free forward);
`decode.engine=auto` decodes such answers with transformers instead (``pick_engine``).
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from pipeline.engine.errors import ConfigError, InputError
from stages.common.generation.generate import DecodeInterrupted, eos_ids, finish, make_reply_stop
from stages.common.generation.lead import lead_names, neutral_prompt, pick_lead
from stages.common.generation.llamacpp import LlamaCppEngine, llama_cpp_installed, shared_engine
from stages.common.generation.processors import processors
from stages.common.generation.settings import DecodeSettings
from stages.common.generation.streaming import console_streamer
from stages.common.models.requantize import engine_file
from stages.common.tokens import encode_text
from stages.common.types import Draft, LanguageModel, Prompt


def pick_engine(lm: LanguageModel, settings: DecodeSettings, mixed: bool) -> tuple[str, str | None]:
    """The engine that decodes this answer and, when `decode.engine=auto` falls back to transformers, why."""
    if settings.engine != "auto":
        return settings.engine, None
    why = ("an adapter is mixed into the model" if mixed else "decode.cad_alpha is set" if settings.cad_alpha
           else f"model '{lm.model_id}' is not a GGUF" if lm.gguf is None
           else f"the model is on {lm.device}" if lm.device != "cpu"
           else None if llama_cpp_installed() else "llama-cpp-python is not installed: ./setup.sh builds it")
    return ("transformers", why) if why else ("llamacpp", None)


def generate_llamacpp(lm: LanguageModel, prompt: Prompt, settings: DecodeSettings, mixed: bool = False) -> Draft:
    """The reply to ``prompt`` decoded by llama.cpp from the model's GGUF; ``mixed``: an adapter is in the model."""
    if mixed:
        raise ConfigError("decode.engine=llamacpp decodes the GGUF's base weights and cannot carry the program's "
                          "adapter: add synth=none, or decode with decode.engine=transformers")
    if settings.cad_alpha:
        raise ConfigError("decode.engine=llamacpp cannot do context-aware decoding (decode.cad_alpha): set it to 0 "
                          "or decode with decode.engine=transformers")
    if lm.gguf is None:
        raise ConfigError(f"decode.engine=llamacpp needs a GGUF model; model '{lm.model_id}' was not loaded from one "
                          "(model=qwen_coder_0_5b|qwen_coder_1_5b|smollm2, or model=hf model.id=<file.gguf>)")
    tok = lm.tokenizer
    ids = (prompt.ids or encode_text(tok, prompt.text)) + encode_text(tok, prompt.prefill)
    use_lead = "lead" in settings.constrain and bool(prompt.lead)
    names = lead_names(prompt, tok) if use_lead and settings.lead == "likelihood" else []
    leads = [len(encode_text(tok, choice)) for choice in prompt.lead] if use_lead else []
    # the positions the longest of: the neutral prompt and a name, the prompt and a name, the prompt, lead and reply
    needed = max(len(neutral_prompt(prompt, ids, settings)) + max(map(len, names), default=0),
                 len(ids) + max(max(map(len, names), default=0), max(leads, default=0) + settings.max_new_tokens)) + 1
    if settings.engine_weights != "gguf" and not settings.engine_cache:
        raise ConfigError(f"decode.engine_weights={settings.engine_weights} needs decode.engine_cache (a folder)")
    path = engine_file(lm.gguf, settings.engine_weights, Path(settings.engine_cache or "."))
    engine = shared_engine(path, needed)
    if len(tok) > engine.vocab:
        raise InputError(f"the tokenizer of '{lm.model_id}' has {len(tok)} tokens, the GGUF '{lm.gguf.name}' "
                         f"{engine.vocab}: not the same vocabulary")
    with engine.lock:  # one KV cache: another thread's answer waits for this decode
        return _decode(engine, lm, prompt, settings, ids, names, use_lead and settings.lead == "greedy")


def _decode(engine: LlamaCppEngine, lm: LanguageModel, prompt: Prompt, settings: DecodeSettings, ids: list[int],
            names: list[list[int]], greedy_lead: bool) -> Draft:
    import torch

    tok = lm.tokenizer
    started, ran = time.perf_counter(), engine.ran
    lead, record = "", dict[str, Any]()
    if names:
        neutral = neutral_prompt(prompt, ids, settings)
        calibration = [0.0] * len(names)
        if neutral:  # first: the prompt then runs only its part after the question, and its lead goes on from it
            engine.advance(neutral)
            calibration = [sum(s) for s in engine.score(names)]
        engine.advance(ids)
        scores = [sum(s) - c for s, c in zip(engine.score(names), calibration)]
        lead, record = pick_lead(prompt, scores, settings)
        record["prefill_reused"] = False
        ids = ids + encode_text(tok, lead)
    logits = engine.advance(ids)
    prefill_seconds, prefill_ran = time.perf_counter() - started, engine.ran - ran
    chain, _, grounding = processors(lm, prompt, ids, settings, greedy_lead, prompt.prefill + lead)
    stop = make_reply_stop(tok, ids, settings, prompt.prefill + lead)
    streamer = console_streamer(tok, prompt.attempt, prompt.prefill + lead)
    ends = eos_ids(tok)
    sequence = torch.tensor([ids])
    if streamer is not None:
        streamer.put(sequence)  # the prompt: a streamer with skip_prompt drops it, as generate's first put
    generator = torch.Generator().manual_seed(settings.seed) if settings.do_sample else None
    new: list[int] = []
    try:
        while len(new) < settings.max_new_tokens:
            scores = torch.from_numpy(logits)[None]
            if len(new) < settings.min_new_tokens and ends:  # as generate's min_new_tokens: no end before then
                scores[0, sorted(t for t in ends if t < scores.shape[1])] = -float("inf")
            scores = chain(sequence, scores)
            token = _pick(scores, generator)
            new.append(token)
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in ends or (stop is not None and bool(stop(sequence, scores)[0])):
                break
            logits = engine.advance(ids + new)
    except KeyboardInterrupt as err:
        traceback.clear_frames(err.__traceback__)
        raise DecodeInterrupted(Draft(
            (prompt.prefill + lead + tok.decode(new, skip_special_tokens=True)).strip(), len(ids), len(new),
            time.perf_counter() - started, "cpu", attempt=prompt.attempt, prefill_seconds=prefill_seconds,
            lead=record, notes=[f"interrupted (Ctrl-C) after {len(new)} new tokens: the draft is partial and unchecked"],
        )) from err
    finally:
        if streamer is not None:
            streamer.end()
    if grounding is not None:
        grounding.update(sequence)
    draft = finish(lm, prompt, settings, len(ids), new, prompt.prefill + lead, time.perf_counter() - started,
                   prefill_seconds, record, grounding, stop)
    draft.notes.append(f"decoded by llama.cpp from {engine.path.name}: {prefill_ran} tokens run before the first "
                       f"new one ({len(ids)} in the prompt and lead; the lead choice's scoring and calibration "
                       "included, the cache's shared prefix not)")
    return draft


def _pick(scores: Any, generator: Any) -> int:
    """The next token: the best (greedy) or one drawn from the processed scores (the warpers already applied)."""
    import torch

    if generator is None:
        return int(scores[0].argmax())
    return int(torch.multinomial(torch.softmax(scores[0].float(), dim=-1), 1, generator=generator))
