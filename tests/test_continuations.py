"""Candidate continuations scored over one prompt's KV cache: exact against plain forward passes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from stages.common.generation.continuations import common_prefix, encode_prefix, score_continuations

PROMPT = list(range(10, 70))
CANDIDATES = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [1, 2, 4]]


def plain_scores(model, prompt, candidates):
    out = []
    for cand in candidates:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + cand])).logits[0].float(), dim=-1)
        out.append([float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cand)])
    return out


@pytest.mark.parametrize("chunk", [None, 7, 60])  # one forward / 9 forwards, the last one short / exactly one
def test_packed_candidates_score_like_separate_forward_passes(tiny_lm, chunk):
    state = encode_prefix(tiny_lm.model, PROMPT, chunk=chunk)
    got = score_continuations(tiny_lm.model, state, CANDIDATES, chunk_tokens=6)  # several chunks
    for mine, ref in zip(got, plain_scores(tiny_lm.model, PROMPT, CANDIDATES)):
        assert mine == pytest.approx(ref, abs=1e-4)
    assert state.cache.get_seq_length() == len(PROMPT)  # the prompt's cache is left as it was


def test_a_shared_beginning_is_encoded_once_and_forked(tiny_lm):
    other = PROMPT[:45] + [3, 2, 1]
    base = encode_prefix(tiny_lm.model, PROMPT[:common_prefix(PROMPT, other)])
    first = encode_prefix(tiny_lm.model, PROMPT, base=base)  # on a copy of base's cache
    second = encode_prefix(tiny_lm.model, other, base=base, fork=False)
    for state, ids in ((first, PROMPT), (second, other)):
        for mine, ref in zip(score_continuations(tiny_lm.model, state, CANDIDATES),
                             plain_scores(tiny_lm.model, ids, CANDIDATES)):
            assert mine == pytest.approx(ref, abs=1e-4)
    with pytest.raises(ValueError):
        encode_prefix(tiny_lm.model, [1, 2, 3], base=base)


@pytest.fixture(scope="module")
def many_candidates():
    rng = np.random.default_rng(0)
    shared = [[5], [5, 7], [5, 7, 9], [5, 8], [6, 7, 8, 9, 10], [6, 7], [11], [5, 7]]  # shared beginnings, a duplicate
    return shared + [rng.integers(5, 250, int(rng.integers(1, 6))).tolist() for _ in range(25)]


@pytest.mark.parametrize("chunk_tokens", [1, 4, 2048])
def test_many_candidates_in_any_chunking_score_like_separate_passes(tiny_lm, many_candidates, chunk_tokens):
    prompt = list(range(20, 32))
    state = encode_prefix(tiny_lm.model, prompt)
    got = score_continuations(tiny_lm.model, state, many_candidates, chunk_tokens=chunk_tokens)
    for mine, ref in zip(got, plain_scores(tiny_lm.model, prompt, many_candidates)):
        assert mine == pytest.approx(ref, abs=1e-4)


def test_scores_through_a_forward_hook_and_eager_attention(tiny_lm, many_candidates):
    """What is mixed in (a hook here, as the mix stage adds) takes part; eager attention gets an additive mask
    (a boolean one would be added to its scores as 0/1 and hide nothing)."""
    model = copy.deepcopy(tiny_lm.model)
    prompt = list(range(40, 47))
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: o + 0.05)
    try:
        reference = plain_scores(model, prompt, many_candidates)
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            got = score_continuations(model, encode_prefix(model, prompt), many_candidates, chunk_tokens=7)
            for mine, ref in zip(got, reference):
                assert mine == pytest.approx(ref, abs=1e-4), implementation
    finally:
        handle.remove()


def test_an_empty_prompt_is_refused_and_an_empty_candidate_scores_nothing(tiny_lm):
    with pytest.raises(ValueError, match="prompt has no tokens"):
        encode_prefix(tiny_lm.model, [])
    assert score_continuations(tiny_lm.model, encode_prefix(tiny_lm.model, [3]), [[1], []])[1] == []
