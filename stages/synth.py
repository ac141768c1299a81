"""Stage `synth` (docs/behaviour.md §4, §4b): the base LoRA factors (`synth=hashed|fitted`).

`hashed`: factors from the program vector z, deterministic.

Target shapes and the layer count come from the loaded model. With `bank: true` it also synthesises one
adapter per module from that module's own subgraph embedding (the mixture bank, docs/behaviour.md §2).
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import numpy as np

from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import Range, Stage
from stages.common.adapters.deltas import MixSettings
from stages.common.adapters.embedding import embed
from stages.common.adapters.factors import TARGETS, AdapterSet, infer_targets
from stages.common.adapters.fitting import Autocast, Schedule, fit_lora
from stages.common.adapters.lock import exclusive
from stages.common.adapters.mixing import AdapterMix
from stages.common.adapters.synthesis import synthesize
from stages.common.program.corpus import perplexity, split, spread, training_pieces
from stages.common.types import LanguageModel, ProgramEmbedding, ProgramIndex

Gate = Literal["zmean", "cosine", "hump", "linear"]


class HashedSynth(Stage):
    outputs = {"adapters": AdapterSet, "bank": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        rank: Annotated[int, Range(ge=1)] = 12
        seed: int = 0
        layer_gate: Gate = "zmean"
        map_cap: Annotated[float, Range(gt=0)] | None = None  # caps ‖A‖_F and ‖B‖_F of every pair
        bank: bool = False  # also one adapter per module, from that module's own subgraph embedding

    config: Config

    def run(self, embedding: ProgramEmbedding, lm: LanguageModel, index: ProgramIndex) -> dict:
        c = self.config
        tmap = infer_targets(lm.skeleton)  # shapes only: the weights are not read
        adapters = synthesize(embedding.z, tmap.num_layers, tmap.shapes, tmap.targets, c.rank, c.seed,
                              c.layer_gate, c.map_cap)
        bank = {}
        if c.bank:
            for module, path in sorted(index.modules.items()):
                vectors = embed(index, {path}, embedding.dim, embedding.seed, embedding.weights)
                if not np.any(vectors["z"]):
                    continue
                bank[module] = synthesize(vectors["z"], tmap.num_layers, tmap.shapes, tmap.targets, c.rank,
                                          c.seed, c.layer_gate, c.map_cap)
        return {"adapters": adapters, "bank": bank}


class FittedSynth(Stage):
    """`synth=fitted` (docs/behaviour.md §4b): LoRA factors trained on the program's own text, in the §2 schema.

    The stored A carries the training scale and the fold for the mix defaults it assumes (``fold_alpha``,
    ``fold_rank``, base alone), so the mix stage at those knobs adds exactly the trained delta. The held-out
    segments and the held-out files (``held_out_files``, the same split the perplexity stage scores) are never
    trained on; the manifest records the plain and fitted perplexity of both, and ``curve`` the training curve.
    """

    outputs = {"adapters": AdapterSet, "bank": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        rank: Annotated[int, Range(ge=1)] = 8
        targets: tuple[str, ...] = TARGETS
        lr: Annotated[float, Range(gt=0)] = 2e-3
        batch_size: Annotated[int, Range(ge=1)] = 4
        steps: Annotated[int, Range(ge=0)] = 40
        time_budget_s: Annotated[float, Range(gt=0)] = 120.0  # the training clock only (curve checks not counted)
        seed: int = 0
        train_alpha: Annotated[float, Range(gt=0)] = 16.0  # the LoRA path is scaled by train_alpha/rank
        seq_len: Annotated[int, Range(ge=8)] = 256
        val_every: Annotated[int, Range(ge=2)] = 5
        held_out_files: Annotated[float, Range(ge=0, le=0.5)] = 0.1
        split_seed: int = 0
        eval_pieces: Annotated[int, Range(ge=1)] = 32
        layout: Literal["segments", "packed"] = "segments"
        summaries: bool = False
        schedule: Schedule = "constant"
        warmup_steps: Annotated[int, Range(ge=0)] = 0
        min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
        autocast: Autocast = "bfloat16"
        curve_every: Annotated[int, Range(ge=0)] = 0
        curve_pieces: Annotated[int, Range(ge=1)] = 8
        early_stop_patience: Annotated[int, Range(ge=0)] = 0
        dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
        fold_alpha: Annotated[float, Range(gt=0)] = 16.0
        fold_rank: Annotated[int, Range(ge=1)] = 12
        progress: bool = True

        def __post_init__(self) -> None:
            unknown = sorted(set(self.targets) - set(TARGETS))
            if unknown:
                raise ConfigError(f"synth.targets: unknown target '{unknown[0]}'; known: {', '.join(TARGETS)}")
            if self.early_stop_patience and not self.curve_every:
                raise ConfigError("synth.early_stop_patience needs synth.curve_every > 0 (it watches the curve's checks)")

    config: Config

    def run(self, embedding: ProgramEmbedding, lm: LanguageModel, index: ProgramIndex) -> dict:
        import torch

        c = self.config
        tmap = infer_targets(lm.model)
        corpus = split(index, lm.tokenizer, c.seq_len, c.val_every, c.held_out_files, c.split_seed)
        train = training_pieces(corpus, index, lm.tokenizer, c.seq_len, c.layout, c.summaries)
        evaluation = corpus.evaluation(c.eval_pieces)
        targets = [t for t in c.targets if t in tmap.shapes]
        torch.manual_seed(c.seed)
        with exclusive(lm):  # training hooks in the shared model: no other thread's answer may see them
            plain = {name: perplexity(lm.model, chosen, c.batch_size) if chosen else float("nan")
                     for name, chosen in evaluation.items()}
            monitor = {name: spread(chosen, c.curve_pieces) for name, chosen in evaluation.items()}
            fit = fit_lora(lm.model, tmap, train, targets, c.rank, c.lr, c.batch_size, c.steps,
                           c.time_budget_s, c.seed, c.train_alpha / c.rank, progress=c.progress,
                           schedule=c.schedule, warmup_steps=c.warmup_steps, min_lr_ratio=c.min_lr_ratio,
                           autocast=c.autocast, monitor=monitor, monitor_every=c.curve_every,
                           early_stop_patience=c.early_stop_patience, eval_batch_size=c.batch_size,
                           dropout=c.dropout)
        fold = c.fold_rank / c.fold_alpha  # undoes the mix's alpha/rank at its default knobs
        factors: dict[str, np.ndarray] = {}
        for (layer, target), (a, b) in fit.factors.items():
            factors[f"L{layer}.{target}.A"] = (a * fold).astype(np.float32)
            factors[f"L{layer}.{target}.B"] = b
            factors[f"L{layer}.{target}.gate"] = np.array(1.0, dtype=np.float32)
        adapters = AdapterSet(factors, tmap.num_layers, dict(tmap.shapes))
        # score the fitted delta exactly as stored: the same hook path the mix stage uses
        mix = AdapterMix(lm, tmap, "hooks", adapters, None, c.fold_alpha)
        mix.apply(MixSettings(0.0, c.fold_alpha, c.fold_rank, {}, [1.0] * tmap.num_layers, {}, None))
        try:
            fitted = {name: perplexity(lm.model, chosen, c.batch_size) if chosen else float("nan")
                      for name, chosen in evaluation.items()}
        finally:
            mix.restore()
        adapters.meta = {
            "synth": "fitted", "rank": c.rank, "seed": c.seed, "targets": targets, "lr": c.lr,
            "batch_size": c.batch_size, "steps_requested": c.steps, "steps": fit.steps,
            "seconds": round(fit.seconds, 2), "stopped_by": fit.stopped_by, "best_step": fit.best_step,
            "steps_per_second": round(fit.steps / fit.seconds, 4) if fit.seconds else None,
            "train_alpha": c.train_alpha, "layout": c.layout, "summaries": c.summaries,
            "schedule": c.schedule, "warmup_steps": c.warmup_steps, "autocast": c.autocast,
            "dropout": c.dropout, "fold": {"factor": fold, "folded_into": "A", "train_scale": c.train_alpha / c.rank,
                     "assumes": {"mix.alpha": c.fold_alpha, "capacity.rank": c.fold_rank, "share": 1.0,
                                 "target_weight": 1.0, "layer_multiplier": 1.0}},
            "loss_first": fit.losses[0] if fit.losses else None, "loss_last": fit.losses[-1] if fit.losses else None,
            "train_pieces": len(train), "train_tokens": sum(len(p.ids) for p in train),
            "held_out_pieces": len(corpus.held_out), "eval_pieces": len(evaluation["held_out"]),
            "held_out_files": list(corpus.files), "held_out_file_pieces": len(corpus.held_out_files),
            "eval_file_pieces": len(evaluation["held_out_files"]),
            "val_perplexity_plain": plain["held_out"], "val_perplexity_fitted": fitted["held_out"],
            "files_perplexity_plain": plain["held_out_files"], "files_perplexity_fitted": fitted["held_out_files"],
            "curve": fit.curve,
        }
        return {"adapters": adapters, "bank": {}}


class NoSynth(Stage):
    """`synth=none`: an empty adapter set, so the mix adds nothing (the plain-model row of an ablation)."""

    outputs = {"adapters": AdapterSet, "bank": dict}

    def run(self, embedding: ProgramEmbedding, lm: LanguageModel, index: ProgramIndex) -> dict:
        tmap = infer_targets(lm.skeleton)
        return {"adapters": AdapterSet({}, tmap.num_layers, dict(tmap.shapes), {"synth": "none"}), "bank": {}}
