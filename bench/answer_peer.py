"""Bench row `answer`: seconds of one default answer, ours against a scratch checkout of an earlier commit.

The peer is the project as it was at ``PEER_COMMIT`` (the main the trusted-answers and speed issues were filed
against), checked out into a temporary git worktree and run by this interpreter. Both answer the same questions
about the same program with their own defaults and the same `decode.max_new_tokens`, alternately (peer, ours,
peer, ours, ...) so that a change in the machine's load falls on both; each side first answers once to warm its
caches (model conversion, index, build artifacts), as for a user's second question. The seconds compared are the
sum of each run's node timings without model loading (its telemetry.json), so process start-up is left out of
both sides alike.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

PEER_COMMIT = "4b6d1e9"
QUESTIONS = ["How does Hydra compose the config from the defaults list?",
             "Where are command line overrides parsed?"]


def _answer(checkout: Path, outputs: Path, run_dir: Path, program: Path, question: str, env: dict) -> dict:
    # the peer's only model: the same weights on both sides (our default is Qwen 0.5B since 2026-12-07)
    done = subprocess.run([sys.executable, "-m", "pipeline.run", "model=smollm2", f"program_root={program}",
                           f"prompt={question}", "decode.max_new_tokens=256", f"paths.outputs={outputs}", f"hydra.run.dir={run_dir}"],
                          cwd=checkout, env={**env, "PYTHONPATH": str(checkout)}, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"answer in {checkout} failed: {done.stderr.strip().splitlines()[-1:]}")
    telemetry = json.loads((run_dir / "telemetry.json").read_text())
    seconds = sum(v for k, v in telemetry["timings"].items() if k != "model")
    return {"seconds": seconds, "retries": telemetry.get("retries", 0)}


def answer_vs_checkout(project: Path, program: Path, env: dict, rounds: int = 2) -> tuple[float, float, str]:
    """(our mean seconds, the peer's mean seconds, detail)."""
    with tempfile.TemporaryDirectory(prefix="pca-peer-") as tmp:
        root = Path(tmp)
        peer = root / "peer"
        subprocess.run(["git", "-C", str(project), "worktree", "add", "--detach", str(peer), PEER_COMMIT],
                       check=True, capture_output=True, text=True)
        try:
            sides = {"peer": peer, "ours": project}
            times: dict[str, list[float]] = {"peer": [], "ours": []}
            retries: dict[str, int] = {"peer": 0, "ours": 0}
            for side, checkout in sides.items():  # warm-up
                _answer(checkout, root / f"out-{side}", root / f"warm-{side}", program, QUESTIONS[0], env)
            for i in range(rounds):
                question = QUESTIONS[i % len(QUESTIONS)]
                for side, checkout in sides.items():
                    got = _answer(checkout, root / f"out-{side}", root / f"run-{side}-{i}", program, question, env)
                    times[side].append(got["seconds"])
                    retries[side] += got["retries"]
        finally:
            subprocess.run(["git", "-C", str(project), "worktree", "remove", "--force", str(peer)],
                           capture_output=True, text=True)
    ours, theirs = sum(times["ours"]) / rounds, sum(times["peer"]) / rounds
    detail = (f"{rounds} questions alternately, max_new_tokens=256, warm; retries ours {retries['ours']}, "
              f"peer {retries['peer']}; peer = git worktree of {PEER_COMMIT}")
    return ours, theirs, detail
