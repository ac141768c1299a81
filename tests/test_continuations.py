"""Candidate continuations scored over one prompt's KV cache: exact against plain forward passes."""
from __future__ import annotations

import pytest
import torch

from stages.common.continuations import common_prefix, encode_prefix, score_continuations

PROMPT = list(range(10, 70))
CANDIDATES = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [1, 2, 4]]


def plain_scores(model, prompt, candidates):
    out = []
    for cand in candidates:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + cand])).logits[0].float(), dim=-1)
        out.append([float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cand)])
    return out


def test_packed_candidates_score_like_separate_forward_passes(tiny_lm):
    state = encode_prefix(tiny_lm.model, PROMPT)
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
