"""How far a better reranker could take file recall@k: read the eval graph's `eval.json` files and say, per job,
how often the answering file is among our candidates at all.

    python -m bench.candidates outputs/measure/retrieval/*/*/eval.json

Our candidates are the files `select` passed on (`select.top_k`, 8 by default; rerank and pack only reorder them),
so the share of questions whose file is among them is the most that any reranking of them can reach at @k. The
union with BM25's first `--bm25-files` files says what a reranker of both systems' candidates could reach. Read
from `per_question[*].{ours,bm25}.file_rank` (1-based, null when the file is not in the system's list).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def ceilings(report: dict, bm25_files: int = 8) -> dict[str, float]:
    """Per report: ours' file recall@k, ours' recall among all its candidates, BM25's @k and the union."""
    k = int(report["k"])
    rows = report["per_question"]
    if not rows:
        raise ValueError("it holds no per-question ranks")
    ours = [row["ours"]["file_rank"] for row in rows]
    bm25 = [row["bm25"]["file_rank"] if "bm25" in row else None for row in rows]

    def share(hits) -> float:
        return round(sum(hits) / len(rows), 4)

    return {"questions": len(rows), f"ours@{k}": share(r is not None and r <= k for r in ours),
            "ours_candidates": share(r is not None for r in ours),
            f"bm25@{k}": share(r is not None and r <= k for r in bm25),
            f"union_bm25@{bm25_files}": share(o is not None or (b is not None and b <= bm25_files)
                                              for o, b in zip(ours, bm25))}


def label(report: dict) -> str:
    """Which program, phrasing and template set a job measured, from its report."""
    program = Path(report["questions"]).parent.name
    heldout = any(o.startswith("eval.templates=") and "heldout" in o for o in report.get("overrides", []))
    return f"{program} {report['phrasing']}{' (held-out)' if heldout else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.candidates", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="eval.json files written by pipeline=eval")
    parser.add_argument("--bm25-files", type=int, default=8, help="BM25's first files taken into the union")
    args = parser.parse_args(argv)
    if args.bm25_files < 1:
        parser.error("--bm25-files must be at least 1")
    lines: list[str] = []
    for path in args.reports:
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
            row = ceilings(report, args.bm25_files)
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"error: {path}: not an eval report ({type(err).__name__}: {err})", file=sys.stderr)
            return 2
        if not lines:
            lines.append(f"{'job':<40}" + "".join(f"{key:>18}" for key in row))
        lines.append(f"{label(report):<40}" + "".join(f"{value:>18}" if isinstance(value, int) else f"{value:>18.3f}"
                                                  for value in row.values()))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
