"""`python -m bench.natural fetch|run|grade|summary`: the natural-question set, fetched, answered, graded, tabled.

  fetch   [--split test|dev|all]            each program's wheel (pip download --no-deps), its package folder unpacked
  run     --split S --tag NAME [--mode answer|retrieval] [hydra overrides...]
                                            the eval per program, in this process -> outputs/natural/NAME/
  grade   --tag NAME [--limit N]            each answer beside its question, right answer and key facts
  summary --tag NAME                        summary.md again, with bench/natural/grades/NAME.jsonl when it exists
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.natural import DATA, OUT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.natural", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--data", type=Path, default=DATA, help="where programs.json and the question files are")
    p.add_argument("--out", type=Path, default=OUT, help="where wheels, programs and tags go (outputs/natural)")
    p.add_argument("--programs", type=Path, default=None, help="unpacked programs (default: OUT/programs)")
    p.add_argument("-v", "--verbose", action="store_true", help="a traceback with an error")
    sub = p.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch")
    fetch.add_argument("--split", choices=("test", "dev", "all"), default="all")
    run = sub.add_parser("run")
    run.add_argument("--split", choices=("test", "dev", "all"), required=True)
    run.add_argument("--tag", required=True)
    run.add_argument("--mode", choices=("answer", "retrieval"), default="answer")
    run.add_argument("overrides", nargs="*", help="hydra overrides for every program's eval (model=..., eval.limit=...)")
    for name in ("grade", "summary"):
        one = sub.add_parser(name)
        one.add_argument("--tag", required=True)
        if name == "grade":
            one.add_argument("--limit", type=int, default=None, help="an evenly spread subset of this many answers")
    return p


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.cli import explain
    from pipeline.engine.errors import PipelineError

    args = parser().parse_args(argv)
    programs_dir = args.programs or args.out / "programs"
    try:
        if args.command == "fetch":
            from bench.natural.fetching import fetch
            fetch(args.data, args.out, args.split)
        elif args.command == "run":
            from bench.natural.running import run
            folder = run(args.data, args.out, programs_dir, args.split, args.tag, args.mode, list(args.overrides))
            print((folder / "summary.md").read_text(encoding="utf-8") + f"\nanswers and summary: {folder}")
        else:
            from bench.natural.running import check_tag
            from bench.natural.tables import grading_sheet, write_summary
            folder, grades = args.out / check_tag(args.tag), args.data / "grades" / f"{args.tag}.jsonl"
            print(grading_sheet(folder, grades, args.limit) if args.command == "grade" else write_summary(folder, grades))
    except (PipelineError, HydraException, OmegaConfBaseException) as err:
        if args.verbose:
            raise
        message = str(err) if isinstance(err, PipelineError) else explain(err, "config", list(getattr(args, "overrides", [])))
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
