"""`python -m bench.fitting_study`: choices of the fitted synthesizer (docs/behaviour.md §4b) side by side.

Each variant is a list of `synth.*` overrides of `synth=fitted`; each run goes through the real `synth` stage
(split, training data, fit, perplexity of the stored delta through the mix path), one process, the model loaded
once. Every run appends one JSON row to `--out` (program, variant, steps, training seconds, process CPU seconds,
load average, plain and fitted perplexity of held-out pieces and of held-out files, the curve). `--report` prints
the table of a results file and plots the curves of each program (`<out stem>_<program>.png`).

Steps are fixed per variant (`synth.steps`, a huge time budget), so variants compare at equal work on a loaded
machine; steps/s and CPU seconds say what each step costs.

    python -m bench.fitting_study --programs outputs/eval/click/click,outputs/eval/omegaconf/omegaconf \\
        --variants old_default,bf16,packed_cosine:synth.rank=16 --out outputs/study/fit.jsonl
    python -m bench.fitting_study --report outputs/study/fit.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# name -> synth overrides (on top of the config's synth=fitted defaults and COMMON)
VARIANTS: dict[str, list[str]] = {
    "old_default": ["synth.layout=segments", "synth.schedule=constant", "synth.autocast=none", "synth.lr=2e-3"],
    "bf16": ["synth.layout=segments", "synth.schedule=constant", "synth.autocast=bfloat16", "synth.lr=2e-3"],
    "packed": ["synth.layout=packed", "synth.schedule=constant", "synth.autocast=bfloat16", "synth.lr=2e-3"],
    "packed_cosine": ["synth.layout=packed", "synth.schedule=cosine", "synth.warmup_steps=3", "synth.autocast=bfloat16",
                      "synth.lr=2e-3"],
    "packed_cosine_4e-3": ["synth.layout=packed", "synth.schedule=cosine", "synth.warmup_steps=3",
                           "synth.autocast=bfloat16", "synth.lr=4e-3"],
    "packed_4e-3": ["synth.layout=packed", "synth.schedule=constant", "synth.autocast=bfloat16", "synth.lr=4e-3"],
    "packed_summaries": ["synth.layout=packed", "synth.schedule=constant", "synth.autocast=bfloat16", "synth.lr=2e-3",
                         "synth.summaries=true"],
    "packed_mlp": ["synth.layout=packed", "synth.schedule=constant", "synth.autocast=bfloat16", "synth.lr=2e-3",
                   "synth.targets=[gate_proj,up_proj,down_proj]"],
    "seg_4e-3": ["synth.layout=segments", "synth.schedule=constant", "synth.autocast=bfloat16", "synth.lr=4e-3"],
    "seg_summaries": ["synth.layout=segments", "synth.schedule=constant", "synth.autocast=bfloat16", "synth.lr=2e-3",
                      "synth.summaries=true"],
    "seg_mlp": ["synth.layout=segments", "synth.schedule=constant", "synth.autocast=bfloat16", "synth.lr=2e-3",
                "synth.targets=[gate_proj,up_proj,down_proj]"],
    "seg_cosine_4e-3": ["synth.layout=segments", "synth.schedule=cosine", "synth.warmup_steps=3",
                        "synth.autocast=bfloat16", "synth.lr=4e-3"],
    "packed_cosine_summaries": ["synth.layout=packed", "synth.schedule=cosine", "synth.warmup_steps=3",
                                "synth.autocast=bfloat16", "synth.lr=2e-3", "synth.summaries=true"],
}
COMMON = ["synth.time_budget_s=100000", "synth.progress=false", "synth.curve_every=6", "synth.curve_pieces=8"]



def _stage(graph, node: str):
    """An instantiated graph's stage object of ``node``."""
    stage = graph.nodes[node].stage
    assert stage is not None, f"graph not instantiated: {node}"
    return stage

def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def run(programs: list[str], variants: list[str], out: Path, steps: int, extra: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    import pipeline
    from pipeline.engine.graph import build_graph
    from stages.common.program.indexing import build_index

    out.parent.mkdir(parents=True, exist_ok=True)
    lm = None
    for program in programs:
        for name in variants:
            base, *more = name.split(":")  # a variant may add overrides: packed_cosine:synth.rank=16
            overrides = ["pipeline=build", "synth=fitted", *COMMON, f"synth.steps={steps}", *VARIANTS[base], *more,
                         *extra]
            with initialize_config_dir(config_dir=str(pipeline.CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            graph = build_graph(cfg).instantiate()
            lm = lm or _stage(graph, "model").run()["lm"]
            index_cfg = cfg.index
            index = build_index(program, list(index_cfg.ignore), index_cfg.max_file_bytes, index_cfg.window_lines, None)
            load_before, cpu, wall = load_avg(), time.process_time(), time.perf_counter()
            meta = _stage(graph, "synth").run(embedding=None, lm=lm, index=index)["adapters"].meta
            row = {"program": Path(program).name, "variant": name, "overrides": VARIANTS[base] + more + extra,
                   "threads": int(os.environ.get("OMP_NUM_THREADS", "0")), "load_before": load_before,
                   "load_after": load_avg(), "cpu_seconds": round(time.process_time() - cpu, 1),
                   "wall_seconds": round(time.perf_counter() - wall, 1), **meta}
            with out.open("a") as handle:
                handle.write(json.dumps(row, default=str) + "\n")
            print(_line(row), flush=True)


def _change(plain, fitted) -> str:
    return f"{plain:.2f} -> {fitted:.2f} ({(fitted - plain) / plain:+.1%})"


def _line(row: dict) -> str:
    return (f"{row['program']:<10} {row['variant']:<26} steps {row['steps']:>3}  {row['seconds']:>7.1f}s train "
            f"({row['steps'] / max(row['seconds'], 1e-9):.3f} steps/s, load {row['load_before']}-{row['load_after']})  "
            f"pieces {_change(row['val_perplexity_plain'], row['val_perplexity_fitted'])}  "
            f"files {_change(row['files_perplexity_plain'], row['files_perplexity_fitted'])}")


def report(path: Path) -> None:
    from stages.common.adapters.curves import plot_curves

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        print(_line(row))
    for program in dict.fromkeys(r["program"] for r in rows):
        runs = {r["variant"]: r["curve"] for r in rows if r["program"] == program and r.get("curve")}
        target = path.with_name(f"{path.stem}_{program}.png")
        plot_curves(runs, target)
        print(f"curves: {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fitting_study")
    parser.add_argument("--programs", default="")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--out", default="outputs/study/fit.jsonl")
    parser.add_argument("--report", default="")
    parser.add_argument("extra", nargs="*", help="more overrides for every run (e.g. synth.rank=16)")
    args = parser.parse_args(argv)
    if args.report:
        report(Path(args.report))
        return 0
    unknown = [v for v in args.variants.split(",") if v.split(":")[0] not in VARIANTS]
    if unknown or not args.programs:
        print(f"error: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}" if unknown
              else "error: pass --programs", file=sys.stderr)
        return 2
    run(args.programs.split(","), args.variants.split(","), Path(args.out), args.steps, args.extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
