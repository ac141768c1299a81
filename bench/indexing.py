"""Bench rows of indexing and retrieval: the program index against a bare ast.parse loop, retrieval against bm25s."""
from __future__ import annotations

import ast
import subprocess
import tempfile
import time
from pathlib import Path

from bench.harness import OUT, SITE, TREE_2000, fresh_python, row


def _bare_parse(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        try:
            ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # what the index stage also survives
            pass
    return time.perf_counter() - started


INDEX_IGNORE = [".git", "__pycache__", "*.egg-info"]
_INDEX_CODE = """
import json, os, sys, time
t = time.perf_counter()
from pathlib import Path
from stages.common.program.indexing import build_index
from pipeline.engine.execute import peak_rss_mb
imports = time.perf_counter() - t
t = time.perf_counter()
index = build_index({root!r}, {ignore!r}, 1_000_000, 80, Path({cache!r}))
seconds = time.perf_counter() - t
print(json.dumps({{"s": seconds, "imports": imports, "files": len(index.files), "symbols": len(index.symbols),
                  "edges": index.callgraph.num_edges, "networkx": index.callgraph._nx is not None,
                  "rss_mb": peak_rss_mb()}}))
"""


def indexing() -> list[dict]:
    """sympy (~1,500 .py files): cold index (parsing in worker processes) vs the bare single-process ast.parse loop,
    interleaved twice in this run (best of each); then the unchanged tree in a new process (only its on-disk index)."""
    from pipeline.engine import resources
    from stages.common.program.indexing import build_index
    from stages.common.program.pyfacts import available_cores

    files = sorted(p for p in TREE_2000.rglob("*.py") if "__pycache__" not in p.parts)
    bare, cold = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(2):
            bare.append(_bare_parse(files))
            cache = Path(tmp) / f"cache{round_}"
            resources.clear("program-index")
            started = time.perf_counter()
            index = build_index(str(TREE_2000), INDEX_IGNORE, 1_000_000, 80, cache)
            cold.append(time.perf_counter() - started)
        fresh = [fresh_python(_INDEX_CODE.format(root=str(TREE_2000), ignore=INDEX_IGNORE, cache=str(cache))) for _ in range(2)]
        started = time.perf_counter()
        build_index(str(TREE_2000), INDEX_IGNORE, 1_000_000, 80, cache)  # the index of the last cold round is in memory
        same_process = time.perf_counter() - started
    floor, best, new = min(bare), min(cold), min(fresh, key=lambda r: r["s"])
    detail = (f"{TREE_2000.name}: {len(index.files)} text files ({len(files)} .py), {len(index.symbols)} symbols, "
              f"{index.callgraph.num_edges} edges; {available_cores()} cores; bare loop {', '.join(f'{b:.1f}' for b in bare)} s, "
              f"cold {', '.join(f'{c:.1f}' for c in cold)} s")
    return [
        row("index cold (parse in worker processes) vs bare single-process ast.parse loop", best, floor, best / floor,
            "<= 1.0x", best / floor <= 1.0, "s", detail),
        row("index unchanged, new process (on-disk arrays) vs ast.parse loop", new["s"], floor, new["s"] / floor,
            "<= 1 s", new["s"] <= 1, "s", f"build_index call in a fresh interpreter (its imports {new['imports']:.2f} s "
            f"before the clock; networkx built: {new['networkx']}); same process (in-memory): {same_process:.3f} s"),
    ]


# together ~10,800 files (those installed here: ray comes with the test extra)
BIG_TREE_PACKAGES = ("transformers", "sympy", "scipy", "numpy", "networkx", "matplotlib", "ray")


def index_big() -> dict:
    """~10,000 files (several site-packages hard-linked under one root): cold index in a fresh process, its peak RSS,
    beside the bare ast.parse loop over the same .py files."""
    tree = OUT / "tree10k"
    wanted = sorted(n for n in BIG_TREE_PACKAGES if (SITE / n).is_dir())
    if tree.is_dir() and sorted(p.name for p in tree.iterdir()) != wanted:  # made from another package list
        subprocess.run(["rm", "-rf", str(tree)], check=True)
    if not tree.is_dir():
        tmp = OUT / "tree10k.partial"
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        tmp.mkdir(parents=True)
        for name in wanted:  # hard links: no copy (cp -r if refused)
            done = subprocess.run(["cp", "-al", str((SITE / name).resolve()), str(tmp / name)], capture_output=True)
            if done.returncode:
                subprocess.run(["cp", "-r", str((SITE / name).resolve()), str(tmp / name)], check=True)
        tmp.rename(tree)
    files = sorted(p for p in tree.rglob("*.py") if "__pycache__" not in p.parts)
    with tempfile.TemporaryDirectory() as cache:
        floor = _bare_parse(files)
        got = fresh_python(_INDEX_CODE.format(root=str(tree), ignore=INDEX_IGNORE, cache=cache))
    return row("index ~10,000-file tree cold (fresh process) vs bare ast.parse loop", got["s"], floor, got["s"] / floor,
               "completes, RSS reported", True, "s",
               f"{'+'.join(p.name for p in sorted(tree.iterdir()))}: {got['files']} text files ({len(files)} .py), {got['symbols']} symbols, "
               f"{got['edges']} edges; peak RSS of the indexing process {got['rss_mb']:.0f} MiB")


def retrieval() -> dict:
    """pipeline.retrieve (via the eval graph, retrieval mode) vs bm25s over the same windows of click."""
    from pipeline import api

    out = OUT / "questions-click"
    if not (out / "questions.jsonl").is_file():
        api.run([f"program_root={SITE / 'click'}", f"out={out}"], config_name="questions")
    _, result = api.run(["pipeline=eval", f"program_root={out / 'click'}", f"questions={out / 'questions.jsonl'}",
                         "eval.progress=false"])
    report = result.output("report", "report")
    ours, bm25 = report["metrics"]["ours"], report["metrics"]["bm25"]
    qps, peer_qps = 1 / ours["seconds"], 1 / bm25["seconds"]
    return row("retrieval: pipeline.retrieve vs bm25s (queries/s)", qps, peer_qps, qps / peer_qps,
               "evidence recall@5 above BM25", ours["evidence_recall@5"] > bm25["evidence_recall@5"], "queries/s",
               f"click, {report['evaluated']} stripped questions: evidence recall@5 {ours['evidence_recall@5']:.3f} "
               f"vs {bm25['evidence_recall@5']:.3f}; file recall@1 {ours['file_recall@1']:.3f} vs {bm25['file_recall@1']:.3f}")
