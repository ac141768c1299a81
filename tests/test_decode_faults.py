"""Decode under faults: a CUDA out-of-memory fallback that keeps the restore promise, and non-finite logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.engine.errors import PipelineError
from stages.common.adapters.factors import infer_targets
from stages.common.adapters.mixing import AdapterMix, MixSettings
from stages.common.adapters.synthesis import synthesize
from stages.common.types import LanguageModel, Prompt
from stages.decode import Decode


def bf16_lm(tiny_lm) -> LanguageModel:
    """A private bfloat16 copy of the tiny model (the fallback moves weights; the shared one must not change)."""
    import copy

    model = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    return LanguageModel(model, tiny_lm.tokenizer, "tiny-bf16", "cpu")


@pytest.mark.parametrize("mode", ["hooks", "merge"])
def test_out_of_memory_fallback_unmixes_moves_and_remixes(tiny_lm, monkeypatch, mode):
    import stages.decode

    lm = bf16_lm(tiny_lm)
    originals = {k: v.clone() for k, v in lm.model.state_dict().items()}
    tmap = infer_targets(lm.model)
    adapters = synthesize(np.random.default_rng(0).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 4, 0)
    mix = AdapterMix(lm, tmap, mode, adapters, None, 8.0)
    mix.apply(MixSettings(0.0, 8.0, 4, {}, [1.0] * tmap.num_layers, {}, None))
    real, calls = stages.decode.generate, {"n": 0}

    def out_of_memory_once(lm_, prompt, settings, reuse=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        # decoding resumes on a float32 model that carries the same adapter again
        assert {p.dtype for p in lm_.model.parameters()} == {torch.float32}
        assert mix.handle.active
        return real(lm_, prompt, settings, reuse)

    monkeypatch.setattr(stages.decode, "generate", out_of_memory_once)
    prompt = Prompt([], "hello", ids=lm.tokenizer("hello", add_special_tokens=False)["input_ids"])
    draft = Decode(max_new_tokens=4, min_new_tokens=0, constrain=[]).run(lm, prompt, mix)["draft"]
    assert calls["n"] == 2 and any("retried on cpu in float32" in note for note in draft.notes)
    mix.restore()
    state = lm.model.state_dict()
    assert {v.dtype for v in state.values()} == {torch.float32}  # one dtype, not a mix of bf16 and fp32
    for key, value in originals.items():
        assert torch.equal(state[key], value.float()), key  # bf16 -> fp32 is exact: the original values


def test_non_finite_logits_stop_decoding_with_a_clear_error(tiny_lm):
    lm = bf16_lm(tiny_lm)
    with torch.no_grad():
        lm.model.lm_head.weight[0, 0] = float("nan")
    prompt = Prompt([], "hello", ids=lm.tokenizer("hello", add_special_tokens=False)["input_ids"])
    with pytest.raises(PipelineError, match="non-finite logits"):
        Decode(max_new_tokens=2, min_new_tokens=0).run(lm, prompt)
