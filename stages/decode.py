"""Stage `decode` (docs/behaviour.md §5): generate the reply with the (possibly adapter-mixed) model.

`Decode` is the first attempt; `RetryDecode` is the stage-2 retry: greedy and at least `max_new_tokens_floor` new
tokens. How a reply is decoded (sampling, the grounding constraints, the lead choice, where the reply ends) is
`DecodeSettings` in stages/common/generation/settings.py, and the loop is stages/common/generation/generate.py.

With `engine=llamacpp` llama.cpp computes the logits from the model's GGUF and the rest of the loop is the same
(stages/common/generation/llamacpp_generate.py); it refuses an adapter in the model in one line. `engine=auto`
(the default) takes llama.cpp when it can and transformers otherwise, with the reason in the draft's notes.

On a CUDA out-of-memory error the adapter is unmixed, the model moves to the CPU in float32, the adapter is
mixed again through its handle, and the decode runs once more (recorded in the draft's notes).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Annotated

from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.adapters.lock import exclusive
from stages.common.adapters.mixing import AdapterMix
from stages.common.generation.generate import generate
from stages.common.generation.llamacpp_generate import generate_llamacpp, pick_engine
from stages.common.generation.settings import DecodeSettings
from stages.common.types import Draft, LanguageModel, Prompt

log = logging.getLogger(__name__)


class Decode(Stage):
    """The first attempt: the reply decoded with the settings, relaxed by the prompt's hints."""

    outputs = {"draft": Draft}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(DecodeSettings):
        # in a sweep (-m), a job with the same model, mix and prompt as the job before takes its prompt cache
        reuse_prefill: bool = True

    config: Config

    def for_prompt(self, prompt: Prompt) -> DecodeSettings:
        """The settings this prompt decodes with: its hints relax top_p and the repetition penalty, and
        min_new_tokens is never more than max_new_tokens."""
        c, hints = self.config, prompt.decode_hints
        return dataclasses.replace(
            c, top_p=min(0.99, c.top_p + hints.get("top_p", 0.0)),
            repetition_penalty=max(1.0, c.repetition_penalty + hints.get("repetition_penalty", 0.0)) if hints
            else c.repetition_penalty,
            min_new_tokens=min(c.min_new_tokens, c.max_new_tokens))

    def run(self, lm: LanguageModel, prompt: Prompt, adapter_mix: AdapterMix | None = None,
            context: RunContext | None = None) -> dict:
        settings = self.for_prompt(prompt)
        mixed = adapter_mix is not None and adapter_mix.deltas > 0
        engine, why = pick_engine(lm, settings, mixed)
        if engine == "llamacpp":
            draft = generate_llamacpp(lm, prompt, settings, mixed)
            return {"draft": self._finished(draft, "cpu", prompt, [])}  # llama.cpp runs on the CPU here
        notes: list[str] = [f"decode.engine=auto decoded with transformers: {why}"] if why else []
        reuse = self.config.reuse_prefill and context is not None and context.sweep
        try:
            draft = generate(lm, prompt, settings, weights_key(lm, adapter_mix) if reuse else None)
        except _oom_errors() as err:
            notes.append(f"CUDA out of memory ({str(err).splitlines()[0]}); retried on cpu in float32")
            log.warning(notes[-1])
            move_to_cpu(lm, adapter_mix)
            draft = generate(lm, prompt, settings, weights_key(lm, adapter_mix) if reuse else None)
        return {"draft": self._finished(draft, lm.device, prompt, notes)}

    @staticmethod
    def _finished(draft: Draft, device: str, prompt: Prompt, notes: list[str]) -> Draft:
        prefill = prompt.prefill.strip()
        return dataclasses.replace(draft, device=device, attempt=prompt.attempt, notes=notes + draft.notes,
                                   prefill_chars=len(prefill) if draft.text.startswith(prefill) else 0)


class RetryDecode(Decode):
    """The stage-2 decode: greedy, with room for a citation per paragraph (max_new_tokens >= the floor)."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(Decode.Config):
        max_new_tokens_floor: Annotated[int, Range(ge=1)] = 256

    config: Config

    def for_prompt(self, prompt: Prompt) -> DecodeSettings:
        settings = super().for_prompt(prompt)
        return dataclasses.replace(settings, do_sample=False,
                                   max_new_tokens=max(self.config.max_new_tokens_floor, settings.max_new_tokens))

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
    with exclusive(lm):  # no other answer may take the model between unmix and re-mix
        if handle is not None:
            handle.restore()
        lm.model.to("cpu", dtype=torch.float32)
        lm.device = "cpu"
        if handle is not None and settings is not None:
            handle.apply(settings)
