"""Stages `mix`, `remix` and `unmix` (SPEC §5 mix and stage-2 fallback).

`mix` blends base and subgraph adapters into the model (Δ formula in stages/common/mixing.py), `remix`
(only when the first citation check failed) re-mixes with boosted top layers and a larger gsub at full
alpha, and `unmix` (a node that runs also after a failure) restores every weight bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pipeline.errors import ConfigError, InputError
from pipeline.stage import Range, Stage
from stages.common.adapters import ATTN, MLP, AdapterSet, infer_targets
from stages.common.mixing import AdapterMix, MixSettings, build_deltas, exclusive, layer_third, weight_norms
from stages.common.peft_io import write_peft
from stages.common.types import Artifacts, Capacity, LanguageModel, TargetPlan


def delta_cap_from(value: float | None) -> float | None:
    """`PCA_DELTA_CAP` overrides the configured cap (a number; 'none' or 'off' disables it)."""
    env = os.environ.get("PCA_DELTA_CAP")
    if env is None:
        return value
    if env.strip().lower() in ("none", "off", ""):
        return None
    try:
        cap = float(env)
    except ValueError:
        raise ConfigError(f"environment variable PCA_DELTA_CAP must be a number, got {env!r}") from None
    if not math.isfinite(cap) or cap <= 0:
        raise ConfigError(f"environment variable PCA_DELTA_CAP must be a finite number > 0 (or 'none'), got {env!r}")
    return cap


class MixAdapters(Stage):
    outputs = {"lm": LanguageModel, "adapter_mix": AdapterMix, "report": dict}

    def __init__(self, mode: Literal["hooks", "merge"] = "merge", alpha: Annotated[float, Range(ge=0)] = 16.0,
                 ablate: list[Literal["attn", "mlp"]] = [], delta_cap: Annotated[float, Range(gt=0)] | None = 0.05,
                 alpha_warmup: bool = False):
        self.mode, self.alpha, self.alpha_warmup = mode, alpha, alpha_warmup
        self.ablate = tuple(t for group in ablate for t in (ATTN if group == "attn" else MLP))
        self.delta_cap = delta_cap_from(delta_cap)

    def settings(self, capacity: Capacity, plan: TargetPlan, warmup: bool) -> MixSettings:
        return MixSettings(
            gsub=capacity.gsub, alpha=self.alpha / 2 if warmup else self.alpha, rank=capacity.rank,
            weights=plan.weights, layer_multipliers=plan.layer_multipliers, keeps=plan.keeps,
            delta_cap=self.delta_cap, beta=capacity.beta, ablate=self.ablate,
        )

    def run(self, lm: LanguageModel, artifacts: Artifacts, capacity: Capacity, plan: TargetPlan,
            sub: AdapterSet | None = None) -> dict:
        tmap = infer_targets(lm.model)
        # from here to unmix this answer holds the model's lock (stages/common/mixing.py): another thread's answer
        # waits at its own mix, so neither sees the other's delta
        mix = AdapterMix(lm, tmap, self.mode, artifacts.adapters, sub, self.alpha)
        try:
            report = mix.apply(self.settings(capacity, plan, self.alpha_warmup))
            report["entropy"] = capacity.entropy
            report["synth"] = artifacts.adapters.meta.get("synth")
        except BaseException:
            mix.restore()  # no handle reaches unmix: restore and release here
            raise
        return {"lm": lm, "adapter_mix": mix, "report": report}


class BoostedRemix(Stage):
    """Stage 2: unmix, then re-mix with layer multipliers low/mid/top and gsub ← min(gsub_max, factor·gsub)."""

    outputs = {"lm": LanguageModel, "report": dict}

    def __init__(self, low: float = 0.95, mid: float = 1.05, top: float = 1.20,
                 gsub_factor: Annotated[float, Range(ge=0)] = 1.1, gsub_max: Annotated[float, Range(ge=0, le=1)] = 0.95):
        self.multipliers, self.gsub_factor, self.gsub_max = (low, mid, top), gsub_factor, gsub_max

    def run(self, adapter_mix: AdapterMix) -> dict:
        if adapter_mix.settings is None:
            raise ConfigError("remix needs a mix that was applied (the mix node's adapter_mix)")
        layers = adapter_mix.tmap.num_layers
        thirds = [layer_third(i, layers) for i in range(layers)]
        settings = dataclasses.replace(
            adapter_mix.settings, layer_multipliers=[self.multipliers[t] for t in thirds],
            gsub=min(self.gsub_max, self.gsub_factor * adapter_mix.settings.gsub), alpha=adapter_mix.full_alpha,
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

    def __init__(self, out: str, which: Literal["mixed", "base", "sub"] = "mixed",
                 mode: Literal["hooks", "merge"] = "merge", alpha: Annotated[float, Range(ge=0)] = 16.0,
                 ablate: list[Literal["attn", "mlp"]] = [], delta_cap: Annotated[float, Range(gt=0)] | None = 0.05,
                 alpha_warmup: bool = False):
        super().__init__(mode, alpha, ablate, delta_cap, alpha_warmup)
        self.out, self.which = out, which

    def run(self, lm: LanguageModel, artifacts: Artifacts, capacity: Capacity, plan: TargetPlan,
            sub: AdapterSet | None = None) -> dict:
        tmap = infer_targets(lm.model)
        base = artifacts.adapters if self.which in ("mixed", "base") else None
        sub = sub if self.which in ("mixed", "sub") else None
        if base is None and sub is None:
            raise InputError(f"export.which={self.which} but there is no such adapter (sub=none?)")
        with exclusive(lm.model):  # the norms of the unmixed weights, not of another thread's mix
            norms = weight_norms(tmap)
        deltas = build_deltas(base, sub, tmap, self.settings(capacity, plan, False), norms)
        return {"path": str(write_peft(deltas, tmap, Path(self.out), lm.model_id))}
