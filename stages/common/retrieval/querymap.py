"""A learned linear map of the question's MiniLM vector, for `select=hybrid` (`select.query_map`).

all-MiniLM-L6-v2 was trained on sentence pairs, not on descriptions next to code. A square matrix ``M``, applied
to the question's vector only (``q' = normalise(M q)``; window vectors and their cache stay as they are), was
fitted to put a docstring's first sentence next to the definition it documents, with every other window of the
same program as a negative: on programs other than the ones the README evaluates (`python -m bench.query_map`,
which writes the file and records how it was made in it). The shipped map lives in ``stages/data/``; a config
may name a shipped map or give a path to its own.

File format (npz, read with ``allow_pickle=False``): ``matrix`` (dim × dim, float32, finite) and ``meta`` (a JSON
string: programs, epochs, and the rest of the recipe).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import InputError
from stages.common.adapters.factors import load_npz, npz_bytes, shipped_or_path

SHIPPED = Path(__file__).resolve().parents[2] / "data"
SUFFIX = ".npz"


def resolve(name: str) -> Path:
    """A shipped map's name (`minilm_code_search`) or a path to an .npz file."""
    # the folder also holds the encoder's LoRA adapters (stages.common.retrieval.encoder_lora): not maps
    known = [p.stem for p in SHIPPED.glob(f"*{SUFFIX}") if not p.stem.endswith("_lora")]
    return shipped_or_path(name, SHIPPED, "select.query_map", "map", known)


def load(name: str, dim: int | None = None) -> np.ndarray:
    """The map's square float32 matrix (``dim`` × ``dim`` when given: the encoder's width); a bad file is an
    InputError naming it and what is wrong."""
    path = resolve(name)
    stat = path.stat()
    matrix = _load(str(path), stat.st_mtime_ns, stat.st_size)
    if dim is not None and matrix.shape != (dim, dim):
        raise InputError(f"select.query_map file '{path}': 'matrix' is {matrix.shape[0]}x{matrix.shape[1]}, the "
                         f"sentence encoder's vectors have {dim} dimensions")
    return matrix


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> np.ndarray:
    try:
        arrays = load_npz(Path(path))  # no unpickling; a member declaring too many bytes is refused from its header
    except InputError as err:
        raise InputError(f"select.query_map file '{path}' is not a readable npz file ({err})") from err
    if "matrix" not in arrays:
        raise InputError(f"select.query_map file '{path}' has no 'matrix' array (it has: {', '.join(arrays)})")
    matrix = arrays["matrix"]
    if matrix.dtype.kind != "f" or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.size:
        raise InputError(f"select.query_map file '{path}': 'matrix' must be a square float array, got "
                         f"{matrix.dtype} {tuple(matrix.shape)}")
    if not np.isfinite(matrix).all():
        raise InputError(f"select.query_map file '{path}': 'matrix' holds NaN or inf")
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)  # shared by every question of the process
    return matrix


def apply(matrix: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Rows mapped and L2-normalised again (a row mapped to zero stays zero)."""
    mapped = vectors @ matrix.T
    norms = np.linalg.norm(mapped, axis=-1, keepdims=True)
    return (mapped / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def write(path: Path, matrix: np.ndarray, meta: dict) -> None:
    """Write a map file atomically (the format ``load`` reads; the same matrix and meta give the same bytes)."""
    arrays = {"matrix": np.asarray(matrix, dtype=np.float32), "meta": np.array(json.dumps(meta, sort_keys=True))}
    write_atomic(path, npz_bytes(arrays))
