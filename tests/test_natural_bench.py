"""`python -m bench.natural` (docs/howto/evaluate.md, natural questions): programs.json checked, only a wheel's
package folder unpacked, a split run end to end into answers.jsonl and summary.md, the grading sheet, hand grades
read back (and refused when malformed), one-line errors with exit code 2."""
from __future__ import annotations

import json
import zipfile

import pytest
from conftest import KETTLE_PROGRAM

from bench.natural.__main__ import main
from bench.natural.fetching import programs, unpack
from bench.natural.tables import read_answers, read_grades, summary_text
from pipeline.engine.errors import InputError

QUESTIONS = [
    {"id": "kettle-01", "program": "kettle", "kind": "how", "question": "How is the water boiled?",
     "path": "kettle.py", "start": 1, "end": 4, "gold": [{"path": "kettle.py", "start": 1, "end": 4}],
     "leads": ["boil_water"], "key_facts": ["temperature", "100"], "answer": "litres times 100."},
    {"id": "kettle-02", "program": "kettle", "kind": "where", "question": "Where is a cup filled with water?",
     "path": "cup.py", "start": 1, "end": 3, "leads": ["fill_cup"], "key_facts": ["water"],
     "answer": "fill_cup in cup.py."},
]


@pytest.fixture()
def layout(tmp_path, make_tree):
    """A data folder (programs.json, a dev question file) and an out folder with the program already unpacked."""
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "dev").mkdir(parents=True)
    (data / "programs.json").write_text(json.dumps({
        "kettle": {"requirement": "kettle==1.0", "package": "kettle", "split": "dev"},
        "other": {"requirement": "other==2.0", "package": "other", "split": "test"}}))
    (data / "dev" / "kettle.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    make_tree(out / "programs" / "kettle" / "kettle", KETTLE_PROGRAM)
    return data, out


def test_programs_json_is_read_by_split_and_checked(layout, tmp_path):
    data, _ = layout
    assert list(programs(data, "dev")) == ["kettle"] and list(programs(data, "all")) == ["kettle", "other"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "programs.json").write_text(json.dumps({"x": {"requirement": "x", "package": "x",
                                                                      "split": "dev"}}))
    with pytest.raises(InputError, match="requirement pinned"):
        programs(tmp_path / "bad")


def test_only_the_package_folder_of_a_wheel_is_unpacked(tmp_path):
    wheel = tmp_path / "kettle-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("kettle/__init__.py", "x = 1\n")
        archive.writestr("kettle/sub/cup.py", "y = 2\n")
        archive.writestr("kettle-1.0.dist-info/METADATA", "Name: kettle\n")
        archive.writestr("kettle_extra/thing.py", "z = 3\n")
    assert unpack(wheel, "kettle", tmp_path / "prog") == 2
    assert sorted(p.relative_to(tmp_path / "prog").as_posix() for p in (tmp_path / "prog").rglob("*.py")) == [
        "kettle/__init__.py", "kettle/sub/cup.py"]
    with pytest.raises(InputError, match="has no folder 'teapot/'"):
        unpack(wheel, "teapot", tmp_path / "none")
    evil = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/../../escaped.py", "boom\n")
    with pytest.raises(InputError, match="outside the package folder"):
        unpack(evil, "evil", tmp_path / "evil")
    assert not (tmp_path / "escaped.py").exists()


def test_run_writes_answers_and_summary_then_grades_are_read_back(layout, capsys):
    data, out = layout
    argv = ["--data", str(data), "--out", str(out)]
    assert main([*argv, "run", "--split", "dev", "--tag", "t1", "--mode", "retrieval", "model=tiny_random",
                 f"paths.outputs={out / 'pipeline'}", "eval.progress=false"]) == 0
    answers = read_answers(out / "t1")
    assert [a["id"] for a in answers] == ["kettle-01", "kettle-02"]
    first = answers[0]
    assert first["mode"] == "retrieval" and first["answer"] is None and first["key_facts"] == ["temperature", "100"]
    assert isinstance(first["metrics"]["evidence_hit"], bool) and first["metrics"]["lead_hit"] is None
    summary = (out / "t1" / "summary.md").read_text()
    assert "## By program" in summary and "| kettle | 2 |" in summary and "| where | 1 |" in summary
    assert "right or partly" not in summary  # no grades yet
    capsys.readouterr()
    assert main([*argv, "grade", "--tag", "t1"]) == 0
    sheet = capsys.readouterr().out
    assert "=== kettle-01 (kettle, how)" in sheet and "key facts:  temperature, 100" in sheet
    assert '{"id": "kettle-02", "grade": "right|partly|wrong", "reason": ""}' in sheet
    (data / "grades").mkdir()
    (data / "grades" / "t1.jsonl").write_text(json.dumps({"id": "kettle-01", "grade": "right", "reason": "ok"}) + "\n"
                                              + json.dumps({"id": "kettle-02", "grade": "partly", "reason": "so"}))
    assert main([*argv, "summary", "--tag", "t1"]) == 0
    graded = (out / "t1" / "summary.md").read_text()
    assert "right or partly" in graded and "| all | 2 |" in graded
    overall = next(line for line in graded.splitlines() if line.startswith("| all |"))
    assert overall.endswith("| 2 | 0.50 | 1.00 |")  # graded, right, right or partly
    assert main([*argv, "grade", "--tag", "t1"]) == 0 and "graded:     right: ok" in capsys.readouterr().out


@pytest.mark.parametrize("line, culprit", [
    ('{"id": "nope", "grade": "right", "reason": "x"}', "id 'nope' is not an answer"),
    ('{"id": "a", "grade": "good", "reason": "x"}', "grade must be one of right, partly, wrong"),
    ('{"id": "a", "grade": "wrong", "reason": ""}', "reason one non-empty line"),
    ('{"id": "a", "grade": "wrong", "reason": "x"}\n{"id": "a", "grade": "right", "reason": "y"}', "graded twice"),
    ("not json", "line 1: not JSON"),
])
def test_bad_grades_are_one_line_errors(tmp_path, line, culprit):
    grades = tmp_path / "g.jsonl"
    grades.write_text(line + "\n")
    with pytest.raises(InputError, match="g.jsonl line") as info:
        read_grades(grades, [{"id": "a"}])
    assert culprit in str(info.value)


def test_calibration_from_confidence_and_grades(tmp_path):
    def answer(ident, confidence, recall, hit):
        return {"id": ident, "program": "p", "kind": "how", "grounded": True, "confidence": confidence,
                "seconds": 1.0, "metrics": {"evidence_hit": True, "lead_hit": hit, "key_fact_recall": recall,
                                            "correct": recall >= 0.5 and hit}}
    (tmp_path / "t").mkdir()
    rows = [answer("a", 0.9, 1.0, True), answer("b", 0.8, 0.0, True), answer("c", 0.1, 0.0, False)]
    (tmp_path / "t" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grades = tmp_path / "g.jsonl"
    grades.write_text(json.dumps({"id": "b", "grade": "right", "reason": "said it in other words"}) + "\n")
    text = summary_text(tmp_path / "t", grades)
    assert "| [0.75, 1.00] | 2 | 0.50 |" in text  # automatic: a is correct, b is not
    assert "| confidence | answers | right (hand, 1 graded) |" in text and "| [0.75, 1.00] | 1 | 1.00 |" in text


def test_errors_are_one_line_with_exit_code_2(layout, capsys):
    data, out = layout
    argv = ["--data", str(data), "--out", str(out)]
    assert main([*argv, "run", "--split", "test", "--tag", "t"]) == 2
    assert "program other: no question file" in capsys.readouterr().err
    (data / "other.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n")
    assert main([*argv, "run", "--split", "test", "--tag", "t"]) == 2
    assert "program other is not fetched" in capsys.readouterr().err and not (out / "t").exists()
    assert main([*argv, "summary", "--tag", "../up"]) == 2
    assert "--tag '../up'" in capsys.readouterr().err
    assert main([*argv, "grade", "--tag", "missing"]) == 2
    assert "answers.jsonl is missing" in capsys.readouterr().err
    assert main([*argv, "run", "--split", "dev", "--tag", "t", "model=no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no_such_model" in err and "Traceback" not in err
