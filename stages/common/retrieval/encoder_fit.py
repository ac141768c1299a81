"""Fitting `select.encoder_adapter`: the LoRA delta of the MiniLM sentence encoder (stages.common.retrieval.encoder_lora).

The data is one `ProgramTexts` per training program: its windows as `select=hybrid` embeds them, its docstring
questions in each of PHRASINGS, and per question the windows that answer it, the other windows of its file (hard
negatives) and the windows of other files that the plain encoder puts nearest to it (`mine`: mined negatives). `fit`
trains the LoRA matrices only (`LoRA`: forward hooks, the encoder's weights stay put) with InfoNCE over the windows of
each step; `recall` scores a program by the dense similarity alone. tools/fit_encoder_adapter.py makes the data from
installed programs and writes the shipped file with these.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time

import numpy as np

from stages.common.retrieval.dense import MAX_TOKENS, mean_pool
from stages.common.retrieval.encoder_lora import TARGETS
from stages.common.tokens import encode_padded

log = logging.getLogger(__name__)

# how each question is asked in training and validation: the eval's phrasings (stages.common.retrieval.evaluation)
PHRASINGS = ("bare", "template", "keywords")
# the evaluation programs of docs/results.md: never trained on
EVALUATED = frozenset({"click", "omegaconf", "jinja2", "rich", "networkx"})


@dataclasses.dataclass
class ProgramTexts:
    name: str
    windows: list[str]  # as select=hybrid embeds them
    questions: list[list[str]]  # per question: its text in each phrasing
    positives: list[list[int]]  # per question: the windows that overlap its definition
    same_file: list[list[int]]  # per question: the other windows of its file (hard negatives)
    files: list[str]  # per window: its file
    mined: list[list[int]] = dataclasses.field(default_factory=list)  # per question: near windows of other files


def mine(program: ProgramTexts, windows: np.ndarray, asked: np.ndarray, k: int) -> list[list[int]]:
    """Per question, the ``k`` windows of other files nearest to it (mean similarity over its phrasings; unit
    vectors: ``windows`` (windows, dim), ``asked`` (questions, phrasings, dim)) whose text is not a positive's: the
    files that the encoder confuses the question with."""
    scores = np.einsum("qpd,wd->qw", asked, windows) / asked.shape[1]
    out = []
    for n, row in enumerate(scores):
        own_files = {program.files[i] for i in program.positives[n]}
        own_texts = {program.windows[i] for i in program.positives[n]}
        others = (int(i) for i in np.argsort(-row, kind="stable")
                  if program.files[i] not in own_files and program.windows[i] not in own_texts)
        out.append(list(itertools.islice(others, k)))
    return out


class LoRA:
    """Trainable low-rank deltas on the encoder's target layers, added by the mix's forward hook (the weights stay
    put): ``output += scale · (x Aᵀ) Bᵀ`` with A (rank × in) and B (out × rank), as the adapter file stores them."""

    def __init__(self, model, rank: int, alpha: float, seed: int):
        import torch

        from stages.common.adapters.mixing import lora_forward_hook

        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / rank
        self.pairs: dict[str, tuple] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("encoder.layer.") and name.endswith(TARGETS):
                a = torch.nn.Parameter(torch.randn(rank, module.in_features, generator=generator) / rank)
                b = torch.nn.Parameter(torch.zeros(module.out_features, rank))
                self.pairs[name] = (a, b)
                # the hook's (a, b) is (out-side, in-side): (x bᵀ) aᵀ
                module.register_forward_hook(lora_forward_hook([(b, a, None, None)], self.scale))

    def parameters(self) -> list:
        return [p for pair in self.pairs.values() for p in pair]

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {n: (a.detach().numpy().copy(), b.detach().numpy().copy()) for n, (a, b) in self.pairs.items()}


def embed(model, tokenizer, batch: list[str], grad: bool):
    """Sentence vectors of ``batch`` under ``model`` (MiniLM's pooling, MAX_TOKENS tokens), with or without grad."""
    import torch

    enc = encode_padded(tokenizer, batch, MAX_TOKENS)
    with torch.set_grad_enabled(grad):
        return mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])


def nearest(windows: np.ndarray, asked: np.ndarray, k: int) -> list[np.ndarray]:
    """Per phrasing, each question's ``k`` nearest windows by cosine (rows of window positions, best first)."""
    out = []
    for j in range(asked.shape[1]):
        norms = np.linalg.norm(asked[:, j], axis=-1, keepdims=True)
        questions = (asked[:, j] / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        out.append(np.argsort(-(questions @ windows.T), axis=1, kind="stable")[:, :k])
    return out


def recall(model, tokenizer, program: ProgramTexts, k: int = 5) -> tuple[float, float]:
    """Windows' and files' recall@k of the questions under ``model``'s vectors alone (files': a top-k window lies in
    the question's file)."""
    import torch

    def vectors(texts: list[str]) -> np.ndarray:
        return torch.cat([embed(model, tokenizer, texts[i : i + 64], False) for i in range(0, len(texts), 64)]).numpy()

    model.eval()
    with torch.inference_mode():
        windows = vectors(program.windows)
        asked = np.stack([vectors([q[j] for q in program.questions]) for j in range(len(PHRASINGS))], 1)
    tops = [(row.tolist(), pos) for top in nearest(windows, asked, k) for row, pos in zip(top, program.positives)]
    if not tops:
        return 0.0, 0.0
    return (float(np.mean([bool(set(row) & set(pos)) for row, pos in tops])),
            float(np.mean([program.files[pos[0]] in {program.files[i] for i in row} for row, pos in tops])))


def fit(model, tokenizer, programs: list[ProgramTexts], steps: int, batch: int, lr: float, tau: float, rank: int,
        alpha: float, seed: int, draws: int = 1, schedule: str = "constant") -> LoRA:
    """Train a LoRA on ``model`` (in place, by hooks): each step ``batch`` questions of one program (drawn by its
    share of questions), each in a random phrasing, against one answering window, one hard negative and ``draws`` of
    its mined windows; InfoNCE at temperature ``tau`` over all windows of the step, AdamW at ``lr`` (``schedule``
    cosine: decaying to 0)."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    lora = LoRA(model, rank, alpha, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.AdamW(lora.parameters(), lr=lr, weight_decay=0.0)
    # cosine: the rate decays to 0 over the steps (the per-step loss is noisy at a constant rate)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps) if schedule == "cosine" else None
    weights = [len(p.questions) for p in programs]
    model.train()  # the encoder's dropout regularises the small data
    started = time.perf_counter()
    for step in range(steps):
        program = rng.choices(programs, weights)[0]
        chosen = rng.sample(range(len(program.questions)), min(batch, len(program.questions)))
        asked = [program.questions[n][rng.randrange(len(PHRASINGS))] for n in chosen]
        positive = [program.windows[rng.choice(program.positives[n])] for n in chosen]
        negative = [program.windows[rng.choice(program.same_file[n] or range(len(program.windows)))] for n in chosen]
        negative += [program.windows[i] for n in chosen if program.mined and program.mined[n]
                     for i in rng.sample(program.mined[n], min(draws, len(program.mined[n])))]
        q = embed(model, tokenizer, asked, True)
        w = embed(model, tokenizer, positive + negative, True)
        loss = torch.nn.functional.cross_entropy(q @ w.T / tau, torch.arange(len(chosen)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if decay is not None:
            decay.step()
        if step % 25 == 0 or step == steps - 1:
            log.info("step %d/%d: loss %.4f (%.0f s)", step + 1, steps, loss.item(), time.perf_counter() - started)
    model.eval()
    return lora
