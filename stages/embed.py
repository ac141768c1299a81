"""Stage `embed` (SPEC §3): the hashed multi-channel embedding of the whole program."""
from __future__ import annotations

from typing import Annotated

from pipeline.engine.stage import Range, Stage
from stages.common.adapters.embedding import DEFAULT_WEIGHTS, embed
from stages.common.adapters.knobs import parse_weights
from stages.common.types import ProgramEmbedding, ProgramIndex


class EmbedProgram(Stage):
    outputs = {"embedding": ProgramEmbedding}

    def __init__(self, dim: Annotated[int, Range(ge=8)] = 1536, seed: int = 0, channel_weights: str | dict = "",
                 include_text: bool = False, text_max_bytes: Annotated[int, Range(ge=0)] = 200_000):
        self.dim, self.seed, self.include_text, self.text_max_bytes = dim, seed, include_text, text_max_bytes
        self.weights = {**DEFAULT_WEIGHTS, **parse_weights(channel_weights, DEFAULT_WEIGHTS, "embed.channel_weights")}

    def run(self, index: ProgramIndex) -> dict:
        vectors = embed(index, None, self.dim, self.seed, self.weights, self.include_text, self.text_max_bytes)
        return {"embedding": ProgramEmbedding(vectors, self.dim, self.seed, self.weights)}
