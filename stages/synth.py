"""Stage `synth` (SPEC §4, §4b): the base LoRA factors (`synth=hashed|fitted`).

`hashed`: factors from the program vector z, deterministic.

Target shapes and the layer count come from the loaded model. With `bank: true` it also synthesises one
adapter per module from that module's own subgraph embedding (the mixture bank, SPEC §2).
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np

from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import Range, Stage
from stages.common.adapters.embedding import embed
from stages.common.adapters.factors import TARGETS, AdapterSet, infer_targets
from stages.common.adapters.fitting import Autocast, Schedule, fit_lora
from stages.common.adapters.mixing import AdapterMix, MixSettings, exclusive
from stages.common.adapters.synthesis import synthesize
from stages.common.program.corpus import perplexity, split, spread, training_pieces
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


class FittedSynth(Stage):
    """`synth=fitted` (SPEC §4b): LoRA factors trained on the program's own text, in the §2 schema.

    The stored A carries the training scale and the fold for the mix defaults it assumes (``fold_alpha``,
    ``fold_rank``, base alone), so the mix stage at those knobs adds exactly the trained delta. The held-out
    segments and the held-out files (``held_out_files``, the same split the perplexity stage scores) are never
    trained on; the manifest records the plain and fitted perplexity of both, and ``curve`` the training curve.
    """

    outputs = {"adapters": AdapterSet, "bank": dict}

    def __init__(self, rank: Annotated[int, Range(ge=1)] = 8, targets: list[str] = list(TARGETS),
                 lr: Annotated[float, Range(gt=0)] = 2e-3, batch_size: Annotated[int, Range(ge=1)] = 4,
                 steps: Annotated[int, Range(ge=0)] = 40, time_budget_s: Annotated[float, Range(gt=0)] = 120.0,
                 seed: int = 0, train_alpha: Annotated[float, Range(gt=0)] = 16.0,
                 seq_len: Annotated[int, Range(ge=8)] = 256, val_every: Annotated[int, Range(ge=2)] = 5,
                 held_out_files: Annotated[float, Range(ge=0, le=0.5)] = 0.1,
                 split_seed: int = 0, eval_pieces: Annotated[int, Range(ge=1)] = 32,
                 layout: Literal["segments", "packed"] = "segments", summaries: bool = False,
                 schedule: Schedule = "constant", warmup_steps: Annotated[int, Range(ge=0)] = 0,
                 min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1, autocast: Autocast = "bfloat16",
                 curve_every: Annotated[int, Range(ge=0)] = 0, curve_pieces: Annotated[int, Range(ge=1)] = 8,
                 early_stop_patience: Annotated[int, Range(ge=0)] = 0, dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0,
                 fold_alpha: Annotated[float, Range(gt=0)] = 16.0, fold_rank: Annotated[int, Range(ge=1)] = 12,
                 progress: bool = True):
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise ConfigError(f"synth.targets: unknown target '{unknown[0]}'; known: {', '.join(TARGETS)}")
        if early_stop_patience and not curve_every:
            raise ConfigError("synth.early_stop_patience needs synth.curve_every > 0 (it watches the curve's checks)")
        self.rank, self.targets, self.lr, self.batch_size = rank, list(targets), lr, batch_size
        self.steps, self.time_budget_s, self.seed, self.train_alpha = steps, time_budget_s, seed, train_alpha
        self.seq_len, self.val_every, self.split_seed, self.eval_pieces = seq_len, val_every, split_seed, eval_pieces
        self.held_out_files, self.layout, self.summaries = held_out_files, layout, summaries
        self.schedule, self.warmup_steps, self.min_lr_ratio, self.autocast = schedule, warmup_steps, min_lr_ratio, autocast
        self.curve_every, self.curve_pieces, self.early_stop_patience = curve_every, curve_pieces, early_stop_patience
        self.dropout = dropout
        self.fold_alpha, self.fold_rank, self.progress = fold_alpha, fold_rank, progress

    def run(self, embedding: ProgramEmbedding, lm: LanguageModel, index: ProgramIndex) -> dict:
        import torch

        tmap = infer_targets(lm.model)
        corpus = split(index, lm.tokenizer, self.seq_len, self.val_every, self.held_out_files, self.split_seed)
        train = training_pieces(corpus, index, lm.tokenizer, self.seq_len, self.layout, self.summaries)
        evaluation = corpus.evaluation(self.eval_pieces)
        targets = [t for t in self.targets if t in tmap.shapes]
        torch.manual_seed(self.seed)
        with exclusive(lm.model):  # training hooks in the shared model: no other thread's answer may see them
            plain = {name: perplexity(lm.model, chosen, self.batch_size) if chosen else float("nan")
                     for name, chosen in evaluation.items()}
            monitor = {name: spread(chosen, self.curve_pieces) for name, chosen in evaluation.items()}
            fit = fit_lora(lm.model, tmap, train, targets, self.rank, self.lr, self.batch_size, self.steps,
                           self.time_budget_s, self.seed, self.train_alpha / self.rank, progress=self.progress,
                           schedule=self.schedule, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio,
                           autocast=self.autocast, monitor=monitor, monitor_every=self.curve_every,
                           early_stop_patience=self.early_stop_patience, eval_batch_size=self.batch_size,
                           dropout=self.dropout)
        fold = self.fold_rank / self.fold_alpha  # undoes the mix's alpha/rank at its default knobs
        factors: dict[str, np.ndarray] = {}
        for (layer, target), (a, b) in fit.factors.items():
            factors[f"L{layer}.{target}.A"] = (a * fold).astype(np.float32)
            factors[f"L{layer}.{target}.B"] = b
            factors[f"L{layer}.{target}.gate"] = np.array(1.0, dtype=np.float32)
        adapters = AdapterSet(factors, tmap.num_layers, dict(tmap.shapes))
        # score the fitted delta exactly as stored: the same hook path the mix stage uses
        mix = AdapterMix(lm, tmap, "hooks", adapters, None, self.fold_alpha)
        mix.apply(MixSettings(0.0, self.fold_alpha, self.fold_rank, {}, [1.0] * tmap.num_layers, {}, None))
        try:
            fitted = {name: perplexity(lm.model, chosen, self.batch_size) if chosen else float("nan")
                      for name, chosen in evaluation.items()}
        finally:
            mix.restore()
        adapters.meta = {
            "synth": "fitted", "rank": self.rank, "seed": self.seed, "targets": targets, "lr": self.lr,
            "batch_size": self.batch_size, "steps_requested": self.steps, "steps": fit.steps,
            "seconds": round(fit.seconds, 2), "stopped_by": fit.stopped_by, "best_step": fit.best_step,
            "steps_per_second": round(fit.steps / fit.seconds, 4) if fit.seconds else None,
            "train_alpha": self.train_alpha, "layout": self.layout, "summaries": self.summaries,
            "schedule": self.schedule, "warmup_steps": self.warmup_steps, "autocast": self.autocast,
            "dropout": self.dropout, "fold": {"factor": fold, "folded_into": "A", "train_scale": self.train_alpha / self.rank,
                     "assumes": {"mix.alpha": self.fold_alpha, "capacity.rank": self.fold_rank, "share": 1.0,
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
        tmap = infer_targets(lm.model)
        return {"adapters": AdapterSet({}, tmap.num_layers, dict(tmap.shapes), {"synth": "none"}), "bank": {}}
