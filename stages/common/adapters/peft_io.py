"""Writing an effective LoRA delta in PEFT's format (adapter_config.json + adapter_model.safetensors).

Each module's delta is A_cat B_cat with every scale folded into A_cat, so PEFT gets lora_B = A_cat,
lora_A = B_cat and lora_alpha = r for that module (scaling 1). Ranks differ per module (keeps, mixtures):
they go to `rank_pattern` / `alpha_pattern`. A fused gate_up module gets a block-diagonal pair.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.engine.cache import write_atomic
from stages.common.adapters.deltas import LowRankDelta
from stages.common.adapters.factors import TargetMap


def module_factors(deltas: dict[tuple[int, str], LowRankDelta], tmap: TargetMap) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module name -> (lora_A (r x d_in), lora_B (d_out x r))."""
    grouped: dict[str, list] = {}
    for key, delta in sorted(deltas.items()):
        name, module, rows = tmap.modules[key]
        grouped.setdefault(name, [module, []])[1].append((delta, rows))
    out = {}
    for name, (module, items) in grouped.items():
        d_out = module.weight.shape[0]
        rank = sum(d.a.shape[1] for d, _ in items)
        lora_a = np.concatenate([d.b for d, _ in items], axis=0)
        lora_b = np.zeros((d_out, rank), dtype=np.float32)
        col = 0
        for delta, rows in items:
            r = delta.a.shape[1]
            lora_b[rows if rows is not None else slice(None), col : col + r] = delta.a
            col += r
        out[name] = (lora_a.astype(np.float32), lora_b)
    return out


def write_peft(deltas: dict[tuple[int, str], LowRankDelta], tmap: TargetMap, out_dir: Path,
               base_model: str | None) -> Path:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save

    factors = module_factors(deltas, tmap)
    if not factors:
        raise ValueError("nothing to export: every target is ablated or has no adapter")
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    top = max(ranks.values())
    config = LoraConfig(
        r=top, lora_alpha=top, target_modules=sorted(factors), lora_dropout=0.0, bias="none",
        rank_pattern={n: r for n, r in ranks.items() if r != top},
        alpha_pattern={n: r for n, r in ranks.items() if r != top},
        base_model_name_or_path=base_model, inference_mode=True,
    )
    tensors = {}
    for name, (lora_a, lora_b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.from_numpy(np.ascontiguousarray(lora_a))
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.from_numpy(np.ascontiguousarray(lora_b))
    out_dir = Path(out_dir)
    config_dict = config.to_dict()
    config_dict["peft_type"] = "LORA"
    config_dict["target_modules"] = sorted(factors)
    write_atomic(out_dir / "adapter_model.safetensors", save(tensors))
    write_atomic(out_dir / "adapter_config.json", json.dumps(config_dict, indent=2, default=str))
    return out_dir
