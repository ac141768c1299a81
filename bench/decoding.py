"""Bench rows of decoding: tokens/s against plain generate and its floor, mix modes, prefill reuse, precisions."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from bench.harness import ENV, PROGRAM_80, row
from pipeline import PROJECT_ROOT

DECODE_TOKENS = 64
DECODE_PROMPT = "How does Hydra compose the config from the defaults list?"


class _Clock:
    """A logits processor that notes its first call: the prompt's forward pass (prefill) is done by then."""

    def __init__(self):
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def _plain_generate(lm, ids: list[int], tokens: int = DECODE_TOKENS, **extra) -> dict:
    """transformers' own generate, greedy, exactly ``tokens`` new tokens: prefill seconds and decode tokens/s."""
    import torch
    from transformers import LogitsProcessorList

    clock = _Clock()
    input_ids = torch.tensor([ids])
    started = time.perf_counter()
    with torch.no_grad():
        out = lm.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=tokens, min_new_tokens=tokens, logits_processor=LogitsProcessorList([clock]),
                                pad_token_id=lm.tokenizer.pad_token_id, **extra)
    end = time.perf_counter()
    new = out.shape[1] - input_ids.shape[1]
    return {"prefill": clock.first - started, "tps": new / (end - clock.first), "tokens": new,
            "ids": out[0, input_ids.shape[1]:].tolist()}


def _copy_bandwidth() -> float:
    """Bytes moved per second (read + write) by a 256 MiB tensor copy, best of 5, torch's threads as set."""
    import torch

    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() / best


def _bytes_per_token(lm, context: int) -> tuple[int, int]:
    """Weights read for one token (every parameter once: the tied LM head reads the embedding table) and the KV cache
    read at ``context`` positions."""
    from stages.common.generation.precision import weight_bytes

    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * context * next(lm.model.parameters()).element_size()
    return weight_bytes(lm.model), kv


def _answer_args(extra: Sequence[str] = ()) -> list[str]:
    n = str(DECODE_TOKENS)
    # exactly n tokens on both sides: the reply stops (paragraphs, repeated line) would end ours early
    return [f"program_root={PROGRAM_80}", f"prompt={DECODE_PROMPT}", f"decode.max_new_tokens={n}",
            f"decode.min_new_tokens={n}", f"fallback.max_new_tokens_floor={n}", "decode.max_paragraphs=null",
            "decode.max_sentences=null", "decode.stop_at_repeated_line=false", "decode.stop_at_repeated_words=null",
            *extra]


def _multirun(overrides: list[str]) -> tuple[float, list[dict]]:
    """Seconds of one `-m` multirun and each job's decoding record (from its telemetry), in job order."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pipeline.run", "-m", *overrides, f"hydra.sweep.dir={tmp}"],
                              cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        drafts = [json.loads(path.read_text()).get("decoding") or {} for path in sorted(Path(tmp).glob("*/telemetry.json"),
                                                                                        key=lambda p: int(p.parent.name))]
    return seconds, drafts


def decode_sweep() -> dict:
    """Issue 13, item 5: a sweep whose jobs differ only in how they decode (same model, mix and prompt) reuses the
    first job's prompt cache and lead scores (`decode.reuse_prefill`, on by default) against the same multirun with
    every job encoding its prompt. Interleaved: off, on, off, on; the best of each."""
    common = ["pipeline=answer", *_answer_args(), "decode.repetition_penalty=1.0,1.1,1.2,1.3",
              "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    runs: dict[bool, list[float]] = {True: [], False: []}
    prefill: dict[bool, list[float]] = {True: [], False: []}
    for reuse in (False, True, False, True):
        seconds, drafts = _multirun([*common, f"decode.reuse_prefill={str(reuse).lower()}"])
        runs[reuse].append(seconds)
        prefill[reuse].extend(d.get("prefill_seconds", 0.0) for d in drafts[1:])
    on, off = min(runs[True]), min(runs[False])
    n = 4
    return row(f"multirun (decode sweep): {n} jobs, prompt cache reused vs encoded in every job", on, off, off / on,
               "report (issue 13, item 5)", True, "s",
               f"{n} jobs of decode.repetition_penalty, {DECODE_TOKENS} new tokens each; prefill of jobs 2-{n}: "
               f"{sum(prefill[True]) / max(len(prefill[True]), 1):.2f} s reused vs "
               f"{sum(prefill[False]) / max(len(prefill[False]), 1):.2f} s encoded (lead choice included)")


def decode_floor() -> list[dict]:
    """Our decode vs plain transformers.generate on the same prompt and weights vs the memory-bandwidth floor; the
    mix mode's cost per token; plain transformers' prompt-lookup decoding. Interleaved, best of two for ours and the
    peer."""
    import numpy as np
    import torch

    from pipeline import api
    from pipeline.engine import resources
    from stages.common.adapters.factors import TARGETS, infer_targets
    from stages.common.adapters.mixing import AdapterMix, MixSettings
    from stages.common.adapters.synthesis import synthesize

    # ours unmixed (synth=none), like the peer: this row weighs the decode's own machinery (lead choice, grounding
    # processors, reply stops); what a mixed adapter costs per token is the mix-mode rows' business
    unmixed = _answer_args(["synth=none"])
    api.run(unmixed)  # warm: model, index and artifacts cached
    lm = resources.values("model")[-1]
    ours, plain, ids = [], [], []
    for _ in range(2):
        _, result = api.run(unmixed)
        draft = result.output("decode", "draft")
        ours.append(draft.tokens_per_second)
        ids = result.output("scaffold", "prompt").ids
        plain.append(_plain_generate(lm, ids)["tps"])
    weights, kv = _bytes_per_token(lm, len(ids) + DECODE_TOKENS // 2)
    bandwidth = _copy_bandwidth()
    floor = bandwidth / (weights + kv)
    best_ours, best_plain = max(ours), max(plain)
    threads = torch.get_num_threads()
    rows = [
        row("decode tokens/s: our answer vs plain transformers.generate (same prompt, same weights)", best_ours,
            best_plain, best_ours / best_plain, ">= 0.95", best_ours / best_plain >= 0.95, "tokens/s",
            f"{len(ids)}-token prompt, {DECODE_TOKENS} new tokens, {str(lm.model.dtype).removeprefix('torch.')}, "
            f"{threads} torch threads; ours "
            f"{', '.join(f'{x:.1f}' for x in ours)}, plain {', '.join(f'{x:.1f}' for x in plain)} (ours: default "
            f"answer config with synth=none, grounding processors on; both unmixed)"),
        row("decode tokens/s: plain generate vs memory-bandwidth floor", best_plain, floor, best_plain / floor,
            "report", True, "tokens/s",
            f"floor = copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write, 256 MiB) / (weights {weights / 2**20:.0f} MiB "
            f"+ KV cache {kv / 2**20:.0f} MiB read per token)"),
    ]
    tmap = infer_targets(lm.model)
    adapters = synthesize(np.random.default_rng(0).standard_normal(1536), tmap.num_layers, tmap.shapes, list(TARGETS), 12, 0)
    settings = MixSettings(0.25, 16.0, 12, {}, [1.0] * tmap.num_layers, {}, 0.05)
    per_mode: dict[str, float] = {}
    modes: tuple[Literal["hooks", "merge"] | None, ...] = (None, "hooks", "merge")
    for _ in range(3):  # interleaved rounds, best of each: one round in a fixed order put merge at 0.89x unmixed
        for mix_mode in modes:
            mix = AdapterMix(lm, tmap, mix_mode, adapters, None, 16.0) if mix_mode else None
            if mix:
                mix.apply(settings)
            try:
                tps = _plain_generate(lm, ids)["tps"]
            finally:
                if mix:
                    mix.restore()
            per_mode[mix_mode or "none"] = max(tps, per_mode.get(mix_mode or "none", 0.0))
    for mode in ("hooks", "merge"):
        rows.append(row(f"decode tokens/s with the adapter mixed (mix.mode={mode}) vs unmixed", per_mode[mode],
                        per_mode["none"], per_mode[mode] / per_mode["none"], "report", True, "tokens/s",
                        "plain generate, rank 12 x 7 targets x 30 layers; " + ("two small matmuls per target per token"
                                                                                if mode == "hooks" else "delta written into the weights: no cost per token")))
    lookups = [(_plain_generate(lm, ids), _plain_generate(lm, ids, prompt_lookup_num_tokens=10)) for _ in range(1)]
    base, lookup = lookups[0]
    rows.append(row("decode tokens/s: prompt-lookup decoding (10 tokens) vs plain greedy", lookup["tps"], base["tps"],
                    lookup["tps"] / base["tps"], "report", True, "tokens/s",
                    f"plain generate, same prompt; same tokens: {lookup['ids'] == base['ids']} (plain transformers' "
                    "prompt-lookup only: our decode has no such setting)"))
    return rows


def _precisions() -> list[tuple[str, list[str]]]:
    """float32, bfloat16, and int8 where torchao (the optional `quantize` extra) is installed."""
    import importlib.util

    got = [("float32", ["model.dtype=float32"]), ("bfloat16", ["model.dtype=bfloat16"])]
    return got + ([("int8", ["model.dtype=float32", "model.quantize=int8"])] if importlib.util.find_spec("torchao") is not None else [])


def precision() -> list[dict]:
    """Weight dtype and int8 quantization: prefill seconds and decode tokens/s of plain generate on our prompt, and
    held-out program perplexity (pipeline=perplexity, plain and mixed) — an option is kept only within 2% of float32."""
    from pipeline import api
    from pipeline.engine import resources
    measured = {}
    ids: list[int] = []
    precisions = _precisions()
    for name, overrides in precisions:
        resources.clear("model")
        _, result = api.run(_answer_args([*overrides, "mix.mode=hooks"]))
        ids = ids or result.output("scaffold", "prompt").ids
        lm = resources.values("model")[-1]
        gen = _plain_generate(lm, ids)
        _, ppl = api.run(["pipeline=perplexity", f"program_root={PROGRAM_80}", *overrides, "mix.mode=hooks"])
        report = ppl.output("ppl_report", "report")
        measured[name] = {**gen, "plain": report["plain"], "mixed": report["mixed"],
                          "answer_tps": result.output("decode", "draft").tokens_per_second}
    resources.clear("model")
    base = measured["float32"]
    rows = []
    for name, _ in precisions[1:]:
        got = measured[name]
        change = (got["plain"] - base["plain"]) / base["plain"]
        change_mixed = (got["mixed"] - base["mixed"]) / base["mixed"]
        ok = abs(change) <= 0.02 and abs(change_mixed) <= 0.02
        rows.append(row(f"decode tokens/s with {name} weights vs float32 (plain generate)", got["tps"], base["tps"],
                        got["tps"] / base["tps"], "perplexity within 2%", ok, "tokens/s",
                        f"prefill {got['prefill']:.2f} s vs {base['prefill']:.2f} s ({len(ids)} tokens); held-out "
                        f"perplexity plain {base['plain']:.3f} -> {got['plain']:.3f} ({change:+.2%}), mixed "
                        f"{base['mixed']:.3f} -> {got['mixed']:.3f} ({change_mixed:+.2%}); our answer's decode "
                        f"{got['answer_tps']:.1f} vs {base['answer_tps']:.1f} tokens/s"))
    return rows


QWEN_MODELS = ("qwen_coder_0_5b", "qwen_coder_1_5b")


def _not_fetched(name: str) -> str:
    """'' when the model's assembled file is in the cache and verified, else why not (with the fetch command)."""
    from pipeline import models

    spec, dest = models.spec_and_dest(name)
    path = dest / spec.file
    problem = models.verified(path, spec.size, spec.sha256) if path.is_file() else "is not fetched"
    return f"{path} {problem}; fetch it with: python -m pipeline.models fetch {name}" if problem else ""


def qwen_decode(names: Sequence[str] = QWEN_MODELS) -> list[dict]:
    """Issue 34, item 1: the decode-floor rows for the Qwen2.5-Coder models, per precision (float32, bfloat16, int8
    where torchao is installed): our answer's decode (synth=none) vs plain transformers.generate on the same prompt
    and weights, one measurement each, the memory-bandwidth floor in the detail. A model not fetched is a row that
    says so."""
    from pipeline.engine import resources

    rows = []
    for name in names:
        missing = _not_fetched(name)
        if missing:
            rows.append(row(f"decode tokens/s ({name}): skipped, not fetched", 0.0, 0.0, 0.0, "report", True,
                            "tokens/s", f"skipped: {missing}"))
            continue
        precisions = _precisions()
        rows += [_qwen_row(name, precision, overrides) for precision, overrides in precisions]
        if "int8" not in dict(precisions):
            rows.append(row(f"decode tokens/s ({name}, int8): skipped, no torchao", 0.0, 0.0, 0.0, "report", True,
                            "tokens/s", "skipped: int8 needs torchao (pip install -e '.[quantize]')"))
    resources.clear("model")
    return rows


def _qwen_row(name: str, precision: str, overrides: list[str]) -> dict:
    import torch

    from pipeline import api
    from pipeline.engine import resources

    resources.clear("model")
    started = time.perf_counter()
    _, result = api.run(_answer_args([f"model={name}", "synth=none", *overrides]))
    seconds = time.perf_counter() - started
    ours = result.output("decode", "draft").tokens_per_second
    ids = result.output("scaffold", "prompt").ids
    lm = resources.values("model")[-1]
    plain = _plain_generate(lm, ids)
    weights, kv = _bytes_per_token(lm, len(ids) + DECODE_TOKENS // 2)
    floor = _copy_bandwidth() / (weights + kv)
    return row(
        f"decode tokens/s ({name}, {precision}): our answer vs plain transformers.generate", ours, plain["tps"],
        ours / plain["tps"], ">= 0.95", ours / plain["tps"] >= 0.95, "tokens/s",
        f"{len(ids)}-token prompt, {DECODE_TOKENS} new tokens, {torch.get_num_threads()} torch threads, one run each "
        f"(shared machine: noisy); plain prefill {plain['prefill']:.1f} s; floor {floor:.1f} tokens/s (copy bandwidth "
        f"/ weights {weights / 2**20:.0f} MiB + KV {kv / 2**20:.0f} MiB), plain at {plain['tps'] / floor:.0%} of it; "
        f"whole answer {seconds:.0f} s (first load included)")
