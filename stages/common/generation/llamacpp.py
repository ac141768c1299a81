"""llama.cpp as the engine of `decode.engine=llamacpp`: the model stage's own GGUF file, run by llama.cpp's CPU kernels
(`llama-cpp-python`, the optional `engines` extra) from the token ids our tokenizer made.

`LlamaCppEngine` keeps one KV cache and the ids it holds: `advance` runs only what a prompt adds to the longest
prefix already there (a later answer about the same program reuses the system prompt and the evidence it shares; the
neutral prompt of the lead calibration shares everything before the question), and `score` gives the
log-probabilities of candidate continuations, then removes them from the cache again. Everything else of a decode
(our logits processors, stops, streaming) stays ours: stages/common/generation/llamacpp_generate.py.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import threading
import weakref
from pathlib import Path
from typing import Any, cast

from pipeline.engine import resources
from pipeline.engine.errors import ConfigError, InputError
from stages.common.generation.continuations import common_prefix
from stages.common.models.requantize import is_gguf

BATCH = 2048  # prompt tokens per llama_decode call (the bench measured no gain from larger micro-batches)
UBATCH = 512
SEQUENCES = 32  # the prompt's sequence and up to 31 candidates scored in one llama_decode
MIN_CONTEXT = 4096  # a default answer fits: evidence, question and reply (conf/config.yaml max_question_tokens)
_LOADING = threading.Lock()
log = logging.getLogger(__name__)


def require_llama_cpp() -> Any:
    """The llama_cpp module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ConfigError("decode.engine=llamacpp needs llama-cpp-python: pip install -e '.[engines]' "
                          f"(builds llama.cpp from its sdist; docs/howto/engines.md) [{err}]") from None
    return llama_cpp


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppEngine:
    """One GGUF model and one context (``n_ctx`` positions) in llama.cpp; ``lock`` is held for a whole decode."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import numpy as np

        llama_cpp = require_llama_cpp()
        from llama_cpp import _internals

        llama_cpp.llama_backend_init()  # idempotent; the Llama class does the same once per process
        quiet_logs()
        if not is_gguf(path):
            raise InputError(f"'{path}' is not a GGUF file")
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = _LoadedModel(llama_cpp, path, model_params)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, BATCH, UBATCH
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # candidates are scored side by side as sequences sharing the prompt's cells (one cache: kv_unified)
        params.n_seq_max, params.kv_unified = SEQUENCES, True
        # LlamaContext reads only the model's pointer: our holder stands in for llama-cpp-python's LlamaModel
        self.context = _internals.LlamaContext(model=cast(Any, self.model), params=params, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=BATCH, embd=0, n_seq_max=1, verbose=False)
        self.path, self.n_ctx, self.vocab = path, n_ctx, self.model.vocab_size
        self.tokens: list[int] = []  # the ids the KV cache holds, in order
        self.next_logits: Any = None  # float32 logits after ``tokens`` (a copy)
        self.lock = threading.Lock()
        self.ran = 0  # tokens run through the model so far (telemetry: what the cache's reuse saved)
        self._np = np

    def logits_at(self, row: int) -> Any:
        """A copy of the logits of the last decode's ``row`` (-1: its last token)."""
        pointer = self.context.get_logits_ith(row)
        return self._np.ctypeslib.as_array(pointer, shape=(self.vocab,)).copy()

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> None:
        if start + len(ids) > self.n_ctx:
            raise InputError(f"the prompt and reply need {start + len(ids)} positions; llama.cpp's context holds "
                             f"{self.n_ctx}")
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the GGUF's vocabulary of {self.vocab}")
        self.batch.set_batch(ids, n_past=start, logits_all=all_logits)
        self.context.decode(self.batch)
        self.ran += len(ids)

    def advance(self, ids: list[int]) -> Any:
        """Make the cache hold exactly ``ids`` (running only what the held prefix lacks); the logits after them."""
        if not ids:
            raise ValueError("advance: no tokens")
        if ids == self.tokens and self.next_logits is not None:
            return self.next_logits
        keep = min(common_prefix(self.tokens, ids), len(ids) - 1)  # the last token runs again for its logits
        self.context.kv_cache_seq_rm(0, keep, -1)
        self.tokens, self.next_logits = list(ids[:keep]), None
        for at in range(keep, len(ids), BATCH):
            part = ids[at:at + BATCH]
            self._decode(part, at, False)
            self.tokens += part
        self.next_logits = self.logits_at(-1)
        return self.next_logits

    def score(self, candidates: list[list[int]]) -> list[list[float]]:
        """Per candidate, the log-probability of each of its tokens after the held ids (the cache is left as it was).
        A candidate's first token is scored by the held logits; the rest's predecessors go through the model side by
        side, each candidate a sequence that shares the held positions (up to SEQUENCES - 1 and BATCH tokens a call)."""
        if self.next_logits is None:
            raise ValueError("score: advance to a prompt first")
        np = self._np
        first = _log_softmax(np, self.next_logits)
        scores = [[float(first[c[0]])] if c else [] for c in candidates]
        order = [i for i, c in enumerate(candidates) if len(c) > 1]
        while order:
            group: list[int] = []
            while order and len(group) < SEQUENCES - 1 and (
                    not group or sum(len(candidates[i]) - 1 for i in group) + len(candidates[order[0]]) - 1 <= BATCH):
                group.append(order.pop(0))
            rows = self._run_side_by_side([candidates[i][:-1][:BATCH] for i in group])
            for i, start in zip(group, rows):
                wanted = candidates[i][1:BATCH + 1]
                scores[i] += [float(_log_softmax(np, self.logits_at(start + j))[t]) for j, t in enumerate(wanted)]
        return scores

    def _run_side_by_side(self, fed: list[list[int]]) -> list[int]:
        """Run each token list as its own sequence after the held positions; where each one's rows start."""
        held, batch = len(self.tokens), self.batch.batch
        if held + max(map(len, fed)) > self.n_ctx:
            raise InputError(f"a candidate needs {held + max(map(len, fed))} positions; llama.cpp's context holds "
                             f"{self.n_ctx}")
        starts, n = [], 0
        for seq, tokens in enumerate(fed, start=1):
            self.context.kv_cache_seq_cp(0, seq, 0, held)  # shares the held cells: nothing is copied
            starts.append(n)
            for j, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, held + j, 1
                batch.seq_id[n][0], batch.logits[n] = seq, True
                n += 1
        batch.n_tokens = n
        try:
            self.context.decode(self.batch)
            self.ran += n
        finally:
            for seq in range(1, len(fed) + 1):
                self.context.kv_cache_seq_rm(seq, -1, -1)
        return starts


class _LoadedModel:
    """A llama_model, freed when collected (llama-cpp-python's LlamaModel prints a traceback when its load fails);
    `LlamaContext` reads only its ``model`` pointer and keeps it alive."""

    def __init__(self, llama_cpp: Any, path: Path, params: Any):
        pointer = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if pointer is None:
            raise InputError(f"llama.cpp could not load '{path}' (not a model it can read)")
        self.model = pointer
        weakref.finalize(self, llama_cpp.llama_model_free, pointer)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(pointer)))


@functools.cache
def quiet_logs() -> Any:
    """llama.cpp's log lines go to our logger at debug level (`-v` shows them), not to stderr: llama-cpp-python's own
    callback maps ggml's log levels of an older release and prints warnings as errors. Failures still raise."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def to_debug_log(level: int, text: bytes, user_data: Any) -> None:
        log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    llama_cpp.llama_log_set(to_debug_log, ctypes.c_void_p(0))
    return to_debug_log  # cached: llama.cpp calls it for the life of the process


def _log_softmax(np: Any, logits: Any) -> Any:
    top = logits.max()
    return logits - (top + np.log(np.exp(logits - top).sum()))


def shared_engine(path: Path, needed: int, threads: int = 0) -> LlamaCppEngine:
    """The process's engine for ``path`` with room for ``needed`` positions (a bigger need makes a new context)."""
    threads = threads or _torch_threads()
    with _LOADING:  # two answers' first decodes must not load the file twice
        current = resources.get("llamacpp", (str(path), threads))
        if current is not None and current.n_ctx >= needed:
            return current
        n_ctx = max(MIN_CONTEXT, -(-needed // 1024) * 1024)
        engine = LlamaCppEngine(path, n_ctx, threads)
        resources.put("llamacpp", (str(path), threads), engine)
        return engine


def _torch_threads() -> int:
    """The intra-op threads torch computes with (OMP_NUM_THREADS or the cores): llama.cpp uses as many."""
    import torch

    return torch.get_num_threads()
