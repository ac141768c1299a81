"""Fitting LoRA factors on the program's own text (docs/behaviour.md §4b): next-token loss, model frozen.

The LoRA path is the mix stage's own forward hook (`mixing.lora_forward_hook`: output += s·(x Bᵀ) Aᵀ), so the stored factors,
with s folded in, reproduce the trained model through the real mix path. CPU runs are deterministic: fixed
seed, fixed data order, and a learning-rate schedule that follows the step count (see `lr_at`).

The clock that `time_budget_s` limits counts training steps only; the curve's perplexity checks (`monitor`)
run outside it and are reported apart (`wall`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Literal

import numpy as np

from stages.common.adapters.factors import TargetMap
from stages.common.adapters.mixing import lora_forward_hook
from stages.common.program.corpus import Piece, padded, perplexity

log = logging.getLogger(__name__)

Schedule = Literal["constant", "cosine"]
Autocast = Literal["none", "bfloat16"]


@dataclasses.dataclass
class FitResult:
    factors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]  # (A d_out x r with scale folded in, B r x d_in)
    steps: int
    seconds: float  # training clock (what the budget limits)
    losses: list[float]
    stopped_by: str  # steps | time_budget | early_stop
    curve: list[dict] = dataclasses.field(default_factory=list)  # one row per monitor check
    best_step: int | None = None  # the step whose factors were kept (early stopping), else None = the last


def _batch(pieces: list[Piece]):
    ids, mask = padded(pieces)
    return ids, mask, ids.masked_fill(mask == 0, -100)  # padding is not predicted


def lr_at(step: int, seconds: float, lr: float, steps: int, time_budget_s: float, schedule: Schedule,
          warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine down to `min_lr_ratio`·lr.

    The cosine's progress is the larger of the step fraction and the budget fraction, so a run stopped by the
    time budget still anneals; whenever the step count binds, the schedule (and so the result) does not depend
    on the machine's speed.
    """
    warm = min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return lr * warm
    progress = min(1.0, max(step / max(steps, 1), seconds / time_budget_s))
    floor = lr * min_lr_ratio
    return warm * (floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def fit_lora(model, tmap: TargetMap, train: list[Piece], targets: list[str], rank: int, lr: float, batch_size: int,
             steps: int, time_budget_s: float, seed: int, scale: float, weight_decay: float = 0.0,
             progress: bool = True, *, schedule: Schedule = "constant", warmup_steps: int = 0,
             min_lr_ratio: float = 0.0, autocast: Autocast = "none", monitor: dict[str, list[Piece]] | None = None,
             monitor_every: int = 0, early_stop_patience: int = 0, eval_batch_size: int = 4,
             dropout: float = 0.0) -> FitResult:
    """Train a rank-``rank`` pair per (layer, target) on ``train``; stop at ``steps`` or ``time_budget_s``.

    ``monitor`` (name -> pieces) is scored with the adapter live before training, every ``monitor_every`` steps
    and at the end: the rows of ``curve``. With ``early_stop_patience`` > 0 training stops after that many checks
    without a better perplexity on the first monitored set, and the best checkpoint's factors are kept.
    """
    import torch
    from tqdm.auto import tqdm

    if not train:
        raise ValueError("no training pieces: the program has too little text")
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same factors on every device
    device = next(model.parameters()).device
    params: dict[tuple[int, str], tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for layer in range(tmap.num_layers):
        for target in targets:
            if (layer, target) not in tmap.modules:
                continue
            d_out, d_in = tmap.shapes[target]
            bound = 1.0 / math.sqrt(d_in)  # the usual LoRA init: B random, A zero, so training starts at W
            b = torch.nn.Parameter(((torch.rand((rank, d_in), generator=generator) * 2 - 1) * bound).to(device))
            a = torch.nn.Parameter(torch.zeros((d_out, rank), device=device))
            params[(layer, target)] = (a, b)

    per_module: dict[str, list] = {}
    for key, (a, b) in params.items():
        name, module, rows = tmap.modules[key]
        per_module.setdefault(name, [module, []])[1].append((a, b, rows, None))

    if autocast == "bfloat16":
        amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        amp = contextlib.nullcontext
    monitor = {name: chosen for name, chosen in (monitor or {}).items() if chosen}
    handles = [module.register_forward_hook(lora_forward_hook(items, scale, dropout))
               for module, items in per_module.values()]
    optimizer = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=lr, weight_decay=weight_decay)
    order_rng = np.random.default_rng(seed)
    order: list[int] = []
    losses: list[float] = []
    curve: list[dict] = []
    best: tuple[float, int, dict] | None = None  # (perplexity, step, factors) of the best check
    since_best = 0
    started = time.perf_counter()
    clock = 0.0  # seconds spent in training steps
    stopped_by = "steps"

    def check(step: int) -> bool:
        """Score the monitored sets; True when early stopping says stop."""
        nonlocal best, since_best
        row: dict[str, Any] = {"step": step, "seconds": round(clock, 3), "wall": round(time.perf_counter() - started, 3),
               "lr": lr_at(step, clock, lr, steps, time_budget_s, schedule, warmup_steps, min_lr_ratio),
               "train_loss": float(np.mean(losses[curve[-1]["step"] if curve else 0 :])) if losses else None}
        for name, chosen in monitor.items():
            row[f"ppl_{name}"] = perplexity(model, chosen, eval_batch_size)
        curve.append(row)
        if not early_stop_patience or not monitor:
            return False
        value = row[f"ppl_{next(iter(monitor))}"]
        if best is None or value < best[0]:
            best = (value, step, {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in params.items()})
            since_best = 0
            return False
        since_best += 1
        return since_best >= early_stop_patience

    bar = tqdm(total=steps, desc="fitting LoRA", disable=not progress, leave=False)
    try:
        if monitor_every and monitor:
            check(0)
        longest_step = 0.0
        for step in range(steps):
            # a step is not started when it could overrun the budget: steps vary, so plan with the longest so far
            if clock + longest_step > time_budget_s:
                stopped_by = "time_budget"
                break
            step_started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, clock, lr, steps, time_budget_s, schedule, warmup_steps, min_lr_ratio)
            while len(order) < batch_size:
                order.extend(order_rng.permutation(len(train)).tolist())
            chosen, order = order[:batch_size], order[batch_size:]
            ids, mask, labels = (t.to(device) for t in _batch([train[i] for i in chosen]))
            with amp():
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            took = time.perf_counter() - step_started
            clock += took
            longest_step = max(longest_step, took)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if monitor_every and monitor and (step + 1) % monitor_every == 0 and check(step + 1):
                stopped_by = "early_stop"
                break
        if monitor_every and monitor and (not curve or curve[-1]["step"] != len(losses)):
            check(len(losses))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    best_step = None
    if best is not None and early_stop_patience:
        best_step = best[1]
        with torch.no_grad():
            for key, (a, b) in params.items():
                a.copy_(best[2][key][0])
                b.copy_(best[2][key][1])
    factors = {key: ((a.detach() * scale).cpu().numpy().astype(np.float32), b.detach().cpu().numpy().astype(np.float32))
               for key, (a, b) in params.items()}
    log.info("fitted %d steps in %.1fs (stopped by %s), loss %.3f -> %.3f", len(losses), clock, stopped_by,
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return FitResult(factors, len(losses), clock, losses, stopped_by, curve, best_step)

