"""Stages `mix`, `remix` and `unmix` (docs/behaviour.md §5 mix and stage-2 fallback).

`mix` blends base and subgraph adapters into the model (Δ formula in stages/common/adapters/deltas.py), `remix`
(only when the first citation check failed) re-mixes with boosted top layers and a larger gsub at full
alpha, and `unmix` (a node that runs also after a failure) restores every weight bit for bit.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

from pipeline.engine.errors import ConfigError, InputError
from pipeline.engine.stage import Range, Stage
from stages.common.adapters.deltas import MixSettings, build_deltas, layer_third, weight_norms
from stages.common.adapters.factors import ATTN, MLP, AdapterSet, infer_targets
from stages.common.adapters.lock import exclusive
from stages.common.adapters.mixing import AdapterMix, holds_factors
from stages.common.adapters.peft_io import write_peft
from stages.common.types import Artifacts, Capacity, LanguageModel, TargetPlan


class MixAdapters(Stage):
    outputs = {"lm": LanguageModel, "adapter_mix": AdapterMix, "report": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        mode: Literal["hooks", "merge"] = "merge"
        alpha: Annotated[float, Range(ge=0)] = 16.0
        ablate: tuple[Literal["attn", "mlp"], ...] = ()  # attn zeroes q/k/v/o, mlp gate/up/down
        delta_cap: Annotated[float, Range(gt=0)] | None = 0.05  # ‖Δ‖_F <= cap·‖W‖_F
        alpha_warmup: bool = False  # the first decode at alpha/2, the stage-2 retry at full alpha

    config: Config

    def settings(self, capacity: Capacity, plan: TargetPlan, warmup: bool) -> MixSettings:
        c = self.config
        return MixSettings(
            gsub=capacity.gsub, alpha=c.alpha / 2 if warmup else c.alpha, rank=capacity.rank,
            weights=plan.weights, layer_multipliers=plan.layer_multipliers, keeps=plan.keeps,
            delta_cap=c.delta_cap, beta=capacity.beta,
            ablate=tuple(t for group in c.ablate for t in (ATTN if group == "attn" else MLP)),
        )

    def run(self, lm: LanguageModel, artifacts: Artifacts, capacity: Capacity, plan: TargetPlan,
            sub: AdapterSet | None = None) -> dict:
        # the weights are read (and loaded) only when there is something to mix into them
        tmap = infer_targets(lm.model if holds_factors(artifacts.adapters, sub) else lm.skeleton)
        # from here to unmix this answer holds the model's lock (stages/common/adapters/lock.py): another thread's answer
        # waits at its own mix, so neither sees the other's delta
        mix = AdapterMix(lm, tmap, self.config.mode, artifacts.adapters, sub, self.config.alpha)
        try:
            report = mix.apply(self.settings(capacity, plan, self.config.alpha_warmup))
            report["entropy"] = capacity.entropy
            report["synth"] = artifacts.adapters.meta.get("synth")
        except BaseException:
            mix.restore()  # no handle reaches unmix: restore and release here
            raise
        return {"lm": lm, "adapter_mix": mix, "report": report}


class BoostedRemix(Stage):
    """Stage 2: unmix, then re-mix with layer multipliers low/mid/top and gsub ← min(gsub_max, factor·gsub)."""

    outputs = {"lm": LanguageModel, "report": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        low: float = 0.95
        mid: float = 1.05
        top: float = 1.20
        gsub_factor: Annotated[float, Range(ge=0)] = 1.1
        gsub_max: Annotated[float, Range(ge=0, le=1)] = 0.95

    config: Config

    def run(self, adapter_mix: AdapterMix) -> dict:
        if adapter_mix.settings is None:
            raise ConfigError("remix needs a mix that was applied (the mix node's adapter_mix)")
        layers = adapter_mix.tmap.num_layers
        thirds = [layer_third(i, layers) for i in range(layers)]
        c = self.config
        multipliers = (c.low, c.mid, c.top)
        settings = dataclasses.replace(
            adapter_mix.settings, layer_multipliers=[multipliers[t] for t in thirds],
            gsub=min(c.gsub_max, c.gsub_factor * adapter_mix.settings.gsub), alpha=adapter_mix.full_alpha,
        )
        return {"lm": adapter_mix.lm, "report": adapter_mix.apply(settings)}


class Unmix(Stage):
    """Restore the model's weights exactly. Runs also when an earlier node failed."""

    outputs = {"restored": bool}

    def run(self, adapter_mix: AdapterMix) -> dict:
        adapter_mix.restore()
        return {"restored": True}


class ExportPeft(MixAdapters):
    """Write the adapter an answer would mix (`which=mixed`), or its base or sub part, in PEFT's LoRA format.

    It takes the mix stage's knobs (alpha, ablate, delta_cap) so the file reproduces the mixed model; the
    model itself is not modified.
    """

    outputs = {"path": str}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(MixAdapters.Config):
        out: str
        which: Literal["mixed", "base", "sub"] = "mixed"

    config: Config

    def run(self, lm: LanguageModel, artifacts: Artifacts, capacity: Capacity, plan: TargetPlan,
            sub: AdapterSet | None = None) -> dict:
        tmap = infer_targets(lm.model)
        which = self.config.which
        base = artifacts.adapters if which in ("mixed", "base") else None
        sub = sub if which in ("mixed", "sub") else None
        if base is None and sub is None:
            raise InputError(f"export.which={which} but there is no such adapter (sub=none?)")
        with exclusive(lm):  # the norms of the unmixed weights, not of another thread's mix
            norms = weight_norms(tmap)
        deltas = build_deltas(base, sub, tmap, self.settings(capacity, plan, False), norms)
        return {"path": str(write_peft(deltas, tmap, Path(self.config.out), lm.model_id))}
