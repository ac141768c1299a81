"""Program-conditioned LoRA: factor sets, the program embedding, synthesis, fitting, mixing, weight files, PEFT export."""
