"""Stage `synth=hashed` (SPEC §4): base LoRA factors from the program vector z, deterministic.

Target shapes and the layer count come from the loaded model. With `bank: true` it also synthesises one
adapter per module from that module's own subgraph embedding (the mixture bank, SPEC §2).
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np

from pipeline.stage import Range, Stage
from stages.common.adapters import AdapterSet, infer_targets
from stages.common.embedding import embed
from stages.common.synthesis import synthesize
from stages.common.types import LanguageModel, ProgramEmbedding, ProgramIndex

Gate = Literal["zmean", "cosine", "hump", "linear"]


class HashedSynth(Stage):
    outputs = {"adapters": AdapterSet, "bank": dict}

    def __init__(self, rank: Annotated[int, Range(ge=1)] = 12, seed: int = 0, layer_gate: Gate = "zmean",
                 map_cap: Annotated[float, Range(gt=0)] | None = None, bank: bool = False):
        self.rank, self.seed, self.layer_gate, self.map_cap, self.bank = rank, seed, layer_gate, map_cap, bank

    def run(self, embedding: ProgramEmbedding, lm: LanguageModel, index: ProgramIndex) -> dict:
        tmap = infer_targets(lm.model)
        adapters = synthesize(embedding.z, tmap.num_layers, tmap.shapes, tmap.targets, self.rank, self.seed,
                              self.layer_gate, self.map_cap)
        bank = {}
        if self.bank:
            for module, path in sorted(index.modules.items()):
                vectors = embed(index, {path}, embedding.dim, embedding.seed, embedding.weights)
                if not np.any(vectors["z"]):
                    continue
                bank[module] = synthesize(vectors["z"], tmap.num_layers, tmap.shapes, tmap.targets, self.rank,
                                          self.seed, self.layer_gate, self.map_cap)
        return {"adapters": adapters, "bank": bank}
