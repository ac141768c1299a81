"""A small random Llama or Qwen2 and a byte-level tokenizer, built in-process without any file or download (fast
tests). The Qwen2 shape is Qwen2.5-Coder's: biased q/k/v, an untied output layer, Qwen's chat template (its default
system turn) and its specials (`<|endoftext|>` as bos and pad, `<|im_end|>` as eos, the fill-in-the-middle markers)."""
from __future__ import annotations

from typing import Any

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_CHAT = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\n{% endif %}" + CHATML
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                 "<|repo_name|>", "<|file_sep|>"]


def byte_tokenizer(arch: str = "llama"):
    """A byte-level tokenizer (256 byte tokens + ChatML specials, Qwen's for ``arch="qwen2"``) built without any
    download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if arch == "qwen2":
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>")
        tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
        tokenizer.add_tokens(["<tool_call>", "</tool_call>"])  # added but not special, as in Qwen's tokenizer
        tokenizer.chat_template = QWEN_CHAT
        return tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def random_llama(tokenizer: Any, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                 seed: int) -> Any:
    """A float32 Llama for ``tokenizer`` with weights drawn from torch's generator seeded with ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_shape(tokenizer, layers, hidden, intermediate, heads, kv_heads), tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _shape(tokenizer: Any, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """The config keys both tiny architectures share: sizes, positions and the tokenizer's special ids."""
    return {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def random_qwen2(tokenizer: Any, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                 seed: int) -> Any:
    """A float32 Qwen2 for ``tokenizer`` (biased q/k/v, untied output layer) seeded with ``seed``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_shape(tokenizer, layers, hidden, intermediate, heads, kv_heads), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # a zero bias (the default init) would hide a bias that is dropped or mixed
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
    return model
