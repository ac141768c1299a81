"""Program-conditioned LoRA: factor sets, the program embedding, synthesis, fitting, the mixed deltas, mixing and the
model's lock, weight files, PEFT export, the build-artifact folder."""
