"""Log-likelihood of candidate continuations of one prompt, in one forward pass over the prompt's KV cache.

The prompt is encoded once (`encode_prefix`); the candidates are then packed into a single sequence after it,
each attending to the whole prompt and to its own earlier tokens only (a block-diagonal 4D mask, positions
restarting after the prompt for every candidate), so N candidates cost one forward of their total length. The
cache is cropped back to the prompt afterwards, so decoding can go on from it (the prompt is paid for once).
Each score equals the one a separate forward of prompt + candidate gives (tested, sdpa and eager attention), and
whatever is mixed into the model (hooks or merged weights) takes part: a mixed model scores through the real mix
path. Users: the lead choice of `decode` and the closed-book symbol test (`stages/closed_book.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class PrefixState:
    """A prompt run through the model: its KV cache and the log-probabilities of the next token."""

    ids: list[int]
    cache: Any  # transformers Cache holding exactly len(ids) positions
    next_logprobs: Any  # (vocab,) float32


def cache_kwarg(model) -> str:
    """The name transformers gives the KV-cache argument (`cache`; `past_key_values` before 5.x renamed it)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def encode_prefix(model, ids: list[int], base: PrefixState | None = None, fork: bool = True,
                  chunk: int | None = None) -> PrefixState:
    """Run ``ids`` through the model and keep the cache. With ``base`` (a state whose ids start ``ids``), only the
    rest is run, on a copy of its cache (``fork``) or on the cache itself (``base`` is then used up). With ``chunk``,
    at most that many tokens go through one forward: the activations of a 2,000-token prompt in one forward are
    the largest allocation of an answer (`decode.prefill_chunk`)."""
    import copy

    import torch

    from stages.common.generation.kvcache import reserved_cache

    if not len(ids):
        raise ValueError("encode_prefix: the prompt has no tokens")
    device = next(model.parameters()).device
    if base is None:
        start, cache = 0, reserved_cache(model)
    elif base.ids != list(ids[:len(base.ids)]) or len(base.ids) >= len(ids):
        raise ValueError("base must hold a proper prefix of ids")
    else:
        start, cache = len(base.ids), copy.deepcopy(base.cache) if fork else base.cache
    step = chunk or len(ids)
    with torch.no_grad():
        for at in range(start, len(ids), step):
            out = model(input_ids=torch.tensor([ids[at:at + step]], device=device), use_cache=True, logits_to_keep=1,
                        **{cache_kwarg(model): cache})
    return PrefixState(list(ids), cache, torch.log_softmax(out.logits[0, -1].float(), dim=-1))


def crop_to(cache: Any, length: int) -> None:
    """Drop the positions of ``cache`` after the first ``length`` (transformers' ``crop`` takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def score_continuations(model, prefix: PrefixState, candidates: list[list[int]], chunk_tokens: int = 2048) -> list[list[float]]:
    """Per candidate, the log-probability of each of its tokens after the prompt (the cache is left as it was).

    A candidate's first token is scored by the prompt's last position; only its other tokens' predecessors (all
    but its last token) go through the model. At most ``chunk_tokens`` of them go through one forward (a longer
    candidate goes alone), which bounds the chunk x vocabulary logits too. An empty candidate scores [].
    """
    import torch

    device = next(model.parameters()).device
    eager = getattr(model.config, "_attn_implementation", None) == "eager"
    length = len(prefix.ids)
    scores: list[list[float]] = [[float(prefix.next_logprobs[c[0]])] if c else [] for c in candidates]
    order = [i for i in range(len(candidates)) if len(candidates[i]) > 1]
    while order:
        batch: list[int] = []
        total = 0
        while order and (not batch or total + len(candidates[order[0]]) - 1 <= chunk_tokens):
            batch.append(order.pop(0))
            total += len(candidates[batch[-1]]) - 1
        tokens: list[int] = []
        positions: list[int] = []
        blocks = []
        for i in batch:
            fed = candidates[i][:-1]
            blocks.append((len(tokens), len(fed)))
            tokens.extend(fed)
            positions.extend(range(length, length + len(fed)))
        mask = torch.zeros(1, 1, total, length + total, dtype=torch.bool, device=device)
        mask[..., :length] = True
        for start, size in blocks:
            mask[0, 0, start:start + size, length + start:length + start + size] = torch.ones(size, size, dtype=torch.bool).tril()
        if eager:  # eager attention adds the mask to its scores: a bool mask would add 0/1, not hide anything
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([tokens], device=device), attention_mask=mask,
                        position_ids=torch.tensor([positions], device=device), use_cache=True,
                        **{cache_kwarg(model): prefix.cache})
        crop_to(prefix.cache, length)
        rows = [start + j for start, size in blocks for j in range(size)]
        wanted = [candidates[i][j + 1] for i, (_, size) in zip(batch, blocks) for j in range(size)]
        picked = _logprobs(out.logits[0], rows, wanted)
        del out
        for i, (start, size) in zip(batch, blocks):
            scores[i].extend(picked[start:start + size])
    return scores


def _logprobs(logits, rows: list[int], wanted: list[int], chunk: int = 32) -> list[float]:
    """log softmax(logits[row])[token] per (row, token), in float32, ``chunk`` rows at a time: a float32 copy of all
    rows (and logsumexp's scratch beside it) would be 4x the bfloat16 logits at the peak of an answer."""
    import torch

    picked: list[float] = []
    for at in range(0, len(rows), chunk):
        part = logits[rows[at:at + chunk]].float()
        index = torch.tensor(wanted[at:at + chunk], device=part.device)
        picked += (part.gather(1, index[:, None])[:, 0] - torch.logsumexp(part, dim=-1)).tolist()
    return picked
