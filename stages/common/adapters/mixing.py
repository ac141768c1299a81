"""Mixing LoRA deltas into a model, reversibly and exactly (docs/behaviour.md §5 mix).

The deltas are built in stages/common/adapters/deltas.py; while a mix is in the model it holds the model's lock
(stages/common/adapters/lock.py). Two ways to apply it, both restoring the model bit for bit:
- ``hooks``: forward hooks add ``x B_catᵀ A_catᵀ`` to the module output; the weights are never written.
- ``merge``: ``W + A_cat B_cat`` is written into each touched weight. A weight whose bytes are those of the
  checkpoint file the model was loaded from is written in place and read back at restore from the private copy of
  that file taken at load (stages/common/adapters/weightfile.py), so whatever happens to the file meanwhile: no copy
  of it is kept in memory (212 MB on SmolLM2 in bfloat16). Any other weight tensor is swapped for a merged copy, and
  restore swaps the original, never written, back in.
In every weight dtype the delta is computed in float32 and cast once: a hook computes ``x B_catᵀ A_catᵀ`` in float32
and adds it to the output in the output's dtype; merge computes ``W + A_cat B_cat`` in float32 and rounds it once to
the weight's dtype. With int8 weights (``model.quantize=int8``) only hooks can mix; merge is refused.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Literal

from pipeline.engine.errors import ConfigError, InputError
from stages.common.adapters.deltas import (
    LowRankDelta,
    MixSettings,
    build_deltas,
    delta_norms,
    deltas_digest,
    weight_norms,
)
from stages.common.adapters.factors import AdapterSet, TargetMap
from stages.common.adapters.lock import Lease, model_lock
from stages.common.adapters.weightfile import WeightFile, weight_file
from stages.common.generation.precision import is_plain_float

log = logging.getLogger(__name__)
Mode = Literal["hooks", "merge"]


# merge mode writes W + AB into a buffer per module that lives as long as the module: a fresh 400 MB each answer
# costs ~150 k page faults (0.3-0.9 s on SmolLM2, measured), more than the arithmetic
_WORKSPACES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _workspace(module: Any, like: Any) -> Any:
    buffer = _WORKSPACES.get(module)
    if buffer is not None and buffer.data_ptr() == like.data_ptr():
        return like.new_empty(like.shape)  # a second mix over one already merged: never write into its weights
    if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype or buffer.device != like.device:
        buffer = _WORKSPACES[module] = like.new_empty(like.shape)
    return buffer


class MixHandle:
    """The model's adapted state. ``restore`` is idempotent and puts back every weight bit for bit."""

    def __init__(self, tmap: TargetMap, mode: Mode, source: WeightFile | None = None):
        self.tmap, self.mode, self.source = tmap, mode, source
        self._hooks: list[Any] = []
        self._originals: dict[str, tuple[Any, Any]] = {}  # module name -> (module, its original weight tensor)
        self._written: dict[str, Any] = {}  # parameter name -> the weight written in place (read back from source)
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
            if self.mode == "merge" and not is_plain_float(weight):
                raise ConfigError(f"mix.mode=merge cannot write a delta into the {type(weight).__name__} weights of "
                                  f"'{name}' (model.quantize=int8?); use mix.mode=hooks")
            # float32 factors in every weight dtype: the delta is computed in float32 and cast once
            a = torch.from_numpy(delta.a).to(weight.device, torch.float32)
            b = torch.from_numpy(delta.b).to(weight.device, torch.float32)
            bias = torch.from_numpy(delta.bias).to(weight.device, torch.float32) if delta.bias is not None else None
            per_module.setdefault(name, [module, []])[1].append((a, b, rows, bias))
        scratch = None  # float32 W + AB of a low-precision weight: one buffer for every module, not two new ones each
        with torch.no_grad():
            for name, (module, items) in per_module.items():
                if self.mode == "merge":
                    original, param = module.weight.data, f"{name}.weight"
                    if self.source is not None and self.source.claim(param, original):
                        self._written[param] = merged = original  # before the first write: a failure reads it back
                    else:
                        merged = _workspace(module, original).copy_(original)
                        self._originals[name] = (module, original)
                    for a, b, rows, _ in items:  # rows: one half of a fused module (gate_up)
                        part = merged if rows is None else merged[rows]
                        if part.dtype == torch.float32:
                            part.addmm_(a, b)
                        else:  # W + AB in float32, rounded once to the weight's dtype
                            if scratch is None or scratch.device != part.device:  # sized for the largest module
                                scratch = torch.empty(max(m.weight.numel() for m, _ in per_module.values()),
                                                      dtype=torch.float32, device=part.device)
                            exact = scratch[:part.numel()].view(part.shape).copy_(part)
                            part.copy_(exact.addmm_(a, b))
                    if merged is not original:
                        module.weight.data = merged
                    hook_items = [(None, None, rows, bias) for a, b, rows, bias in items if bias is not None]
                else:
                    hook_items = items
                if hook_items:
                    self._hooks.append(module.register_forward_hook(lora_forward_hook(hook_items)))

    def restore(self) -> None:
        import torch

        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        failed = []
        with torch.no_grad():
            for module, original in self._originals.values():
                module.weight.data = original
            for param, weight in self._written.items():
                assert self.source is not None  # only a source's weights are written in place
                try:
                    self.source.read_back(param, weight)
                except OSError as err:  # the others are still read back; this model is then refused (see lost)
                    failed.append(f"{param}: {err}")
        self._originals.clear()
        self._written.clear()
        self.active = False
        if failed:
            assert self.source is not None
            self.source.lost = f"{len(failed)} weights not read back from {self.source.folder} ({failed[0]})"
            raise InputError(f"the model's weights could not be restored: {self.source.lost}; load it again")

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "active": self.active, "applied": self.applied}


def lora_forward_hook(items: list, scale: float = 1.0, dropout: float = 0.0):
    """The forward hook of a LoRA path: ``output += scale · (x Bᵀ) Aᵀ (+ bias)`` for each ``(a, b, rows, bias)``
    of ``items`` (``rows``: one half of a fused module's output; ``a`` None: a bias only). Computed in float32 and
    cast once to the output's dtype; differentiable (the fitting stage trains its factors through this very hook,
    so what it stores reproduces the trained model through the mix). ``dropout`` (training only: while gradients
    are on) drops inputs of the LoRA path, as PEFT's ``lora_dropout`` does."""
    import torch

    a32 = torch.float32

    def hook(module, inputs, output):
        x = inputs[0]
        x32 = x if x.dtype == a32 else x.float()
        if dropout and torch.is_grad_enabled():
            x32 = torch.nn.functional.dropout(x32, p=dropout, training=True)
        for a, b, rows, bias in items:
            delta = (x32 @ b.T) @ a.T if a is not None else 0
            if scale != 1.0 and a is not None:
                delta = delta * scale
            if bias is not None:
                delta = delta + bias
            if not isinstance(delta, int) and delta.dtype != output.dtype:
                delta = delta.to(output.dtype)  # computed in float32, cast once
            if rows is None:
                output = output + delta
            else:
                output = output.clone()
                output[..., rows] += delta
        return output

    return hook


def holds_factors(base: AdapterSet | None, sub: AdapterSet | None) -> bool:
    """Whether mixing these adapters would change a weight (synth=none and sub=none hold no factor)."""
    return any(s is not None and bool(s.factors) for s in (base, sub))


class AdapterMix:
    """What was mixed into a model (adapters, settings) and the handle that undoes it; remix re-applies."""

    def __init__(self, lm: Any, tmap: TargetMap, mode: Mode, base: AdapterSet | None, sub: AdapterSet | None,
                 full_alpha: float):
        self.lm, self.tmap, self.base, self.sub, self.full_alpha = lm, tmap, base, sub, full_alpha
        # nothing to mix (synth=none, sub=none): the weights are never read, so they need not be loaded
        self.empty = not holds_factors(base, sub)
        self.handle = MixHandle(tmap, mode, None if self.empty and not lm.weights_loaded else weight_file(lm.model))
        self.lease = Lease(model_lock(lm))
        self.norms: dict[tuple[int, str], float] | None = None  # of the unmixed weights, read under the lock
        self.settings: MixSettings | None = None
        self.weights_key: str | None = None  # digest of the deltas in the model (None while nothing is mixed)
        self.deltas = 0  # how many deltas the model holds (0 while nothing is mixed, or an empty adapter is)
        # never forgotten: a mix dropped without restore() puts the weights back and frees the model when collected
        weakref.finalize(self, _abandon, self.handle, self.lease)

    def apply(self, settings: MixSettings) -> dict[str, Any]:
        """Mix (or re-mix) into the model; holds the model's lock from here to ``restore``."""
        self.lease.take()
        try:
            source = self.handle.source
            if source is not None and source.lost:
                raise InputError(f"the model's weights are not exact since a restore failed: {source.lost}; load it again")
            if self.norms is None:
                self.norms = {} if self.empty else weight_norms(self.tmap)
            deltas = build_deltas(self.base, self.sub, self.tmap, settings, self.norms)
            self.weights_key, self.deltas = None, 0
            self.handle.apply(deltas)
            self.weights_key, self.deltas = deltas_digest(deltas, self.handle.mode), len(deltas)
        finally:
            if not self.handle.active:  # nothing of ours is in the model: let the next answer in
                self.lease.give_back()
        self.settings = settings
        return {
            "rank": settings.rank, "gsub": settings.gsub, "alpha": settings.alpha, "beta": settings.beta,
            "mix_mode": self.handle.mode, "ablate": list(settings.ablate),
            "delta_norms": delta_norms(deltas, self.tmap, self.tmap.num_layers),
            "deltas_capped": sum(d.capped for d in deltas.values()), "deltas_applied": len(deltas),
            # forward hooks in the model while this mix is in (under its lock: this answer's own, no other's)
            "hooks_active": sum(len(m._forward_hooks) for m in self.lm.model.modules()) if self.lm.weights_loaded else 0,
        }

    def restore(self) -> None:
        """Put every weight back bit for bit, then release the model to the next answer."""
        self.weights_key, self.deltas = None, 0
        try:
            self.handle.restore()
        finally:
            self.lease.give_back()

    def summary(self) -> dict[str, Any]:
        return self.handle.summary()


def _abandon(handle: MixHandle, lease: Lease) -> None:
    if lease.held or handle.active:
        log.warning("an adapter mix was dropped without unmix; restoring the model's weights")
    try:
        handle.restore()
    finally:
        lease.give_back()
