"""Loading the causal LM: devices and the process-wide model, GGUF conversion and its checkpoint cache, the tiny test model."""
