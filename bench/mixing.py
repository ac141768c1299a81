"""Bench row of adapter mixing: our mix and restore against PEFT's merge and unmerge of the same LoRA factors."""
from __future__ import annotations

import copy
import time

from bench.harness import row
from pipeline import PROJECT_ROOT


def mix_vs_peft() -> list[dict]:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from stages.common.adapters.factors import TARGETS, infer_targets
    from stages.common.adapters.mixing import AdapterMix, MixSettings
    from stages.common.adapters.synthesis import synthesize
    from stages.model import SmolLM2

    lm = SmolLM2(cache_dir=str(PROJECT_ROOT / "outputs" / "cache" / "models")).run()["lm"]
    tmap = infer_targets(lm.model)
    z = np.random.default_rng(0).standard_normal(1536)
    adapters = synthesize(z, tmap.num_layers, tmap.shapes, list(TARGETS), 12, 0)
    settings = MixSettings(0.0, 12.0, 12, {}, [1.0] * tmap.num_layers, {}, None)  # scale 1, no cap: plain LoRA
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rows = []
    timings = {}
    for mode in ("hooks", "merge"):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            mix = AdapterMix(lm, tmap, mode, adapters, None, 12.0)
            mix.apply(settings)
            mix.restore()
            best = min(best, time.perf_counter() - started)
        exact = all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
        timings[mode] = (best, exact)
    peft_model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(r=12, lora_alpha=12, target_modules=list(TARGETS)))
    with torch.no_grad():
        for (layer, target), (name, _, _) in tmap.modules.items():
            module = peft_model.base_model.model.get_submodule(name)
            a, b = adapters.pair(layer, target)  # type: ignore[misc]  # synthesized: every target has a pair
            module.lora_A["default"].weight.copy_(torch.from_numpy(b))
            module.lora_B["default"].weight.copy_(torch.from_numpy(a))
    peft_before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" not in k}
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
        best = min(best, time.perf_counter() - started)
    drift = max(float((v - peft_before[k]).abs().max()) for k, v in peft_model.state_dict().items() if k in peft_before)
    for mode, (ours, exact) in timings.items():
        rows.append(row(f"mix+unmix ({mode}) vs PEFT merge+unmerge, rank 12, 7 targets x 30 layers", ours, best,
                        ours / best, "<= 1.0 and bit-exact", ours / best <= 1.0 and exact, "s",
                        f"ours restores bit-exact: {exact}; PEFT max weight drift after unmerge: {drift:.2e}"))
    return rows
