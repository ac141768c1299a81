"""A checkpoint folder kept as a cache that heals: checked cheaply before use, remade when missing or corrupt.

The converted copy of a GGUF (stages/common/models/gguf.py) and its copy in a lower precision are such folders.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline.engine.cache import clean_stale_partials, discard, publish_dir
from stages.common.adapters.weightfile import HeaderError, read_header
from stages.common.generation.precision import torch_dtype

log = logging.getLogger(__name__)


def checked_copy(folder: Path, make: Callable[[Path], None]) -> Path:
    """``folder``, a checkpoint cache: checked, made when missing or corrupt (``make(tmp)`` writes it; it is published
    atomically), and half-written folders of killed writers beside it removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(folder.parent)
    if folder.exists():
        problem = checkpoint_problem(folder)
        if problem:
            log.warning("the converted model '%s' is corrupt (%s); removing it and converting again", folder, problem)
            discard(folder)
    if not folder.exists():
        with publish_dir(folder) as tmp:
            make(tmp)
    return folder


def dtype_copy(converted: Path, dtype: str) -> Path:
    """The float32 copy ``converted`` saved in ``dtype`` beside it (made once): loading it reads half the bytes and
    never holds the float32 tensors and their cast at once (+830 MiB at the model node when cast at load)."""
    if dtype == "float32":
        return converted

    def cast(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("saving a %s copy of %s once", dtype, converted.name)
        AutoModelForCausalLM.from_pretrained(converted, dtype=torch_dtype(dtype)).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(converted).save_pretrained(tmp)

    return checked_copy(converted.with_name(f"{converted.name}-{dtype}"), cast)


def checkpoint_problem(folder: Path) -> str | None:
    """Cheap checks of a saved checkpoint folder (no tensor is read): config.json parses, and every safetensors
    file is exactly as long as its header says (a truncated copy is the usual damage)."""
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"config.json: {type(err).__name__}"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no .safetensors file"
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length, header = read_header(handle, size)
    except HeaderError as err:
        return str(err)
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, its header describes {expected} (truncated?)"
    return None
