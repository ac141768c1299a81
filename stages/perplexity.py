"""Stage `perplexity` (docs/behaviour.md §4b): how well the model, as currently mixed, knows the program's own text.

It scores two splits the fitted synthesizer never trains on (`stages.common.program.corpus.split`, the same function
and knobs the synthesizer uses): held-out segments of trained files, and whole held-out files
(`held_out_files`, generalisation to code the adapter never saw). Wire it to `model.lm` for the plain model and
to `mix.lm` for the mixed one, so the numbers go through the real mix path (capacity, target weights,
schedules, delta cap, gsub blend). Given the artifacts, it checks that the build held out the same files.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.adapters.lock import exclusive
from stages.common.program.corpus import perplexity, split, spread
from stages.common.types import Artifacts, LanguageModel, ProgramIndex


class ProgramPerplexity(Stage):
    outputs = {"perplexity": float, "files_perplexity": float}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        seq_len: Annotated[int, Range(ge=8)] = 256
        val_every: Annotated[int, Range(ge=2)] = 5
        seed: int = 0
        held_out_files: Annotated[float, Range(ge=0, le=0.5)] = 0.1
        split: Literal["held_out", "train"] = "held_out"
        max_pieces: Annotated[int, Range(ge=1)] = 32
        batch_size: Annotated[int, Range(ge=1)] = 4

    config: Config

    def run(self, index: ProgramIndex, lm: LanguageModel, artifacts: Artifacts | None = None) -> dict:
        c = self.config
        corpus = split(index, lm.tokenizer, c.seq_len, c.val_every, c.held_out_files, c.seed)
        synth = (artifacts.manifest.get("synth") or {}) if artifacts is not None else {}
        if artifacts is not None and synth.get("name") == "fitted":  # a fitted build trained on every file it did not list as held out
            trained_on = set(corpus.files) - set(synth.get("held_out_files") or [])
            if trained_on:
                raise ConfigError(f"perplexity.held_out_files={c.held_out_files} holds out "
                                  f"'{sorted(trained_on)[0]}', which the build at '{artifacts.path}' trained on; "
                                  "set corpus.held_out_files (the synthesizer and this stage both read it) or rebuild")
        chosen = corpus.evaluation(c.max_pieces)["held_out"] if c.split == "held_out" else spread(corpus.train, c.max_pieces)
        files = corpus.evaluation(c.max_pieces)["held_out_files"]
        with exclusive(lm):  # the model as this graph mixed it (or plain), never another thread's mix
            return {"perplexity": perplexity(lm.model, chosen, c.batch_size) if chosen else float("nan"),
                    "files_perplexity": perplexity(lm.model, files, c.batch_size) if files else float("nan")}


def _change(plain: float, mixed: float) -> float:
    return (mixed - plain) / plain if plain and not math.isnan(plain) and not math.isnan(mixed) else float("nan")


class PerplexityReport(Stage):
    """Plain vs mixed perplexity on both held-out splits, printed and written to `perplexity.json`."""

    outputs = {"report": dict}

    def run(self, context: RunContext, plain: float, mixed: float, files_plain: float | None = None,
            files_mixed: float | None = None, mix_report: dict | None = None) -> dict:
        report: dict[str, Any] = {"plain": round(plain, 4), "mixed": round(mixed, 4),
                                  "change": round(_change(plain, mixed), 4)}
        if files_plain is not None and files_mixed is not None:
            report.update({"files_plain": round(files_plain, 4), "files_mixed": round(files_mixed, 4),
                           "files_change": round(_change(files_plain, files_mixed), 4)})
        report["overrides"] = list(context.overrides)
        if mix_report:
            report.update({k: mix_report.get(k) for k in ("synth", "rank", "gsub", "alpha", "ablate", "delta_norms")})
        write_atomic(Path(context.run_dir) / "perplexity.json", json.dumps(report, indent=2, default=str))
        return {"report": report}
