"""Stage `perplexity` (SPEC §4b): how well the model, as currently mixed, knows the program's own text.

It scores the held-out pieces of the program (the split the fitted synthesizer never trains on) with the
model it is given: wire it to `model.lm` for the plain model and to `mix.lm` for the mixed one, so the
number goes through the real mix path (capacity, target weights, schedules, delta cap, gsub blend).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pipeline.cache import write_atomic
from pipeline.stage import Range, RunContext, Stage
from stages.common.corpus import perplexity, pieces
from stages.common.mixing import exclusive
from stages.common.types import LanguageModel, ProgramIndex


class ProgramPerplexity(Stage):
    outputs = {"perplexity": float}

    def __init__(self, seq_len: Annotated[int, Range(ge=8)] = 256, val_every: Annotated[int, Range(ge=2)] = 5,
                 seed: int = 0, split: Literal["held_out", "train"] = "held_out",
                 max_pieces: Annotated[int, Range(ge=1)] = 64, batch_size: Annotated[int, Range(ge=1)] = 4):
        self.seq_len, self.val_every, self.seed, self.split = seq_len, val_every, seed, split
        self.max_pieces, self.batch_size = max_pieces, batch_size

    def run(self, index: ProgramIndex, lm: LanguageModel) -> dict:
        train, held_out = pieces(index, lm.tokenizer, self.seq_len, self.val_every, seed=self.seed)
        chosen = (held_out if self.split == "held_out" else train)[: self.max_pieces]
        if not chosen:
            return {"perplexity": float("nan")}
        with exclusive(lm.model):  # the model as this graph mixed it (or plain), never another thread's mix
            return {"perplexity": perplexity(lm.model, chosen, self.batch_size)}


class PerplexityReport(Stage):
    """Plain vs mixed perplexity, printed and written to `perplexity.json` in the run folder."""

    outputs = {"report": dict}

    def run(self, context: RunContext, plain: float, mixed: float, mix_report: dict | None = None) -> dict:
        change = (mixed - plain) / plain if plain and not math.isnan(plain) else float("nan")
        report = {"plain": round(plain, 4), "mixed": round(mixed, 4), "change": round(change, 4),
                  "overrides": list(context.overrides)}
        if mix_report:
            report.update({k: mix_report.get(k) for k in ("synth", "rank", "gsub", "alpha", "ablate", "delta_norms")})
        write_atomic(Path(context.run_dir) / "perplexity.json", json.dumps(report, indent=2, default=str))
        return {"report": report}
