"""`python -m pipeline.summary` on a fixture multirun folder written from small JSON files."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from pipeline import PROJECT_ROOT
from pipeline.summary import main, summarize

PNG = b"\x89PNG\r\n\x1a\n"


def job(root, name, overrides, **files):
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    for filename, data in files.items():
        (folder / f"{filename}.json").write_text(json.dumps(data))
    return folder


def telemetry(valid, total, elapsed, retries=0):
    return {"status": "ok", "prompt": "a long prompt " * 10, "answer": "text " * 50, "citations_valid": valid,
            "citations_total": total, "citation_precision": valid / total if total else 0.0, "retries": retries,
            "elapsed_sec": elapsed, "tokens": {"prompt": 900, "generated": 64}, "timings": {"decode": elapsed - 1},
            "files_selected": ["a.py"], "citations": [{"path": "a.py"}]}


@pytest.fixture
def multirun(tmp_path):
    root = tmp_path / "multirun"
    common = ["model=tiny_random", "prompt='how?'"]
    job(root, "0", ["rerank=heuristic", "mix.alpha=8", *common], telemetry=telemetry(3, 4, 10.0),
        trace={"failure": None, "nodes": [{"node": "decode", "seconds": 9.0}, {"node": "pack", "seconds": 1.0}]})
    job(root, "1", ["rerank=heuristic", "mix.alpha=16", *common], telemetry=telemetry(1, 4, 20.0, retries=1))
    job(root, "2", ["rerank=none", "mix.alpha=8", *common], telemetry=telemetry(0, 0, 30.0),
        perplexity={"plain": 12.5, "mixed": 11.0, "change": -0.12, "overrides": []})
    job(root, "10", ["rerank=none", "mix.alpha=16", *common],
        eval={"metrics": {"ours": {"evidence_recall@5": 0.7, "seconds": 0.02}, "bm25": {"evidence_recall@5": 0.6}}},
        trace={"failure": "node 'decode': boom", "nodes": []})
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_table_csv_and_plot(multirun):
    text, csv_path, png_path = summarize(multirun, metric="citations_valid")
    lines = text.splitlines()
    assert lines[0] == f"4 jobs in {multirun}; all with model=tiny_random prompt='how?'"
    header = lines[1].split()
    assert header[:3] == ["job", "rerank", "mix.alpha"]  # the sweep's axes, then the key metrics
    assert {"status", "elapsed_sec", "citations_valid", "retries", "ppl.mixed", "ours.evidence_recall@5",
            "bm25.evidence_recall@5"} <= set(header)
    assert "prompt" not in header and "answer" not in header  # long texts stay out
    assert [line.split()[0] for line in lines[2:6]] == ["0", "1", "2", "10"]  # numeric job order
    assert lines[2].split()[:3] == ["0", "heuristic", "8"] and "failed" in lines[5]
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert rows[1]["mix.alpha"] == "16" and rows[1]["citations_valid"] == "1" and rows[1]["retries"] == "1"
    assert rows[2]["ppl.mixed"] == "11.0" and rows[3]["ours.evidence_recall@5"] == "0.7"  # full precision
    assert rows[0]["tokens.generated"] == "64" and rows[0]["timings.decode"] == "9.0" and rows[0]["trace.seconds"] == "10.0"
    assert rows[0]["overrides"] == "rerank=heuristic mix.alpha=8 model=tiny_random prompt='how?'"
    assert csv_path == multirun / "summary.csv"
    assert png_path == multirun / "summary_citations_valid.png" and png_path.read_bytes()[:8] == PNG


def test_default_metric_and_output_paths(multirun, tmp_path):
    text, csv_path, png_path = summarize(multirun, csv_path=tmp_path / "t.csv", png_path=tmp_path / "p.png")
    assert text.endswith(f"plot (ours.evidence_recall@5): {png_path}")  # the eval metric is preferred when present
    assert csv_path.is_file() and png_path.read_bytes()[:8] == PNG


def test_cli_prints_the_table(multirun):
    proc = subprocess.run([sys.executable, "-m", "pipeline.summary", str(multirun), "--metric", "elapsed_sec"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[:3] == ["job", "rerank", "mix.alpha"]
    assert (multirun / "summary_elapsed_sec.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("args,message", [
    (["--metric", "nope"], "--metric 'nope' is not a numeric result of these jobs; available:"),
    (["missing"], "is not a folder"),
    (["empty"], "has no job folders"),
])
def test_errors_are_one_line(multirun, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    argv = [str(multirun), *args] if args[0].startswith("--") else [str(tmp_path / args[0])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_broken_result_file_is_named(multirun, capsys):
    (multirun / "1" / "telemetry.json").write_text("{not json")
    assert main([str(multirun)]) == 2
    assert f"{multirun / '1' / 'telemetry.json'}: not JSON" in capsys.readouterr().err


def test_optuna_floats_are_short_in_the_table_and_whole_in_the_csv(tmp_path):
    root = tmp_path / "optuna"
    job(root, "0", ["select.k1=2.413007592528963"], trace={"failure": None, "nodes": [{"node": "a", "seconds": 1}]})
    job(root, "1", ["select.k1=0.6"], trace={"failure": None, "nodes": [{"node": "a", "seconds": 2}]})
    text, csv_path, _ = summarize(root)
    assert text.splitlines()[2].split()[:2] == ["0", "2.413"]
    assert list(csv.DictReader(open(csv_path)))[0]["select.k1"] == "2.413007592528963"


def test_a_mistyped_metric_suggests_close_names(multirun, capsys):
    assert main([str(multirun), "--metric", "citation_valid"]) == 2
    err = capsys.readouterr().err
    assert "(did you mean citations_valid" in err and err.count("\n") == 1
    assert main([str(multirun), "--metric", "recall"]) == 2  # a part of a name finds the names that hold it
    assert "ours.evidence_recall@5" in capsys.readouterr().err.split("available:")[0]


def test_a_plot_whose_values_are_all_equal_says_so(multirun):
    text, _, png = summarize(multirun, metric="tokens.generated")  # 64 in the three jobs that have it
    assert text.splitlines()[-1] == f"plot (tokens.generated): {png}"  # job 10 has none: not all equal
    for name in ("1", "2"):
        (multirun / name / "telemetry.json").write_text(json.dumps(telemetry(3, 4, 10.0)))
    text, _, png = summarize(multirun, metric="citations_valid")
    assert text.splitlines()[-1] == f"plot (citations_valid): {png}"  # job 10 has none
    import shutil

    shutil.rmtree(multirun / "10")
    text, _, png = summarize(multirun, metric="citations_valid")
    assert text.splitlines()[-1] == f"plot (citations_valid): {png} (all 3 values are equal: 3)"
