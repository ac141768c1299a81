"""The file `decode.engine=llamacpp` reads (`decode.engine_weights`): the model's GGUF as fetched, or a copy of it with
every tensor stored in one type, made once by llama.cpp's own `llama_model_quantize` into the model cache.

Why a copy can be faster (docs/results.md, "Engines"): Qwen's Q4_K_M file of the 0.5B model stores most tensors as
Q5_0 (its 896 columns are not a multiple of the k-quants' 256-value blocks), a type llama.cpp's CPU backend multiplies
row by row; bf16 and q4_0 copies go through its matrix kernels (tinyBLAS, repacked q4_0), so a prompt runs 1.9x
faster. bf16 holds the fetched values (as the transformers path's bfloat16 copy does); q8_0 and q4_0 quantize them again.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal

from pipeline.engine.cache import fingerprint
from pipeline.engine.errors import InputError

log = logging.getLogger(__name__)

EngineWeights = Literal["gguf", "bf16", "q8_0", "q4_0"]
FTYPES = {"bf16": 32, "q8_0": 7, "q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_BF16, _Q8_0, _Q4_0
GGUF_MAGIC = b"GGUF"
_WRITING = threading.Lock()


def engine_file(gguf: Path, weights: EngineWeights, cache_dir: Path) -> Path:
    """``gguf`` itself (`gguf`), or its copy in ``weights``' type under ``cache_dir``, made on the first call."""
    if weights == "gguf":
        return gguf
    st = gguf.stat()
    out = cache_dir / f"{gguf.stem}.{weights}-{fingerprint([gguf.name, st.st_size, st.st_mtime_ns], 12)}.gguf"
    with _WRITING:
        if is_gguf(out):
            return out
        if out.exists():
            log.warning("the %s copy '%s' is not a GGUF file; making it again", weights, out)
        _quantize(gguf, out, FTYPES[weights])
    return out


def is_gguf(path: Path) -> bool:
    """A file that starts as a GGUF does (a half-written or foreign file does not)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def _quantize(gguf: Path, out: Path, ftype: int) -> None:
    """llama.cpp writes the copy beside its final name; only a complete file is renamed into place."""
    import llama_cpp

    from stages.common.generation.llamacpp import quiet_logs

    quiet_logs()  # its per-tensor log lines would bury the CLI's output
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    log.info("writing %s once (llama.cpp's weights for decode.engine=llamacpp; seconds to a minute)", out.name)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, os.cpu_count() or 1
    try:
        code = llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), params)
        if code != 0 or not is_gguf(partial):
            raise InputError(f"llama.cpp could not write '{out.name}' from '{gguf.name}' (llama_model_quantize "
                             f"returned {code})")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
