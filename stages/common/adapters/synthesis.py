"""Hashed LoRA synthesis from a program vector z (docs/behaviour.md §4), deterministic: same z and config -> same bits.

Known weakness (kept on purpose, it is the original recipe): at dim 1536 the z-dependent scalars are close
to 0, so the factors are mostly seeded Xavier matrices and the program enters almost only through the seed.
"""
from __future__ import annotations

import math

import numpy as np

from stages.common.adapters.embedding import stable_hash
from stages.common.adapters.factors import AdapterSet

GATES = ("zmean", "cosine", "hump", "linear")


def layer_gate(kind: str, z: np.ndarray, layer: int, num_layers: int) -> float:
    frac = layer / (num_layers - 1) if num_layers > 1 else 0.0
    if kind == "zmean":
        return (math.tanh(float(z[(13 * layer) % len(z)])) + 1.0) / 2.0
    if kind == "cosine":
        return (1.0 - math.cos(math.pi * frac)) / 2.0
    if kind == "hump":
        return max(0.0, math.sin(math.pi * frac))
    if kind == "linear":
        return frac
    raise ValueError(f"layer_gate must be one of {', '.join(GATES)}, got {kind!r}")


def _segment_mean(z: np.ndarray, start: int, length: int) -> float:
    idx: np.ndarray = (start + np.arange(max(1, length))) % len(z)
    return float(z[idx].mean())


def _xavier(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    bound = math.sqrt(6.0 / (rows + cols))
    return rng.uniform(-bound, bound, size=(rows, cols))


def synthesize(z: np.ndarray, num_layers: int, shapes: dict[str, tuple[int, int]], targets: list[str], rank: int,
               seed: int, gate_kind: str = "zmean", map_cap: float | None = None) -> AdapterSet:
    z = np.asarray(z, dtype=np.float64)
    norm = np.linalg.norm(z)
    z = z / norm if norm > 0 else z
    dim, count = len(z), len(targets)
    seg = dim // count
    factors: dict[str, np.ndarray] = {}
    for i in range(num_layers):
        g = layer_gate(gate_kind, z, i, num_layers)
        a_scale = float(np.clip(1.5 * _segment_mean(z, 31 * i, 32), -1.0, 1.0))
        pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for t_index, target in enumerate(targets):
            d_out, d_in = shapes[target]
            shared = "gate_up" if target in ("gate_proj", "up_proj") else target  # one pair per layer for both
            if shared not in pairs or pairs[shared][0].shape != (d_out, rank) or pairs[shared][1].shape != (rank, d_in):
                rng = np.random.default_rng(stable_hash(f"{i}:{shared}", seed))
                pairs[shared] = (_xavier(rng, d_out, rank) / math.sqrt(rank), _xavier(rng, rank, d_in))
            a, b = pairs[shared]
            a = a * (1.0 + a_scale * g)
            b = b * (1.0 - a_scale * g)
            s_t = math.tanh(1.5 * _segment_mean(z, 17 * i + t_index * seg, seg))
            a = a * (1.0 + 0.15 * s_t)
            b = b * (1.0 - 0.15 * s_t)
            if map_cap is not None:
                a = a * min(1.0, map_cap / max(float(np.linalg.norm(a)), 1e-12))
                b = b * min(1.0, map_cap / max(float(np.linalg.norm(b)), 1e-12))
            factors[f"L{i}.{target}.A"] = a.astype(np.float32)
            factors[f"L{i}.{target}.B"] = b.astype(np.float32)
            factors[f"L{i}.{target}.gate"] = np.array(g, dtype=np.float32)
    meta = {"synth": "hashed", "rank": rank, "seed": seed, "layer_gate": gate_kind, "map_cap": map_cap}
    return AdapterSet(factors, num_layers, dict(shapes), meta)


def round_factors(adapters: AdapterSet, threshold: float) -> AdapterSet:
    """`round_lora`: each entry -> sign * median(|x|), or 0 when |x| < threshold * median(|x|) (per matrix)."""
    rounded = {}
    for key, value in adapters.factors.items():
        if key.endswith((".A", ".B")):
            med = float(np.median(np.abs(value)))
            out = np.sign(value) * med
            out[np.abs(value) < threshold * med] = 0.0
            rounded[key] = out.astype(np.float32)
        else:
            rounded[key] = value
    return AdapterSet(rounded, adapters.num_layers, adapters.shapes, {**adapters.meta, "rounded": threshold})
