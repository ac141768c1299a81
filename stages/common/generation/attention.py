"""`model.attention=sdpa_packed`: transformers' SDPA attention, with one query token of a grouped-query model packed
onto its key/value heads when no mask is given.

Decoding from a KV cache runs one query token against the whole cache. SmolLM2 has 9 query heads on 3 key/value
heads; with no attention mask, transformers' SDPA path hands all 9 heads to `scaled_dot_product_attention(...,
enable_gqa=True)`, whose CPU kernel is several times slower in bfloat16 than the packed query. With a mask,
transformers already packs the query: (batch, 9, 1, dim) becomes (batch, 3, 3, dim), three "positions" per key/value
head, and no head is repeated. This does the same when there is no mask. Prefill (several query tokens), masked
calls and models without grouped heads go to transformers' SDPA unchanged. Same values as SDPA up to rounding
(tested against `sdpa` and `eager`). Its masks are SDPA's: transformers builds no mask at all for an attention name
it has no mask function for, so `sdpa_mask` is registered with it.
"""
from __future__ import annotations

from typing import Literal

Attention = Literal["sdpa", "sdpa_packed", "eager"]
PACKED = "sdpa_packed"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    single = query.shape[2] == 1 and attention_mask is None and kwargs.get("position_bias") is None
    if not (single and groups > 1 and not dropout and kwargs.get("softcap") is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    # query head h = kv_head * groups + r (transformers' repeat_kv order), so the reshape puts each key/value head's
    # query heads side by side as its rows
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(batch, heads // groups, groups, dim), key,
                                                           value, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_attention(model, attention: Attention) -> None:
    """Switch ``model`` to ``attention`` (registering `sdpa_packed` with transformers the first time)."""
    if attention == PACKED:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(PACKED, packed_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != attention:
        model.set_attn_implementation(attention)
