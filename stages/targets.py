"""Stage `targets` (docs/behaviour.md §5 target plan): per-target weights, per-layer multipliers, per-(layer, target) keeps.

- `target_weights` "o_proj=1.15,v_proj=1.1" (bare name = 1.0; default all 1.0; `targets=code_recall` preset).
- `q_aware_weights`: signature/param/argument/type -> o×1.10, v×1.08; why/fail/error/behavior/bug -> up×1.06,
  down×1.05, gate×1.04; where/defined/locate/find -> q×1.03.
- `layer_schedule`: m(f), f = i/(L-1): f<1/3 -> 0.95+0.45f; f<2/3 -> 1.05+0.15(f-1/3); else 1.10+0.15(f-2/3).
- `per_target_rank_schedule`: keep_t = clamp(round(rank·f_t), 1, rank), f = o 1.0, up 1.0, down 0.9, gate 0.8,
  q 0.7, k 0.65, v 0.6. `layer_rank_tiers`: keeps by layer third (low/mid/top): q,k 2/3/4; v,o 8/12/16;
  up,down 12/16/24; gate min(8, up/2); capped by rank. Both on -> the smaller keep.
  `rank_budget` > 0 scales the keeps of each layer down so that their sum is <= budget.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Annotated

from pipeline.engine.stage import Range, Stage
from stages.common.adapters.deltas import layer_third
from stages.common.adapters.factors import TARGETS, infer_targets
from stages.common.adapters.knobs import parse_weights
from stages.common.types import Capacity, LanguageModel, TargetPlan

RANK_FRACTION = {"o_proj": 1.0, "up_proj": 1.0, "down_proj": 0.9, "gate_proj": 0.8, "q_proj": 0.7, "k_proj": 0.65,
                 "v_proj": 0.6}
TIERS: dict[str, tuple[int, ...]] = {"q_proj": (2, 3, 4), "k_proj": (2, 3, 4), "v_proj": (8, 12, 16), "o_proj": (8, 12, 16),
         "up_proj": (12, 16, 24), "down_proj": (12, 16, 24)}
TIERS["gate_proj"] = tuple(min(8, up // 2) for up in TIERS["up_proj"])
QUESTION_RULES = (
    (("signature", "param", "argument", "arg", "type"), {"o_proj": 1.10, "v_proj": 1.08}),
    (("why", "fail", "error", "behavior", "behaviour", "bug"), {"up_proj": 1.06, "down_proj": 1.05, "gate_proj": 1.04}),
    (("where", "defined", "locate", "find"), {"q_proj": 1.03}),
)


def layer_multiplier(layer: int, num_layers: int) -> float:
    f = layer / (num_layers - 1) if num_layers > 1 else 0.0
    if f < 1 / 3:
        return 0.95 + 0.45 * f
    if f < 2 / 3:
        return 1.05 + 0.15 * (f - 1 / 3)
    return 1.10 + 0.15 * (f - 2 / 3)


def question_weights(prompt: str) -> dict[str, float]:
    words = re.findall(r"[a-z]+", prompt.lower())
    factors: dict[str, float] = {}
    for keywords, boosts in QUESTION_RULES:
        if any(w.startswith(k) for w in words for k in keywords):
            for target, factor in boosts.items():
                factors[target] = factors.get(target, 1.0) * factor
    return factors


class PlanTargets(Stage):
    outputs = {"plan": TargetPlan}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        target_weights: str | dict = ""
        q_aware_weights: bool = False
        layer_schedule: bool = False
        per_target_rank_schedule: bool = False
        rank_budget: Annotated[int, Range(ge=0)] = 0
        layer_rank_tiers: bool = False

        def __post_init__(self) -> None:
            self.base_weights  # noqa: B018 - bad target weights are refused before anything runs

        @property
        def base_weights(self) -> dict[str, float]:
            return parse_weights(self.target_weights, TARGETS, "targets.target_weights")

    config: Config

    def run(self, lm: LanguageModel, capacity: Capacity, prompt: str) -> dict:
        c = self.config
        tmap = infer_targets(lm.skeleton)
        targets, layers, rank = tmap.targets, tmap.num_layers, capacity.rank
        base = c.base_weights
        weights = {t: base.get(t, 1.0) for t in targets}
        notes = []
        if c.q_aware_weights:
            for target, factor in question_weights(prompt).items():
                if target in weights:
                    weights[target] *= factor
                    notes.append(f"q-aware {target}×{factor:.2f}")
        multipliers = [layer_multiplier(i, layers) if c.layer_schedule else 1.0 for i in range(layers)]
        keeps: dict[tuple[int, str], int] = {}
        if c.per_target_rank_schedule or c.layer_rank_tiers or c.rank_budget:
            for i in range(layers):
                row = {}
                for t in targets:
                    keep = rank
                    if c.per_target_rank_schedule:
                        keep = min(rank, max(1, round(rank * RANK_FRACTION.get(t, 1.0))))
                    if c.layer_rank_tiers and t in TIERS:
                        keep = min(keep, TIERS[t][layer_third(i, layers)], rank)
                    row[t] = keep
                total = sum(row.values())
                if c.rank_budget and total > c.rank_budget:
                    factor = c.rank_budget / total
                    row = {t: max(1, math.floor(k * factor)) for t, k in row.items()}
                    if sum(row.values()) > c.rank_budget:
                        notes.append(f"rank_budget {c.rank_budget} < one component per target ({len(row)})")
                keeps.update({(i, t): k for t, k in row.items()})
        return {"plan": TargetPlan(weights, multipliers, keeps, sorted(set(notes)))}
