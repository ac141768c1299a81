"""The hashed multi-channel program embedding (docs/behaviour.md §3).

Every channel is a bag of ``(key, weight)`` features hashed into ``dim`` buckets with a hash-chosen sign;
channels are L2-normalised, weighted, summed and the sum normalised again. The subgraph embedding is the
same function applied to the selected files only.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np

from stages.common.program.text import tokens
from stages.common.types import ProgramIndex

CHANNELS = ("sym", "doc", "mod", "topo", "calls", "types", "tests", "text")
DEFAULT_WEIGHTS = {"sym": 1.0, "doc": 0.5, "mod": 0.2, "topo": 0.5, "calls": 0.25, "types": 0.20, "tests": 0.15,
                   "text": 0.25}


def stable_hash(key: str, seed: int) -> int:
    """64-bit blake2b of ``f"{seed}:{key}"``: the same on every machine and Python process."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def hash_features(features: dict[str, float], dim: int, seed: int) -> np.ndarray:
    vec: np.ndarray = np.zeros(dim, dtype=np.float64)
    for key in sorted(features):  # sorted: float sums in a fixed order
        h = stable_hash(key, seed)
        vec[h % dim] += features[key] if (h >> 63) == 0 else -features[key]
    return vec


def _normalised(vec: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vec)
    return vec / norm if norm > 0 else vec


def channel_features(index: ProgramIndex, paths: set[str] | None, include_text: bool,
                     text_max_bytes: int) -> dict[str, dict[str, float]]:
    keep = (lambda p: True) if paths is None else (lambda p: p in paths)
    # weighted counts (floats): a Counter's missing keys read 0 without being inserted
    feats: dict[str, dict[str, float]] = {name: Counter() for name in CHANNELS}  # type: ignore[misc]
    symbols = [s for s in index.symbols if keep(s.path) and s.is_definition]
    for sym in symbols:
        feats["sym"][f"{sym.kind}:{sym.name}"] += 1.0
        for tok in tokens(sym.doc):
            feats["doc"][tok] += 1.0
        for name in sym.annotations:
            feats["types"][name] += 1.0
    files = [rec for rec in index.files.values() if keep(rec.path)]
    for rec in files:
        if rec.module:
            feats["mod"][f"module:{rec.module}"] += 1.0
    graph = index.callgraph
    by_dir = Counter(rec.path.rpartition("/")[0] or "." for rec in files)
    for directory, count in by_dir.items():
        feats["topo"][f"dir:{directory}"] += math.log1p(count)
    for rec in files:
        if rec.module:
            node = f"mod:{rec.module}"
            imports_in = graph.degree(node, "in", ("imports",))
            imports_out = graph.degree(node, "out", ("imports",))
            feats["topo"][f"in:{rec.module}"] += math.log1p(imports_in)
            feats["topo"][f"out:{rec.module}"] += math.log1p(imports_out)
    wanted_nodes = {s.node_id for s in symbols} | {f"mod:{r.module}" for r in files if r.module}
    for src, dst, kind in graph.edges(("calls", "tests"), touching=wanted_nodes):
        if kind == "calls":
            feats["calls"][f"{_short(src)}->{_short(dst)}"] += 1.0
        else:
            feats["tests"][_short(dst)] += 1.0
    if include_text:
        for rec in files:
            text = index.texts[rec.path].encode()[:text_max_bytes].decode(errors="ignore")
            for tok in tokens(text, keep_stop_words=True):
                feats["text"][tok] += 1.0
    return feats


def _short(node: str) -> str:
    return node.rsplit("::", 1)[-1].rsplit(".", 1)[-1].removeprefix("mod:")


def embed(index: ProgramIndex, paths: set[str] | None = None, dim: int = 1536, seed: int = 0,
          weights: dict[str, float] | None = None, include_text: bool = False,
          text_max_bytes: int = 200_000) -> dict[str, np.ndarray]:
    """``{"z": program vector, "z_sym": ..., ...}`` as float32 arrays of length ``dim``."""
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    feats = channel_features(index, paths, include_text, text_max_bytes)
    total: np.ndarray = np.zeros(dim, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for name in CHANNELS:
        vec = _normalised(hash_features(feats[name], dim, seed))
        out[f"z_{name}"] = vec.astype(np.float32)
        if name != "text" or include_text:
            total += weights[name] * vec
    out["z"] = _normalised(total).astype(np.float32)
    return out
