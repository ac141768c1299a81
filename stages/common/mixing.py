"""Mixing LoRA deltas into a model, reversibly and exactly (SPEC §5 mix).

For layer i and target t:  Δ = (1-gsub)·A_base B_base + gsub·A_sub B_sub  (one of them alone when the other
is missing), × target weight × layer multiplier × alpha/rank, using the first ``keep`` rank components of
each pair; if ‖Δ‖_F > cap·‖W‖_F it is scaled down to that. Δ stays low-rank (A_cat, B_cat) throughout.

Two ways to apply it, both restoring the model bit for bit:
- ``hooks``: forward hooks add ``x B_catᵀ A_catᵀ`` to the module output; the weights are never written.
- ``merge``: each touched module's weight tensor is swapped for a new one, ``W + A_cat B_cat``; restore swaps
  the original tensor, never written, back in (no copy to keep, none to copy back).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from typing import Any, Literal

import numpy as np

from pipeline.errors import InputError
from stages.common.adapters import AdapterSet, TargetMap

log = logging.getLogger(__name__)
Mode = Literal["hooks", "merge"]


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
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    total = float(np.sum((a64.T @ a64) * (b64 @ b64.T)))
    return total if math.isnan(total) else math.sqrt(max(0.0, total))  # nan stays nan, never 0.0


def weight_norms(tmap: TargetMap) -> dict[tuple[int, str], float]:
    import torch

    norms = {}
    with torch.no_grad():
        for key, (_, module, rows) in tmap.modules.items():
            w = module.weight if rows is None else module.weight[rows]
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


# merge mode writes W + AB into a buffer per module that lives as long as the module: a fresh 400 MB each answer
# costs ~150 k page faults (0.3-0.9 s on SmolLM2, measured), more than the arithmetic
_WORKSPACES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _workspace(module: Any, like: Any) -> Any:
    buffer = _WORKSPACES.get(module)
    if buffer is not None and buffer.data_ptr() == like.data_ptr():
        return like.new_empty(like.shape)  # a second mix over one already merged: never write into its weights
    if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device:
        buffer = _WORKSPACES[module] = like.new_empty(like.shape)
    return buffer


class MixHandle:
    """The model's adapted state. ``restore`` is idempotent and puts back every weight bit for bit."""

    def __init__(self, tmap: TargetMap, mode: Mode):
        self.tmap, self.mode = tmap, mode
        self._hooks: list[Any] = []
        self._originals: dict[str, tuple[Any, Any]] = {}  # module name -> (module, its original weight tensor)
        self.active = False
        self.applied = 0

    def apply(self, deltas: dict[tuple[int, str], LowRankDelta]) -> None:
        if self.active:
            self.restore()
        try:
            self._apply(deltas)
        except BaseException:
            self.restore()
            raise
        self.active = True
        self.applied += 1

    def _apply(self, deltas: dict[tuple[int, str], LowRankDelta]) -> None:
        import torch

        per_module: dict[str, list] = {}
        for key, delta in deltas.items():
            name, module, rows = self.tmap.modules[key]
            weight = module.weight
            a = torch.from_numpy(delta.a).to(weight.device, weight.dtype)
            b = torch.from_numpy(delta.b).to(weight.device, weight.dtype)
            bias = torch.from_numpy(delta.bias).to(weight.device, weight.dtype) if delta.bias is not None else None
            per_module.setdefault(name, [module, []])[1].append((a, b, rows, bias))
        with torch.no_grad():
            for name, (module, items) in per_module.items():
                if self.mode == "merge":
                    original = module.weight.data
                    merged = _workspace(module, original).copy_(original)
                    for a, b, rows, _ in items:  # rows: one half of a fused module (gate_up)
                        (merged if rows is None else merged[rows]).addmm_(a, b)
                    self._originals[name] = (module, original)
                    module.weight.data = merged
                    hook_items = [(None, None, rows, bias) for a, b, rows, bias in items if bias is not None]
                else:
                    hook_items = items
                if hook_items:
                    self._hooks.append(module.register_forward_hook(_make_hook(hook_items)))

    def restore(self) -> None:
        import torch

        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        with torch.no_grad():
            for module, original in self._originals.values():
                module.weight.data = original
        self._originals.clear()
        self.active = False

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "active": self.active, "applied": self.applied}


def _make_hook(items: list):
    def hook(module, inputs, output):
        x = inputs[0]
        for a, b, rows, bias in items:
            delta = (x @ b.T) @ a.T if a is not None else 0
            if bias is not None:
                delta = delta + bias
            if rows is None:
                output = output + delta
            else:
                output = output.clone()
                output[..., rows] += delta
        return output

    return hook


class AdapterMix:
    """What was mixed into a model (adapters, settings) and the handle that undoes it; remix re-applies."""

    def __init__(self, lm: Any, tmap: TargetMap, mode: Mode, base: AdapterSet | None, sub: AdapterSet | None,
                 full_alpha: float):
        self.lm, self.tmap, self.base, self.sub, self.full_alpha = lm, tmap, base, sub, full_alpha
        self.handle = MixHandle(tmap, mode)
        self.norms = weight_norms(tmap)  # of the unmixed weights
        self.settings: MixSettings | None = None

    def apply(self, settings: MixSettings) -> dict[str, Any]:
        deltas = build_deltas(self.base, self.sub, self.tmap, settings, self.norms)
        self.handle.apply(deltas)
        self.settings = settings
        return {
            "rank": settings.rank, "gsub": settings.gsub, "alpha": settings.alpha, "beta": settings.beta,
            "mix_mode": self.handle.mode, "ablate": list(settings.ablate),
            "delta_norms": delta_norms(deltas, self.tmap, self.tmap.num_layers),
            "deltas_capped": sum(d.capped for d in deltas.values()), "deltas_applied": len(deltas),
        }

    def restore(self) -> None:
        self.handle.restore()

    def summary(self) -> dict[str, Any]:
        return self.handle.summary()
