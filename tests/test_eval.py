"""The eval graph (docs/behaviour.md §9): our graph per question next to BM25, metrics, eval.json, sweep knobs reaching the
inner runs, retrieval and answer modes, one-line errors."""
from __future__ import annotations

import json

import pytest
from conftest import KETTLE_PROGRAM, evaluate

from pipeline.engine.errors import PipelineError
from pipeline.engine.stage import RunContext
from stages.baseline import BM25Windows, plain_tokens
from stages.common.program.indexing import build_index
from stages.common.retrieval.evaluation import Question, QuestionSet, Record, load_questions, score, spread
from stages.qgen import DocstringQuestions

PROGRAM = {
    **KETTLE_PROGRAM,
    "kettle.py": '"""Kettle control."""\n\n\n' + KETTLE_PROGRAM["kettle.py"],  # a module docstring too
    "garden/hose.py": KETTLE_PROGRAM["garden/hose.py"] + (
        "\n\ndef label(template, plant):\n"
        '    """Fill the ${name} placeholder of a plant label."""  # a question that looks like an interpolation\n'
        "    return template.replace('name', plant)\n"
    ),
}


@pytest.fixture(scope="module")
def question_set(tmp_path_factory, make_tree):
    base = tmp_path_factory.mktemp("evalset")
    root = base / "prog"
    make_tree(root, PROGRAM)
    out = DocstringQuestions(out=str(base / "qs")).run(RunContext(base, [], {}), str(root))
    return base, out["program"], out["questions"]


def test_retrieval_eval_reports_ours_and_bm25_side_by_side(question_set, tmp_path):
    base, program, questions = question_set
    table, result, report = evaluate(base, program, questions, run_dir=tmp_path)
    n = len(load_questions(questions))
    assert n == 8 and report["evaluated"] == n and report["k"] == 5
    header = table.splitlines()
    assert header[0].startswith(f"eval: {n} of {n} questions") and "pipeline=retrieve" in table and "bm25s" in table
    assert any(line.split()[:1] == ["metric"] and line.split()[1:] == ["ours", "bm25"] for line in header)
    for system in ("ours", "bm25"):
        metrics = report["metrics"][system]
        assert 0 <= metrics["evidence_recall@1"] <= metrics["evidence_recall@5"] <= 1
        assert metrics["file_recall@1"] <= metrics["file_recall@5"]
        assert metrics["citation_hit"] is None  # no decoding in retrieval mode
    assert report["metrics"]["ours"]["file_recall@5"] == 1.0  # three files: every answer is among the first five
    # per-question ranks agree with the metrics
    hits = [q["ours"]["window_rank"] is not None and q["ours"]["window_rank"] <= 5 for q in report["per_question"]]
    assert sum(hits) / n == pytest.approx(report["metrics"]["ours"]["evidence_recall@5"], abs=1e-4)
    # every question ran the retrieve graph in its own folder, with this job's overrides
    traces = sorted((tmp_path / "questions").glob("*/trace.json"))
    assert len(traces) == n
    trace = json.loads(traces[0].read_text())
    assert trace["pipeline"] == "retrieve" and "pipeline=retrieve" in trace["overrides"]
    assert not any(node["node"] == "decode" for node in trace["nodes"])


def test_sweep_knobs_reach_the_inner_runs(question_set, tmp_path):
    base, program, questions = question_set
    _, _, one = evaluate(base, program, questions, "select.top_k=1", "eval.limit=4", "pack.windows_per_file=1",
                         run_dir=tmp_path / "a")
    assert one["evaluated"] == 4 and one["total"] == 8
    ours = one["metrics"]["ours"]
    # a single selected file, a single window: @5 is @1
    assert ours["file_recall@5"] == ours["file_recall@1"] and ours["evidence_recall@5"] == ours["evidence_recall@1"]
    assert ours["windows_shown"] == 1.0
    inner = json.loads(next((tmp_path / "a" / "questions").glob("*/trace.json")).read_text())
    assert "select.top_k=1" in inner["overrides"]


def test_the_eval_yaml_writes_the_defaults_of_the_stages_that_read_it(compose):
    """conf/eval has no _target_ (the eval and closed-book graphs pass its keys to their stages with `with:`), so
    tests/test_config_defaults.py does not see it: each of its keys a stage reads equals that stage's default."""
    from omegaconf import OmegaConf

    from stages.closed_book import ClosedBookReport
    from stages.eval import EvalReport, LoadQuestions, RunGraphPerQuestion

    values = OmegaConf.to_container(compose().eval, resolve=True)
    for cls in (LoadQuestions, RunGraphPerQuestion, EvalReport, ClosedBookReport):
        for name, param in cls.config_params().items():
            default = list(param.default) if isinstance(param.default, tuple) else param.default
            assert values[name] == default, f"conf/eval/default.yaml: {name} = {values[name]!r}, {cls.__name__}: {default!r}"


def test_the_held_out_templates_compose_as_the_question_templates(compose):
    from pipeline.engine.graph import build_graph

    cfg = compose("pipeline=eval", "eval.phrasing=template", "eval.templates=${eval.heldout_templates}")
    stage = build_graph(cfg).instantiate().nodes["questions"].stage
    assert stage.config.phrasing == "template" and list(stage.config.templates) == list(cfg.eval.heldout_templates)
    assert len(stage.config.templates) == 3 and not set(stage.config.templates) & set(compose().eval.templates)


def test_metric_result_for_optuna(question_set, tmp_path):
    base, program, questions = question_set
    value, _, report = evaluate(base, program, questions, "pipeline.result=report.metric",
                                "eval.metric=file_recall@k", "eval.k=2", run_dir=tmp_path)
    assert isinstance(value, float) and value == report["metrics"]["ours"]["file_recall@2"]


def test_refs_name_what_is_scored_and_progress_draws_a_bar(question_set, tmp_path, capsys):
    base, program, questions = question_set
    _, _, report = evaluate(base, program, questions, "~eval.refs.evidence", "eval.limit=2", "eval.progress=true",
                            run_dir=tmp_path)
    ours = report["metrics"]["ours"]  # no windows read from the inner runs: no evidence scored, files still ranked
    assert ours["windows_shown"] == 0.0 and ours["evidence_recall"] == 0.0 and ours["file_recall@5"] == 1.0
    assert report["tokenizer"] == [] and "eval (retrieve)" in capsys.readouterr().err


def test_answer_mode_scores_citations(question_set, tmp_path):
    base, program, questions = question_set
    _, _, report = evaluate(base, program, questions, "eval.mode=answer", "eval.limit=2", "decode.max_new_tokens=4",
                            "decode.min_new_tokens=0", run_dir=tmp_path)
    ours = report["metrics"]["ours"]
    assert report["systems"]["ours"].startswith("pipeline=answer")
    assert ours["citation_hit"] is not None and 0 <= ours["citation_precision"] <= 1 and ours["retries"] >= 0
    telemetry = [json.loads(p.read_text()) for p in sorted((tmp_path / "questions").glob("*/telemetry.json"))]
    assert len(telemetry) == 2
    # the answer metrics are the per-answer telemetry, aggregated
    names = sum(t["code_identifiers"] for t in telemetry)
    unknown = sum(len(t["unknown_identifiers"]) for t in telemetry)
    assert ours["unknown_identifier_rate"] == pytest.approx(unknown / names if names else 0.0, abs=1e-4)
    invented = [len(t["code_lines_unverified"]) for t in telemetry]
    assert all(t["code_lines"] >= n for t, n in zip(telemetry, invented))
    assert ours["invented_code_rate"] == pytest.approx(sum(n > 0 for n in invented) / 2)
    assert ours["mislabelled_rate"] == pytest.approx(sum(bool(t["citations_mislabelled"]) for t in telemetry) / 2)
    model_valid = [any(c["valid"] and c["source"] == "model" for c in t["citations"]) for t in telemetry]
    assert ours["model_citation_rate"] == pytest.approx(sum(model_valid) / 2)
    assert ours["retry_rate"] == pytest.approx(sum(t["retries"] > 0 for t in telemetry) / 2)
    assert all(t["decoding"]["new_tokens"] >= 1 and "lead" in t for t in telemetry)


@pytest.mark.parametrize("line,culprit", [
    ('{"question": "q", "path": "nope.py", "start": 1, "end": 2}', "path 'nope.py' is not a file"),
    ('{"question": "q", "path": "cup.py", "start": 1, "end": 999}', "past the end of the file"),
    ('{"question": "q", "path": "cup.py", "start": 3}', "missing key 'end'"),
    ("not json", "line 1: not JSON"),
])
def test_bad_question_sets_are_one_line_errors(question_set, tmp_path, line, culprit):
    base, program, _ = question_set
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    with pytest.raises(PipelineError, match="node 'questions'") as info:
        evaluate(base, program, bad, run_dir=tmp_path / "run")
    assert culprit in str(info.value) and "\n" not in str(info.value)


def test_eval_without_a_question_set_says_how_to_make_one(cli, tmp_path):
    proc = cli(["pipeline=eval", "model=tiny_random", f"paths.outputs={tmp_path}", f"hydra.run.dir={tmp_path / 'r'}"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: node 'questions': questions is not set")


# ---------------------------------------------------------------- scoring and the baseline, without the framework


def test_score_definitions():
    qs = [Question("q1", "a.py", 10, 20), Question("q2", "b.py", 1, 5)]
    records = [Record(["x.py", "a.py"], [("a.py", 30, 40), ("x.py", 1, 9), ("a.py", 18, 25)], 0.5),
               Record(["b.py"], [("b.py", 6, 9)], 1.5,
                      citations=[{"path": "b.py", "start": 2, "end": 3, "valid": True, "source": "model"},
                                 {"path": "b.py", "start": 7, "end": 8, "valid": False, "source": "model"}], retries=1)]
    m = score(qs, records, k=2)
    assert m["file_recall@1"] == 0.5 and m["file_recall@2"] == 1.0
    assert m["evidence_recall@1"] == 0.0 and m["evidence_recall@2"] == 0.0 and m["evidence_recall"] == 0.5
    assert m["citation_hit"] == 1.0 and m["citation_precision"] == 0.5 and m["retries"] == 1.0
    assert m["seconds"] == 1.0 and m["windows_shown"] == 2.0
    assert spread(list(range(10)), 4) == [0, 2, 5, 7] and spread([1, 2], None) == [1, 2]


def test_bm25_ranks_the_matching_window_first(question_set):
    _, program, questions = question_set
    index = build_index(program, [], 1_000_000, 80, None)
    qs = load_questions(questions)
    target = next(q for q in qs if q.symbol == "empty_cup")
    for tokenizer in ("code", "plain"):
        run_ = BM25Windows(tokenizer=tokenizer, windows=3).run(index, QuestionSet("x", [target], 1))["run"]
        record = run_.records[0]
        assert record.files[0] == "cup.py" and target.hit_by(*record.windows[0]) and len(record.windows) == 3
        assert run_.setup_seconds >= 0 and tokenizer in run_.detail
    # bm25s' own tokens keep an identifier whole; code tokens also split it like our stages do
    assert plain_tokens("the fill_cup helper") == ["fill_cup", "helper"]
    fill = QuestionSet("x", [Question("what does fill do", "cup.py", 1, 3)], 1)
    record = BM25Windows(tokenizer="code", with_path=False).run(index, fill)["run"].records[0]
    assert record.windows[0][:2] == ("cup.py", 1)


def test_api_prompts_that_look_like_interpolations_stay_text():
    from omegaconf import OmegaConf

    from pipeline.api import _literal, compose

    for prompt in ["What does ${paths.root} resolve to?", "Explain ${oops", "a\\${b} 'c'"]:
        cfg = compose([f"prompt={_literal(prompt)}"])
        assert OmegaConf.to_container(cfg, resolve=True)["prompt"] == prompt


def test_candidate_ceilings_read_from_eval_reports(question_set, tmp_path, capsys):
    """bench.candidates: the share of questions whose file select passed on bounds what a reranker can reach at @k."""
    from bench.candidates import ceilings, main

    base, program, questions = question_set
    _, _, report = evaluate(base, program, questions, "select.top_k=2", "eval.k=1", run_dir=tmp_path)
    row = ceilings(report)
    ours = report["metrics"]["ours"]
    assert row["questions"] == 8 and row["ours@1"] == ours["file_recall@1"] and row["bm25@1"] == report["metrics"]["bm25"]["file_recall@1"]
    ranks = [q["ours"]["file_rank"] for q in report["per_question"]]
    assert all(r is None or r <= 2 for r in ranks)  # select.top_k=2: two candidate files at most
    assert row["ours_candidates"] == sum(r is not None for r in ranks) / 8 >= row["ours@1"]
    assert row["union_bm25@8"] >= row["ours_candidates"]
    assert main([str(tmp_path / "eval.json")]) == 0
    assert "qs bare" in capsys.readouterr().out  # the question set's folder and the phrasing name the job
    # the union counts a question that only BM25's first files hold, and none that both miss
    crafted = {"k": 5, "per_question": [{"ours": {"file_rank": 3}, "bm25": {"file_rank": None}},
                                        {"ours": {"file_rank": None}, "bm25": {"file_rank": 7}},
                                        {"ours": {"file_rank": None}, "bm25": {"file_rank": 12}},
                                        {"ours": {"file_rank": 6}, "bm25": {"file_rank": 1}}]}
    assert ceilings(crafted) == {"questions": 4, "ours@5": 0.25, "ours_candidates": 0.5, "bm25@5": 0.25,
                                 "union_bm25@8": 0.75}
    broken = tmp_path / "broken.json"
    broken.write_text('{"k": 5')
    assert main([str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {broken}: not an eval report")
