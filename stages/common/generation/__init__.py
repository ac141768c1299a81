"""How the model computes and decodes: precision and threads, attention, KV cache, continuations, streaming, and the
decode stage's settings, generate loop, logits processors, lead choice and reply stops."""
