"""Stage `capacity` (docs/behaviour.md §5): how much adapter a question gets (`capacity=fixed|entropy`).

`entropy`: e = w_p·P + w_s·S + w_q·Q (weights renormalised) where
P = ½·min(1, log1p(#modules)/log1p(1000)) + ½·min(1, import_edges/(8·#modules)),
S = ½·min(1, degree_sum(selected)/(8·#selected)) + ½·min(1, #selected/#modules),
Q = min(1, #files matched by the prompt/24);
rank = round(rank_min + e·(rank_max − rank_min)), gsub = gsub_min + e·(gsub_max − gsub_min), both clamped.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated

from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import Range, Stage
from stages.common.adapters.knobs import parse_weights
from stages.common.types import Capacity, ProgramIndex, Selection

Unit = Annotated[float, Range(ge=0, le=1)]
PARTS = ("program", "subgraph", "question")


class FixedCapacity(Stage):
    outputs = {"capacity": Capacity}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        rank: Annotated[int, Range(ge=1)] = 12
        gsub: Unit = 0.75
        beta: Annotated[float, Range(ge=0)] = 0.1  # the weight of an adapter's bias term

    config: Config

    def run(self, index: ProgramIndex, selection: Selection) -> dict:
        c = self.config
        return {"capacity": Capacity(c.rank, c.gsub, c.beta)}


def entropy_components(index: ProgramIndex, selection: Selection) -> dict[str, float]:
    graph = index.callgraph
    modules = max(1, len(index.modules) or len(index.files))
    import_edges = graph.count("imports")
    program = 0.5 * min(1.0, math.log1p(modules) / math.log1p(1000)) + 0.5 * min(1.0, import_edges / (8 * modules))
    selected = max(1, len(selection.modules) or len(selection.files))
    wanted = set(selection.files)
    linking = ("imports", "calls", "tests")  # every edge but `defines`
    degree_in, degree_out = graph.degrees("in", linking), graph.degrees("out", linking)
    degree_sum = 0
    for at, (kind, path) in enumerate(zip(graph.kinds.tolist(), graph.paths)):
        if path in wanted and kind in (0, 1):  # file and module nodes
            degree_sum += int(degree_in[at]) + int(degree_out[at])
    subgraph = 0.5 * min(1.0, degree_sum / (8 * selected)) + 0.5 * min(1.0, selected / modules)
    question = min(1.0, selection.matched_files / 24)
    return {"program": program, "subgraph": subgraph, "question": question}


class EntropyCapacity(Stage):
    outputs = {"capacity": Capacity}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        rank_min: Annotated[int, Range(ge=1)] = 8
        rank_max: Annotated[int, Range(ge=1)] = 32
        gsub_min: Unit = 0.6
        gsub_max: Unit = 0.9
        beta: Annotated[float, Range(ge=0)] = 0.1  # the weight of an adapter's bias term
        entropy_weights: str | dict = "program=0.4,subgraph=0.4,question=0.2"

        def __post_init__(self) -> None:
            if self.rank_min > self.rank_max or self.gsub_min > self.gsub_max:
                raise ConfigError("capacity: rank_min must be <= rank_max and gsub_min <= gsub_max")
            self.weights  # noqa: B018 - bad entropy weights are refused before anything runs

        @property
        def weights(self) -> dict[str, float]:
            """The entropy weights renormalised to sum 1."""
            weights = parse_weights(self.entropy_weights, PARTS, "capacity.entropy_weights")
            total = sum(weights.values())
            if total <= 0:
                raise ConfigError("capacity.entropy_weights must have a positive sum")
            return {k: weights.get(k, 0.0) / total for k in PARTS}

    config: Config

    def run(self, index: ProgramIndex, selection: Selection) -> dict:
        c = self.config
        parts = entropy_components(index, selection)
        weights = c.weights
        score = sum(weights[k] * v for k, v in parts.items())
        rank = min(c.rank_max, max(c.rank_min, round(c.rank_min + score * (c.rank_max - c.rank_min))))
        gsub = min(c.gsub_max, max(c.gsub_min, c.gsub_min + score * (c.gsub_max - c.gsub_min)))
        return {"capacity": Capacity(rank, gsub, c.beta, {"score": score, **parts})}
