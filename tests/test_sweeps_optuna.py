"""The Optuna sweeper (hydra-optuna-sweeper, `sweeps` extra) tunes retrieval knobs against the eval graph's float
metric (conf/experiment/tune_retrieval.yaml), in one process."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import call_main

import pipeline.run as run_app
from pipeline import PROJECT_ROOT
from pipeline.summary import summarize


def test_optuna_sweeper_tunes_a_retrieval_knob_against_the_eval_metric(tmp_path):
    """`python -m pipeline.questions` as a real process (its one), the sweep through `pipeline.run`'s main in this
    process (the tiny model stays loaded; tests/test_cli.py runs real multirun processes)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    root = tmp_path / "prog"
    root.mkdir()
    (root / "tea.py").write_text('def brew(leaves, water):\n    """Brew the tea leaves in hot water."""\n    return 1\n\n\n'
                                 'def sweeten(cup, sugar):\n    """Sweeten a cup of tea with sugar."""\n    return 2\n')
    made = subprocess.run([sys.executable, "-m", "pipeline.questions", f"program_root={root}", f"out={tmp_path / 'qs'}",
                           f"hydra.run.dir={tmp_path / 'qrun'}"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    sweep = tmp_path / "optuna"
    code, _, err = call_main(run_app.main, [
        "-m", "experiment=tune_retrieval", "model=tiny_random", f"program_root={tmp_path / 'qs' / 'prog'}",
        f"questions={tmp_path / 'qs' / 'questions.jsonl'}", "hydra.sweeper.n_trials=3",
        f"paths.outputs={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}"])
    assert code == 0, err[-3000:]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_value:" in results and "select.name_weight" in results
    assert len(jobs(sweep)) == 3 and all((j / "eval.json").is_file() for j in jobs(sweep))
    text, _, _ = summarize(sweep, metric="ours.evidence_recall@5")
    assert text.splitlines()[1].split()[0] == "job"


def jobs(sweep):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
