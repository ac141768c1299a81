"""A checkpoint folder kept as a cache that heals: checked before use, remade when missing or corrupt.

The converted copy of a GGUF (stages/common/models/gguf.py) and its copy in a lower precision are such folders. The
writer records the sha256 of every file (``DIGESTS``); the folder a model is loaded from, or copied from, is checked
against them in full (0.14 s for SmolLM2-135M's bfloat16 copy), any other only cheaply (lengths, JSON): bytes damaged
in place without changing a length are caught before they reach the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from pipeline.engine.cache import clean_stale_partials, discard, publish_dir, write_atomic
from stages.common.adapters.weightfile import HeaderError, read_header
from stages.common.generation.precision import torch_dtype

log = logging.getLogger(__name__)
DIGESTS = "digests.json"  # {"sha256": {file: hex digest}} of every other file of the folder, written with it


def checked_copy(folder: Path, make: Callable[[Path], None], deep: bool = True) -> Path:
    """``folder``, a checkpoint cache: checked (``deep``: every file against its recorded digest too), made when
    missing or corrupt (``make(tmp)`` writes it; it is published atomically with its digests), and half-written
    folders of killed writers beside it removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(folder.parent)
    if folder.exists():
        problem = checkpoint_problem(folder) or (digest_problem(folder) if deep else None)
        if problem:
            log.warning("the converted model '%s' is corrupt (%s); removing it and converting again", folder, problem)
            discard(folder)
    if not folder.exists():
        with publish_dir(folder) as tmp:
            make(tmp)
            record_digests(tmp)
    return folder


def dtype_copy(converted: Path, dtype: str, verified: Callable[[], Path] | None = None) -> Path:
    """The float32 copy ``converted`` saved in ``dtype`` beside it (made once): loading it reads half the bytes and
    never holds the float32 tensors and their cast at once (+830 MiB at the model node when cast at load).
    ``verified()``, when given, checks ``converted`` in full (healing it) before it is read to make the copy."""
    if dtype == "float32":
        return converted

    def cast(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = verified() if verified is not None else converted
        log.info("saving a %s copy of %s once", dtype, source.name)
        AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype)).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)

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


def _files(folder: Path) -> list[Path]:
    """The files a checkpoint folder's digests cover: every file but hidden ones (lock and temporary files) and
    ``DIGESTS`` itself."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != DIGESTS)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def record_digests(folder: Path) -> None:
    """Write ``DIGESTS`` for the files ``folder`` holds now (its writer calls this before publishing it)."""
    digests = {p.relative_to(folder).as_posix(): file_sha256(p) for p in _files(folder)}
    write_atomic(folder / DIGESTS, json.dumps({"sha256": digests}, indent=1, sort_keys=True))


def digest_problem(folder: Path) -> str | None:
    """Why ``folder``'s files are not what its writer recorded (None when every digest matches): no record (made
    before digests were kept), a file missing or not recorded, or content changed in place."""
    try:
        recorded = json.loads((folder / DIGESTS).read_text())["sha256"]
    except FileNotFoundError:
        return f"no {DIGESTS} (written before content digests were recorded)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{DIGESTS}: {type(err).__name__}"
    if not isinstance(recorded, dict):
        return f"{DIGESTS}: not a table of digests"
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    unrecorded = sorted(present - recorded.keys())
    if unrecorded:
        return f"{unrecorded[0]}: not among the files recorded in {DIGESTS}"
    for name, digest in sorted(recorded.items()):
        if name not in present:
            return f"{name}: recorded in {DIGESTS} but missing"
        try:
            if file_sha256(folder / name) != digest:
                return f"{name}: its content differs from the sha256 recorded when it was written (damaged in place?)"
        except OSError as err:
            return f"{name}: {type(err).__name__}: {err.strerror or err}"
    return None
