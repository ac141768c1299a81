"""Bench rows of whole runs: one answer's overhead, model load, multirun sweeps, an answer against an earlier commit."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from bench.harness import ENV, PROGRAM_80, fresh_python, row
from pipeline import PROJECT_ROOT


def overhead() -> dict:
    """Wall time of one answer vs the time spent inside the model's forward passes."""
    from pipeline import api
    from pipeline.engine import resources
    args = ["program_root=" + str(PROGRAM_80), "prompt=How does Hydra compose the config from the defaults list?",
            "decode.max_new_tokens=128", "decode.min_new_tokens=128"]
    api.run(args)  # warm: model, index and build artifacts cached, as for a user's second question
    lm = resources.values("model")[-1]
    spent = {"s": 0.0}
    starts: list[float] = []
    pre = lm.model.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))
    post = lm.model.register_forward_hook(lambda m, a, o: spent.__setitem__("s", spent["s"] + time.perf_counter() - starts.pop()))
    try:
        started = time.perf_counter()
        _, result = api.run(args)
        wall = time.perf_counter() - started
    finally:
        pre.remove()
        post.remove()
    outside = (wall - spent["s"]) / wall
    retried = any(t.node == "decode_retry" and t.status == "ok" for t in result.trace)
    return row("pipeline overhead: share of one answer outside forward passes", wall, spent["s"], outside, "<= 0.05",
               outside <= 0.05, "s", f"{PROGRAM_80.name} ({len(list(PROGRAM_80.rglob('*.py')))} .py files), "
               f"128 new tokens, retry {'ran' if retried else 'not needed'}")


def model_load() -> dict:
    code = """
import json, time
t = time.perf_counter()
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama
from stages.model import SmolLM2
imports = time.perf_counter() - t
stage = SmolLM2(cache_dir={cache!r})
t = time.perf_counter(); stage.run(); print(json.dumps({{"s": time.perf_counter() - t, "imports": imports}}))
"""
    cache = str(PROJECT_ROOT / "outputs" / "cache" / "models")
    fresh_python(code.format(cache=cache))  # make sure the converted copy exists
    warm_runs = [fresh_python(code.format(cache=cache)) for _ in range(2)]
    warm = min(r["s"] for r in warm_runs)
    cold = fresh_python(code.format(cache=None))["s"]
    # torch + transformers imports cost the same either way and would hide the load itself; timed separately
    imports = min(r["imports"] for r in warm_runs)
    return row("model load: warm (converted copy) vs cold (GGUF)", warm, cold, cold / warm, ">= 10", cold / warm >= 10, "s",
               f"each in a fresh process, load call only; torch+transformers imports ({imports:.1f} s) before the clock")


def _sweep(pipeline: str, sweep: dict[str, list[str]], extra: list[str]) -> tuple[float, float, int]:
    """Seconds for the sweep as one `-m` multirun, and for the same jobs as separate processes."""
    common = [f"pipeline={pipeline}", f"program_root={PROGRAM_80}", "prompt=How are config groups composed?",
              "hydra/job_logging=disabled", "hydra/hydra_logging=disabled", *extra]
    jobs: list[list[str]] = [[]]
    for key, values in sweep.items():
        jobs = [job + [f"{key}={v}"] for job in jobs for v in values]
    base = [sys.executable, "-m", "pipeline.run"]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        done = subprocess.run(base + ["-m", *common, f"hydra.sweep.dir={tmp}/m",
                                      *[f"{k}={','.join(v)}" for k, v in sweep.items()]],
                              cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True)
        one = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        started = time.perf_counter()
        for i, job in enumerate(jobs):
            done = subprocess.run(base + [*common, *job, f"hydra.run.dir={tmp}/s{i}"], cwd=PROJECT_ROOT, env=ENV,
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(done.stderr.strip().splitlines()[-1])
        separate = time.perf_counter() - started
    return one, separate, len(jobs)


def multirun() -> list[dict]:
    """The same 8 jobs as one multirun (model, index and artifacts loaded once) and as 8 processes.

    What one process saves is a fixed cost per job (interpreter, torch/transformers imports, model load, index
    and artifact reads: the `model` node alone is ~6 s in a fresh process); what it cannot save is the job's own
    work. So the ratio is high for retrieval sweeps and bounded by decoding for answer sweeps.
    """
    rows = []
    for label, pipeline, sweep, extra in [
        ("retrieval sweep", "retrieve", {"rerank": ["heuristic", "none"], "pack": ["windows", "heads"],
                                         "select.top_k": ["4", "8"]}, []),
        ("answer sweep", "answer", {"rerank": ["heuristic", "none"], "mix.alpha": ["8", "16"],
                                    "pack": ["windows", "heads"]},
         ["decode.max_new_tokens=16", "decode.min_new_tokens=16", "fallback.max_new_tokens_floor=16"]),
    ]:
        one, separate, n = _sweep(pipeline, sweep, extra)
        saved = (separate - one) / n
        rows.append(row(f"multirun ({label}): {n} jobs in one process vs {n} processes", one, separate,
                        separate / one, ">= 3", separate / one >= 3, "s",
                        f"pipeline={pipeline}; per job: {one / n:.1f} s in the multirun, {separate / n:.1f} s as a "
                        f"process (fixed cost saved per job {saved:.1f} s)"))
    return rows


def answer_speed() -> dict:
    """One default answer against a scratch checkout of the main the answer and speed issues were filed against."""
    from bench.answer_peer import PEER_COMMIT, answer_vs_checkout

    ours, peer, detail = answer_vs_checkout(PROJECT_ROOT, PROGRAM_80, ENV)
    ratio = ours / peer
    return row(f"seconds per answer vs main at {PEER_COMMIT}", ours, peer, ratio, "<= 0.5 (<= 0.33 speed issue)",
               ratio <= 0.5, "s", detail)
