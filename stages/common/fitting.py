"""Fitting LoRA factors on the program's own text (SPEC §4b): next-token loss, model frozen.

The LoRA path is the same forward hook the mix stage uses (output += s·(x Bᵀ) Aᵀ), so the stored factors,
with s folded in, reproduce the trained model through the real mix path. CPU runs are deterministic: fixed
seed, fixed data order, float32.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from stages.common.adapters import TargetMap
from stages.common.corpus import Piece, padded, perplexity

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    factors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]  # (A d_out x r with scale folded in, B r x d_in)
    steps: int
    seconds: float
    losses: list[float]
    stopped_by: str  # steps | time_budget


def _batch(pieces: list[Piece]):
    ids, mask = padded(pieces)
    return ids, mask, ids.masked_fill(mask == 0, -100)  # padding is not predicted


def fit_lora(model, tmap: TargetMap, train: list[Piece], targets: list[str], rank: int, lr: float, batch_size: int,
             steps: int, time_budget_s: float, seed: int, scale: float, weight_decay: float = 0.0,
             progress: bool = True) -> FitResult:
    """Train a rank-``rank`` pair per (layer, target) on ``train``; stop at ``steps`` or ``time_budget_s``."""
    import torch
    from tqdm.auto import tqdm

    if not train:
        raise ValueError("no training pieces: the program has too little text")
    generator = torch.Generator().manual_seed(seed)
    params: dict[tuple[int, str], tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for layer in range(tmap.num_layers):
        for target in targets:
            if (layer, target) not in tmap.modules:
                continue
            d_out, d_in = tmap.shapes[target]
            bound = 1.0 / math.sqrt(d_in)  # the usual LoRA init: B random, A zero, so training starts at W
            b = torch.nn.Parameter((torch.rand((rank, d_in), generator=generator) * 2 - 1) * bound)
            a = torch.nn.Parameter(torch.zeros((d_out, rank)))
            params[(layer, target)] = (a, b)

    per_module: dict[str, list] = {}
    for key, (a, b) in params.items():
        name, module, rows = tmap.modules[key]
        per_module.setdefault(name, [module, []])[1].append((a, b, rows))

    def make_hook(items):
        def hook(module, inputs, output):
            x = inputs[0]
            for a, b, rows in items:
                delta = scale * ((x @ b.T) @ a.T)
                if rows is None:
                    output = output + delta
                else:
                    output = torch.cat([output[..., : rows.start], output[..., rows] + delta, output[..., rows.stop :]], -1)
            return output
        return hook

    handles = [module.register_forward_hook(make_hook(items)) for module, items in per_module.values()]
    optimizer = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=lr, weight_decay=weight_decay)
    order_rng = np.random.default_rng(seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    stopped_by = "steps"
    bar = tqdm(total=steps, desc="fitting LoRA", disable=not progress, leave=False)
    try:
        longest_step = 0.0
        for step in range(steps):
            step_started = time.perf_counter()
            # a step is not started when it could overrun the budget: steps vary, so plan with the longest so far
            if step_started - started + longest_step > time_budget_s:
                stopped_by = "time_budget"
                break
            while len(order) < batch_size:
                order.extend(order_rng.permutation(len(train)).tolist())
            chosen, order = order[:batch_size], order[batch_size:]
            ids, mask, labels = _batch([train[i] for i in chosen])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            longest_step = max(longest_step, time.perf_counter() - step_started)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - started
    factors = {key: ((a.detach() * scale).numpy().astype(np.float32), b.detach().numpy().astype(np.float32))
               for key, (a, b) in params.items()}
    log.info("fitted %d steps in %.1fs (stopped by %s), loss %.3f -> %.3f", len(losses), seconds, stopped_by,
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return FitResult(factors, len(losses), seconds, losses, stopped_by)


def held_out_perplexity(model, pieces: list[Piece], limit: int, batch_size: int) -> float:
    return perplexity(model, pieces[:limit], batch_size) if pieces else float("nan")
