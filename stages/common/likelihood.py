"""Exact log-likelihood of candidate continuations of one prompt, batched (closed-book ranking, answer options).

`score_continuations(lm, prompt_ids, candidates)` returns, for every candidate token sequence c,
log p(c | prompt) = Σ_j log p(c_j | prompt, c_<j). The prompt is encoded once; the candidates are packed as a
prefix tree (names share their first tokens: `get_`, `_`, ...), each distinct prefix one token, all of them in one
sequence after the prompt's KV cache with a tree attention mask (a token sees the prompt and its own prefix) and
positions = prompt length + depth. So one forward of the prompt and one of the distinct prefixes (in chunks of
whole subtrees of at most `max_tokens`) score every candidate, and each score equals the one a separate forward
of prompt + candidate gives (tested). Whatever is mixed into the model (hooks or merged weights) takes part, so a
mixed model scores through the real mix path.
"""
from __future__ import annotations

import copy
import inspect
from typing import Literal, Sequence

import numpy as np


def _cache_kwarg(model) -> str:
    """transformers 5.x renames `past_key_values` to `cache`; use whichever this version's forward takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prefix_tree(candidates: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    """Every distinct proper prefix (length >= 1) of the candidates, parents before children, grouped by subtree."""
    prefixes = sorted({tuple(c[:j]) for c in candidates for j in range(1, len(c))})  # lexicographic = depth-first
    return prefixes, {p: i for i, p in enumerate(prefixes)}


def _chunks(prefixes: list[tuple[int, ...]], max_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of the depth-first list that hold whole subtrees of the root (first token)."""
    out, start = [], 0
    for i in range(1, len(prefixes) + 1):
        if i == len(prefixes) or (len(prefixes[i]) == 1 and i - start >= max_tokens):
            out.append((start, i))
            start = i
    return out


def score_continuations(lm, prompt_ids: Sequence[int], candidates: Sequence[Sequence[int]], max_tokens: int = 256,
                        reduce: Literal["sum", "mean"] = "sum") -> np.ndarray:
    """Log-probability of each candidate after the prompt (``reduce="mean"``: per candidate token).

    ``lm`` is a `LanguageModel` or a transformers causal LM; ``prompt_ids`` must not be empty (its last token
    predicts every candidate's first one); every candidate needs at least one token. ``max_tokens`` bounds the
    tokens of one forward (a subtree larger than that still goes whole).
    """
    import torch

    model = lm.model if hasattr(lm, "tokenizer") else lm  # a LanguageModel, or the causal LM itself
    if not len(prompt_ids):
        raise ValueError("score_continuations: the prompt has no tokens")
    lengths = np.array([len(c) for c in candidates], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError(f"score_continuations: candidate {int(np.argmin(lengths))} has no tokens")
    scores = np.zeros(len(candidates), dtype=np.float64)
    if not len(candidates):
        return scores
    device = next(model.parameters()).device
    cache_kw = _cache_kwarg(model)
    eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    prompt_len = len(prompt_ids)
    prefixes, where = _prefix_tree(candidates)
    # logp[(node, token)]: log p(token | prompt, prefix of node); the prompt itself is node None
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True)
        cache = getattr(out, "cache", None)
        cache = cache if cache is not None else out.past_key_values
        first = torch.log_softmax(out.logits[0, -1].float(), -1).double().cpu().numpy()
        scores += first[[c[0] for c in candidates]]
        wanted: dict[int, list[tuple[int, int]]] = {}  # node -> [(candidate, next token)]
        for i, c in enumerate(candidates):
            for j in range(1, len(c)):
                wanted.setdefault(where[tuple(c[:j])], []).append((i, c[j]))
        for start, stop in _chunks(prefixes, max_tokens):
            chunk = prefixes[start:stop]
            n = len(chunk)
            ids = torch.tensor([[p[-1] for p in chunk]], device=device)
            positions = torch.tensor([[prompt_len + len(p) - 1 for p in chunk]], device=device)
            allowed = torch.zeros((n, prompt_len + n), dtype=torch.bool)
            allowed[:, :prompt_len] = True
            local = {p: k for k, p in enumerate(chunk)}
            for k, p in enumerate(chunk):
                for depth in range(1, len(p) + 1):  # itself and every ancestor (all in this chunk: whole subtrees)
                    allowed[k, prompt_len + local[p[:depth]]] = True
            mask = allowed[None, None].to(device)
            if eager:  # eager attention adds the mask to the scores
                mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
            shared = copy.deepcopy(cache)
            logits = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                           **{cache_kw: shared}).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            rows, cols, owners = [], [], []
            for k in range(n):
                for i, token in wanted.get(start + k, ()):
                    rows.append(k)
                    cols.append(token)
                    owners.append(i)
            picked = logp[torch.tensor(rows), torch.tensor(cols)].double().cpu().numpy()
            np.add.at(scores, owners, picked)
    return scores / lengths if reduce == "mean" else scores


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every score among all of them (1 = highest; a tie shares the better rank)."""
    order = np.sort(scores)[::-1]
    return np.searchsorted(-order, -scores, side="left") + 1
