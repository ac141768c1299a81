"""`python -m bench [--only name,...]`: pca-pipeline against its peers, measured in one run.

Every row: {name, value, peer, ratio, target, met} (plus unit and detail). Results go to the terminal, to
outputs/bench/latest.json and to outputs/bench/latest.csv. Timings depend on the machine; ratios are what
the targets are about.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys

from bench.decoding import decode_floor, decode_sweep, precision, qwen_decode
from bench.engines import engines
from bench.harness import OUT
from bench.indexing import index_big, indexing, retrieval
from bench.memory import peak_rss_rows
from bench.mixing import mix_vs_peft
from bench.runs import answer_speed, model_load, multirun, overhead

BENCHES = {"overhead": overhead, "model_load": model_load, "multirun": multirun, "decode_sweep": decode_sweep,
           "indexing": indexing, "index_big": index_big, "mix": mix_vs_peft, "retrieval": retrieval, "rss": peak_rss_rows,
           "decode": decode_floor, "precision": precision, "answer": answer_speed, "qwen_decode": qwen_decode,
           "engines": engines}


FIELDS = ["name", "value", "peer", "ratio", "target", "met", "unit", "detail", "bench"]


def _write(rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "latest.json").write_text(json.dumps(rows, indent=2))
    with open(OUT / "latest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    args = parser.parse_args(argv)
    chosen = [b for b in args.only.split(",") if b] or list(BENCHES)
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark '{unknown[0]}'; choose from {', '.join(BENCHES)}")
    rows = []
    if args.only and (OUT / "latest.json").is_file():  # a subset replaces its own rows and keeps the others
        rows = [r for r in json.loads((OUT / "latest.json").read_text()) if r.get("bench") not in chosen]
    for name in chosen:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        result = BENCHES[name]()
        rows.extend({**dict(r), "bench": name} for r in (result if isinstance(result, list) else [result]))
        _write(rows)  # after every row: a long run that is cut short keeps what it measured
    width = max(len(r["name"]) for r in rows)
    print(f"{'benchmark':<{width}}  {'value':>10}  {'peer':>10}  {'ratio':>8}  {'target':<22} met")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['value']:>10.3f}  {r['peer']:>10.3f}  {r['ratio']:>8.3f}  {r['target']:<22} "
              f"{'yes' if r['met'] else 'NO'}   ({r['unit']}; {r['detail']})")
    print(f"\nwritten: {OUT / 'latest.json'}, {OUT / 'latest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
