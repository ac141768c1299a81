"""The reserved-room KV cache: the same tokens and scores as transformers' own cache, writing in place."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from stages.common.generation.continuations import cache_kwarg
from stages.common.generation.kvcache import reserved_cache, reserved_layer_class

PROMPT = list(range(10, 50))


def _generate(lm, cache, **extra):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                min_new_tokens=12, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                **{cache_kwarg(lm.model): cache}, **extra)
    return out


@pytest.mark.parametrize("room", [1, 3, 256])  # regrown at almost every token / a few times / never
def test_generation_matches_transformers_cache(tiny_lm, room):
    mine, ref = _generate(tiny_lm, reserved_cache(tiny_lm.model, room)), _generate(tiny_lm, DynamicCache())
    assert mine.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(mine.scores, ref.scores):
        assert torch.allclose(a, b, atol=1e-5)


def test_tokens_are_written_into_the_reserved_buffer(tiny_lm):
    cache = reserved_cache(tiny_lm.model, room=64)
    _generate(tiny_lm, cache)
    layer = cache.layers[0]
    assert isinstance(layer, reserved_layer_class())
    assert cache.get_seq_length() == len(PROMPT) + 11  # the last token is not fed back
    assert layer.keys.data_ptr() == layer._keys.data_ptr()  # a view of the buffer, not a copy
    assert layer._keys.shape[-2] == len(PROMPT) + 64  # the prefill reserved room; decode wrote into it


def test_crop_and_copy_keep_values_apart(tiny_lm):
    model = tiny_lm.model
    cache = reserved_cache(model, room=4)
    with torch.no_grad():
        model(input_ids=torch.tensor([PROMPT]), use_cache=True, **{cache_kwarg(model): cache})
        keys = cache.layers[0].keys.clone()
        forked = copy.deepcopy(cache)
        model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True, **{cache_kwarg(model): forked})
        assert forked.get_seq_length() == len(PROMPT) + 3 and cache.get_seq_length() == len(PROMPT)
        forked.crop(-3)
        assert torch.equal(forked.layers[0].keys, keys) and torch.equal(cache.layers[0].keys, keys)
        with pytest.raises(ValueError):
            forked.layers[0].crop(2)


def test_beam_search_reorders_a_reserved_cache_like_transformers(tiny_lm):
    mine = _generate(tiny_lm, reserved_cache(tiny_lm.model, 2), num_beams=3)
    ref = _generate(tiny_lm, DynamicCache(), num_beams=3)
    assert mine.sequences.tolist() == ref.sequences.tolist()
