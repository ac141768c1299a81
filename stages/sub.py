"""Stage `sub` (docs/behaviour.md §5 subgraph adapter): an adapter for the selected region (`sub=hashed|none`).

The region's subgraph embedding (§3 restricted to the selected files) is synthesised (§4) at the capacity
rank. With `mixture_m` > 0 the bank adapters of the top-m selected modules are concatenated along the rank
axis, each factor scaled by √π_i (π uniform, 1/m), adding their rank. `round_lora` rounds every entry to
sign·median(|x|), or 0 below `round_threshold`·median.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from pipeline.engine.errors import InputError
from pipeline.engine.stage import Range, Stage
from stages.common.adapters.embedding import DEFAULT_WEIGHTS, embed
from stages.common.adapters.factors import AdapterSet, check_factors, factor_check, infer_targets, load_npz
from stages.common.adapters.knobs import parse_weights
from stages.common.adapters.synthesis import round_factors, synthesize
from stages.common.types import Artifacts, Capacity, LanguageModel, ProgramIndex, Selection


class SubgraphAdapter(Stage):
    outputs = {"sub": AdapterSet | None}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        seed: int = 1
        layer_gate: Literal["zmean", "cosine", "hump", "linear"] = "zmean"
        map_cap: Annotated[float, Range(gt=0)] | None = None
        dim: Annotated[int, Range(ge=8)] = 1536
        embed_seed: int = 0
        channel_weights: str | dict = ""
        include_text: bool = False
        mixture_m: Annotated[int, Range(ge=0)] = 0
        adapters_bank: str | None = None
        round_lora: bool = False
        round_threshold: Annotated[float, Range(ge=0)] = 0.5

        def __post_init__(self) -> None:
            self.weights  # noqa: B018 - a bad channel weight is refused before anything runs

        @property
        def weights(self) -> dict[str, float]:
            return {**DEFAULT_WEIGHTS, **parse_weights(self.channel_weights, DEFAULT_WEIGHTS, "sub.channel_weights")}

    config: Config

    def run(self, index: ProgramIndex, selection: Selection, capacity: Capacity, lm: LanguageModel,
            artifacts: Artifacts) -> dict:
        c = self.config
        tmap = infer_targets(lm.skeleton)  # shapes only: the weights are not read
        vectors = embed(index, set(selection.files), c.dim, c.embed_seed, c.weights, c.include_text)
        sub = synthesize(vectors["z"], tmap.num_layers, tmap.shapes, tmap.targets, capacity.rank, c.seed,
                         c.layer_gate, c.map_cap)
        if c.mixture_m:
            sub = self._with_bank(sub, selection, artifacts, tmap)
        if c.round_lora:
            sub = round_factors(sub, c.round_threshold)
        return {"sub": sub}

    def _with_bank(self, sub: AdapterSet, selection: Selection, artifacts: Artifacts, tmap) -> AdapterSet:
        c = self.config
        bank = Path(c.adapters_bank) if c.adapters_bank else artifacts.path / "bank"
        if not bank.is_dir():
            raise InputError(f"sub.mixture_m={c.mixture_m} needs an adapter bank, but '{bank}' does not exist "
                             "(build with synth.bank=true or set sub.adapters_bank)")
        chosen = [m for m in selection.modules if (bank / m / "adapters.npz").is_file()][: c.mixture_m]
        if not chosen:
            raise InputError(f"no bank adapter in '{bank}' for the selected modules {selection.modules[:5]}")
        share = math.sqrt(1.0 / len(chosen))
        headers = factor_check(tmap.shapes, tmap.num_layers)
        members = [check_factors(load_npz(bank / m / "adapters.npz", check=headers), tmap.shapes, tmap.num_layers,
                                 str(bank / m)) for m in chosen]
        factors = dict(sub.factors)
        for layer in range(tmap.num_layers):
            for target in tmap.targets:
                pair = sub.pair(layer, target)
                if pair is None:
                    continue
                a_parts, b_parts = [pair[0]], [pair[1]]
                for member in members:
                    extra = member.pair(layer, target)
                    if extra is not None:
                        a_parts.append(share * extra[0])
                        b_parts.append(share * extra[1])
                factors[f"L{layer}.{target}.A"] = np.concatenate(a_parts, axis=1).astype(np.float32)
                factors[f"L{layer}.{target}.B"] = np.concatenate(b_parts, axis=0).astype(np.float32)
        meta = {**sub.meta, "mixture": chosen}
        return AdapterSet(factors, sub.num_layers, sub.shapes, meta)


class NoSubgraph(Stage):
    """`sub=none`: the base adapter alone is mixed (Δ uses it with weight 1)."""

    outputs = {"sub": AdapterSet | None}

    def run(self, index: ProgramIndex, selection: Selection, capacity: Capacity, lm: LanguageModel,
            artifacts: Artifacts) -> dict:
        return {"sub": None}
