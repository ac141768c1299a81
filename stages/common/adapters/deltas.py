"""The mixed LoRA delta of each (layer, target) (docs/behaviour.md §5 mix), as low-rank factors.

For layer i and target t:  Δ = (1-gsub)·A_base B_base + gsub·A_sub B_sub  (one of them alone when the other
is missing), × target weight × layer multiplier × alpha/rank, using the first ``keep`` rank components of
each pair; if ‖Δ‖_F > cap·‖W‖_F it is scaled down to that. Δ stays low-rank (A_cat, B_cat) throughout.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipeline.engine.errors import InputError
from stages.common.adapters.factors import AdapterSet, TargetMap
from stages.common.generation.precision import dequantized


@dataclasses.dataclass
class MixSettings:
    gsub: float
    alpha: float
    rank: int  # the capacity rank: Δ is scaled by alpha/rank
    weights: dict[str, float]
    layer_multipliers: list[float]
    keeps: dict[tuple[int, str], int]  # missing -> the full rank of each pair
    delta_cap: float | None
    beta: float = 0.0
    ablate: tuple[str, ...] = ()  # targets whose delta is zero


@dataclasses.dataclass
class LowRankDelta:
    a: np.ndarray  # d_out x R, every scale folded in
    b: np.ndarray  # R x d_in
    norm: float  # ‖a @ b‖_F
    capped: bool
    bias: np.ndarray | None = None


def layer_third(layer: int, num_layers: int) -> int:
    """0, 1, 2 for the low, mid and top third of the layers (f = i/(L-1))."""
    f = layer / (num_layers - 1) if num_layers > 1 else 0.0
    return 0 if f < 1 / 3 else 1 if f < 2 / 3 else 2


def gram_norm(a: np.ndarray, b: np.ndarray) -> float:
    """‖a b‖_F without forming a b: sqrt(sum((aᵀa) ∘ (b bᵀ)))."""
    a64: np.ndarray = a.astype(np.float64)
    b64: np.ndarray = b.astype(np.float64)
    total = float(np.sum((a64.T @ a64) * (b64 @ b64.T)))
    return total if math.isnan(total) else math.sqrt(max(0.0, total))  # nan stays nan, never 0.0


def weight_norms(tmap: TargetMap) -> dict[tuple[int, str], float]:
    import torch

    norms = {}
    with torch.no_grad():
        for key, (_, module, rows) in tmap.modules.items():
            weight = dequantized(module.weight)
            w = weight if rows is None else weight[rows]
            norms[key] = float(torch.linalg.vector_norm(w.float()))
    return norms


def build_deltas(base: AdapterSet | None, sub: AdapterSet | None, tmap: TargetMap, settings: MixSettings,
                 norms: dict[tuple[int, str], float]) -> dict[tuple[int, str], LowRankDelta]:
    deltas = {}
    for layer in range(tmap.num_layers):
        for target in tmap.targets:
            if target in settings.ablate or (layer, target) not in tmap.modules:
                continue
            parts = []
            base_pair = base.pair(layer, target) if base else None
            sub_pair = sub.pair(layer, target) if sub else None
            both = base_pair is not None and sub_pair is not None
            keep = settings.keeps.get((layer, target))
            for pair, share in ((base_pair, 1.0 - settings.gsub), (sub_pair, settings.gsub)):
                if pair is None:
                    continue
                a, b = pair
                k = a.shape[1] if keep is None else max(1, min(keep, a.shape[1]))
                parts.append(((share if both else 1.0) * a[:, :k], b[:k, :]))
            if not parts:
                continue
            scale = settings.weights.get(target, 1.0) * settings.layer_multipliers[layer] * settings.alpha / settings.rank
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, as one error
                a_cat = np.concatenate([p[0] for p in parts], axis=1) * scale
                b_cat = np.concatenate([p[1] for p in parts], axis=0)
                norm = gram_norm(a_cat, b_cat)
                capped = False
                if settings.delta_cap is not None and norm > settings.delta_cap * norms[(layer, target)] > 0:
                    factor = settings.delta_cap * norms[(layer, target)] / norm
                    # both factors shrink by √factor: scaling A alone leaves B as large as it came (3e38 B with a
                    # tiny A overflows x Bᵀ in the hook although the product is small)
                    root = math.sqrt(factor)
                    a_cat, b_cat, norm, capped = a_cat * root, b_cat * root, norm * factor, True
                bias = None
                for adapters in (base, sub):
                    extra = adapters.bias(layer, target) if adapters else None
                    if extra is not None and settings.beta:
                        bias = (bias if bias is not None else 0) + settings.beta * extra
                delta = LowRankDelta(a_cat.astype(np.float32), b_cat.astype(np.float32), norm, capped, bias)
            check_finite(delta, layer, target)
            deltas[(layer, target)] = delta
    return deltas


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite(delta: LowRankDelta, layer: int, target: str) -> None:
    """A delta with nan/inf (huge but finite factors overflow float32) must never reach the model's weights."""
    finite = (math.isfinite(delta.norm) and delta.norm <= FLOAT32_MAX and bool(np.isfinite(delta.a).all())
              and bool(np.isfinite(delta.b).all()) and (delta.bias is None or bool(np.isfinite(delta.bias).all())))
    if not finite:
        raise InputError(
            f"the mixed delta of layer {layer} {target} is not finite (‖Δ‖_F = {delta.norm:.3g}): the adapter "
            "factors or the mix knobs are too large for float32 (not applied)")


def delta_norms(deltas: dict[tuple[int, str], LowRankDelta], tmap: TargetMap, num_layers: int) -> dict[str, float]:
    """Mean ‖Δ‖_F per target over layers (0.0 for an ablated or absent target)."""
    return {t: float(sum(d.norm for (i, tt), d in deltas.items() if tt == t) / max(1, num_layers)) for t in tmap.targets}


def deltas_digest(deltas: dict[tuple[int, str], LowRankDelta], mode: str) -> str:
    """What a mix puts into the model, as a digest of every delta's factors (equal digests: equal mixed weights)."""
    import hashlib

    digest = hashlib.blake2b(mode.encode(), digest_size=16)
    for key in sorted(deltas):
        delta = deltas[key]
        digest.update(repr((key, delta.a.shape, delta.b.shape, delta.bias is not None)).encode())
        for array in (delta.a, delta.b, delta.bias):
            if array is not None:
                digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
