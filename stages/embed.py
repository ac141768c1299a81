"""Stage `embed` (docs/behaviour.md §3): the hashed multi-channel embedding of the whole program."""
from __future__ import annotations

import dataclasses
from typing import Annotated

from pipeline.engine.stage import Range, Stage
from stages.common.adapters.embedding import DEFAULT_WEIGHTS, embed
from stages.common.adapters.knobs import parse_weights
from stages.common.types import ProgramEmbedding, ProgramIndex


class EmbedProgram(Stage):
    outputs = {"embedding": ProgramEmbedding}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        dim: Annotated[int, Range(ge=8)] = 1536
        seed: int = 0
        channel_weights: str | dict = ""
        include_text: bool = False
        text_max_bytes: Annotated[int, Range(ge=0)] = 200_000

        def __post_init__(self) -> None:
            self.weights  # noqa: B018 - a bad channel weight is refused before anything runs

        @property
        def weights(self) -> dict[str, float]:
            return {**DEFAULT_WEIGHTS, **parse_weights(self.channel_weights, DEFAULT_WEIGHTS, "embed.channel_weights")}

    config: Config

    def run(self, index: ProgramIndex) -> dict:
        c = self.config
        weights = c.weights
        vectors = embed(index, None, c.dim, c.seed, weights, c.include_text, c.text_max_bytes)
        return {"embedding": ProgramEmbedding(vectors, c.dim, c.seed, weights)}
