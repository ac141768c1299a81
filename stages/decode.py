"""Stage `decode` (SPEC §5): generate the reply with the (possibly adapter-mixed) model.

`Decode` is the first attempt; `RetryDecode` is the stage-2 retry: greedy and at least 256 new tokens.
On a CUDA out-of-memory error the model moves to the CPU in float32 and the decode runs once more.
"""
from __future__ import annotations

import logging
import time
from typing import Annotated

from pipeline.stage import Range, Stage
from stages.common.streaming import console_streamer
from stages.common.types import Draft, LanguageModel, Prompt

log = logging.getLogger(__name__)


class Decode(Stage):
    outputs = {"draft": Draft}

    def __init__(self, do_sample: bool = False, temperature: Annotated[float, Range(gt=0)] = 0.7,
                 top_p: Annotated[float, Range(gt=0, le=1)] = 0.9,
                 repetition_penalty: Annotated[float, Range(gt=0)] = 1.1,
                 min_new_tokens: Annotated[int, Range(ge=0)] = 64, max_new_tokens: Annotated[int, Range(ge=1)] = 256,
                 seed: int = 0):
        self.do_sample, self.temperature, self.top_p = do_sample, temperature, top_p
        self.repetition_penalty, self.seed = repetition_penalty, seed
        self.min_new_tokens, self.max_new_tokens = min(min_new_tokens, max_new_tokens), max_new_tokens

    def settings(self, prompt: Prompt) -> dict:
        hints = prompt.decode_hints
        return {
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": min(0.99, self.top_p + hints.get("top_p", 0.0)),
            "repetition_penalty": max(1.0, self.repetition_penalty + hints.get("repetition_penalty", 0.0))
            if hints else self.repetition_penalty,
            "min_new_tokens": self.min_new_tokens,
            "max_new_tokens": self.max_new_tokens,
        }

    def run(self, lm: LanguageModel, prompt: Prompt) -> dict:
        settings = self.settings(prompt)
        notes: list[str] = []
        try:
            text, n_prompt, n_new, seconds = generate(lm, prompt, settings, self.seed)
        except _oom_errors() as err:
            notes.append(f"CUDA out of memory ({str(err).splitlines()[0]}); retried on cpu in float32")
            log.warning(notes[-1])
            import torch

            lm.model.to("cpu", dtype=torch.float32)
            lm.device = "cpu"
            text, n_prompt, n_new, seconds = generate(lm, prompt, settings, self.seed)
        prefill_chars = len(prompt.prefill.strip()) if text.startswith(prompt.prefill.strip()) else 0
        return {"draft": Draft(text, n_prompt, n_new, seconds, lm.device, prompt.attempt, notes, prefill_chars)}


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


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def generate(lm: LanguageModel, prompt: Prompt, settings: dict, seed: int) -> tuple[str, int, int, float]:
    import torch
    from transformers import GenerationConfig

    tok = lm.tokenizer
    encoded = tok(prompt.text + prompt.prefill, add_special_tokens=False, return_tensors="pt")
    device = next(lm.model.parameters()).device
    input_ids = encoded["input_ids"].to(device)
    attention = encoded["attention_mask"].to(device)
    config = GenerationConfig(
        max_new_tokens=settings["max_new_tokens"], min_new_tokens=settings["min_new_tokens"],
        do_sample=settings["do_sample"], repetition_penalty=settings["repetition_penalty"],
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        **({"temperature": settings["temperature"], "top_p": settings["top_p"]} if settings["do_sample"] else {}),
    )
    if settings["do_sample"]:
        torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.no_grad():
        output = lm.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                   streamer=console_streamer(tok, prompt.attempt, prompt.prefill))
    seconds = time.perf_counter() - started
    new = output[0, input_ids.shape[1]:]
    text = prompt.prefill + tok.decode(new, skip_special_tokens=True)
    return text.strip(), int(input_ids.shape[1]), int(new.shape[0]), seconds
