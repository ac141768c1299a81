"""Bench rows of decoding engines (issue 38, item 1): one GGUF file, one ~2,000-token prompt, greedy decoding, read by
transformers (bfloat16, the model stage's converted copy) and by llama.cpp (`llama-cpp-python`, an optional extra):
prefill and decode tokens/s, each engine beside the memory-bandwidth floor of the weights it reads per token."""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from bench.decoding import DECODE_TOKENS, _bytes_per_token, _copy_bandwidth, _not_fetched, _plain_generate
from bench.harness import row
from pipeline import PROJECT_ROOT
from stages.common.models.requantize import EngineWeights, engine_file

ENGINE_MODELS = ("smollm2", "qwen_coder_0_5b", "qwen_coder_1_5b")
PREFILL_TOKENS = 2000
# llama.cpp's batch sizes: the prompt is evaluated n_batch tokens a call, in micro-batches of n_ubatch
LLAMA_BATCH = 2048
LLAMA_UBATCH = 512
ENGINE_WEIGHTS: tuple[EngineWeights, ...] = ("gguf", "bf16", "q8_0", "q4_0")  # decode.engine_weights


def engines(names: Sequence[str] = ENGINE_MODELS) -> list[dict]:
    """Per model: prefill and decode tokens/s of llama.cpp against transformers bfloat16 on the same token ids."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return [row("engines: skipped, llama-cpp-python is not installed", 0.0, 0.0, 0.0, "report", True, "tokens/s",
                    "skipped: pip install -e '.[engines]' (builds llama.cpp from its sdist; docs/howto/engines.md)")]
    rows: list[dict] = []
    bandwidth = max(_copy_bandwidth() for _ in range(3))  # once for all rows: a single copy run varies by 1.5x here
    for name in names:
        missing = _not_fetched(name) if name != "smollm2" else ""
        if missing:
            rows.append(row(f"engines ({name}): skipped, not fetched", 0.0, 0.0, 0.0, "report", True, "tokens/s",
                            f"skipped: {missing}"))
            continue
        rows += _engine_rows(name, bandwidth)
    return rows


def model_stage(name: str):
    """The `model` node's stage of ``model=<name>`` in bfloat16 (its `gguf_path()` is the file llama.cpp reads)."""
    from pipeline import api
    from pipeline.engine.graph import build_graph

    stage = build_graph(api.compose([f"model={name}", "model.dtype=bfloat16"])).instantiate().nodes["model"].stage
    assert stage is not None  # the model node always has a stage
    return stage


def prompt_ids(tokenizer, tokens: int = PREFILL_TOKENS) -> list[int]:
    """``tokens`` ids of this project's own source text (the same ids go to both engines)."""
    text = "\n".join(p.read_text() for p in sorted((PROJECT_ROOT / "pipeline").rglob("*.py")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise RuntimeError(f"the prompt text has {len(ids)} tokens, fewer than {tokens}")
    return ids[:tokens]


def _llama_run(gguf: Path, ids: list[int], threads: int, tokens: int = DECODE_TOKENS) -> dict:
    """llama.cpp: the prompt evaluated (prefill seconds), then ``tokens`` greedy tokens one at a time (tokens/s)."""
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    from stages.common.generation.llamacpp import quiet_logs

    quiet_logs()  # llama.cpp's context lines to the debug log, as in an answer
    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + tokens + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=LLAMA_BATCH, n_ubatch=LLAMA_UBATCH, verbose=False)
    try:
        started = time.perf_counter()
        llm.eval(ids)
        prefilled = time.perf_counter()
        out = []
        vocab = llm.n_vocab()
        for _ in range(tokens):
            # the last position's logits from the context itself: Llama.scores is only written with logits_all=True
            token = int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))
            out.append(token)
            llm.eval([token])
        end = time.perf_counter()
    finally:
        llm.close()
    return {"prefill": prefilled - started, "tps": tokens / (end - prefilled), "ids": out}


def _engine_rows(name: str, bandwidth: float) -> list[dict]:
    import torch

    from pipeline.engine import resources

    resources.clear("model")
    stage = model_stage(name)
    lm = stage.run()["lm"]
    ids = prompt_ids(lm.tokenizer)
    threads = torch.get_num_threads()
    gguf = stage.gguf_path()
    ours = _plain_generate(lm, ids)
    weights, kv = _bytes_per_token(lm, len(ids) + DECODE_TOKENS // 2)
    del lm
    resources.clear("model")
    tf_floor = bandwidth / (weights + kv)
    common = (f"{len(ids)}-token prompt, {DECODE_TOKENS} greedy tokens, {threads} threads each, one run each; "
              f"llama.cpp n_batch {LLAMA_BATCH}, n_ubatch {LLAMA_UBATCH}")
    rows = []
    for kind in ENGINE_WEIGHTS:  # the file as fetched, then the copies decode.engine_weights can make
        path = engine_file(gguf, kind, Path(stage.config.cache_dir).expanduser()) if stage.config.cache_dir else gguf
        label = "Q4" if kind == "gguf" else f"{kind} copy"
        llama = _llama_run(path, ids, threads)
        # llama.cpp reads the file's bytes per token (every tensor once) plus its KV cache (float16: as bfloat16's)
        llama_floor = bandwidth / (path.stat().st_size + kv)
        same = sum(a == b for a, b in zip(ours["ids"], llama["ids"]))
        prefill_tf, prefill_llama = len(ids) / ours["prefill"], len(ids) / llama["prefill"]
        rows += [
            row(f"prefill tokens/s ({name}): llama.cpp {label} vs transformers bfloat16", prefill_llama, prefill_tf,
                prefill_llama / prefill_tf, "report", True, "tokens/s",
                f"{common}; {ours['prefill']:.1f} s vs {llama['prefill']:.1f} s"),
            row(f"decode tokens/s ({name}): llama.cpp {label} vs transformers bfloat16", llama["tps"], ours["tps"],
                llama["tps"] / ours["tps"], ">= 0.5 of its floor", llama["tps"] >= 0.5 * llama_floor, "tokens/s",
                f"{common}; floors {llama_floor:.0f} tokens/s ({path.name}, {path.stat().st_size / 2**20:.0f} MiB) "
                f"and {tf_floor:.0f} (bfloat16 {weights / 2**20:.0f} MiB), copy bandwidth {bandwidth / 1e9:.1f} GB/s: "
                f"llama.cpp at {llama['tps'] / llama_floor:.0%}, transformers at {ours['tps'] / tf_floor:.0%}; the "
                f"first {DECODE_TOKENS} greedy tokens agree on {same} (llama.cpp's weights vs the bfloat16 conversion)"),
        ]
    return rows
