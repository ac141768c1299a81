"""How the model computes and decodes: precision and threads, attention, KV cache, continuations, streaming."""
