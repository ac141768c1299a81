"""`pipeline.generate_answer` returns an `Answer` (pipeline/answer.py): the text, citations with the code of their
lines (never read outside the program root), grounded and why not, the run folder and its telemetry record."""
from __future__ import annotations

import json

import pytest
from conftest import generation

import pipeline
from pipeline.answer import Answer, why_not
from pipeline.engine.records import CitationRecord, Telemetry

CORE = 'def add(a, b):\n    """Add."""\n    return a + b\n'
PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": CORE}
QUICK = ["decode.max_new_tokens=4", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4"]


@pytest.fixture
def program(tmp_path, make_tree):
    (tmp_path / "outside.py").write_text("SECRET = 'never shown'\n")
    return make_tree(tmp_path / "prog", PROGRAM)


def answer_with(monkeypatch, tmp_path, program, text: str) -> Answer:
    import stages.decode

    monkeypatch.setattr(stages.decode, "generate", lambda lm, prompt, settings, reuse=None: generation(text))
    return pipeline.generate_answer("tiny_random", None, str(program), "how does add work",
                                    overrides=[f"paths.outputs={tmp_path / 'out'}", *QUICK])


def test_the_answer_is_its_run_folders_telemetry(monkeypatch, tmp_path, program):
    answer = answer_with(monkeypatch, tmp_path, program, "`add` returns a + b [pkg/core.py:1-3].")
    assert isinstance(answer, pipeline.Answer)
    data = json.loads((answer.run_dir / "telemetry.json").read_text())
    assert answer.telemetry == Telemetry.from_json(data)
    assert str(answer) == answer.text == data["answer"] and answer == data["answer"] and "add" in answer
    assert answer.grounded is data["grounded"] is True and answer.why == ""
    assert [(c.path, c.start, c.end, c.valid, c.source) for c in answer.citations] == [
        (c["path"], c["start"], c["end"] if c["end"] is not None else c["start"], c["valid"], c["source"])
        for c in data["citations"]]
    (cited,) = answer.citations
    assert cited.code == CORE.rstrip("\n")  # the cited lines' text, read from the program root
    assert answer.confidence == data["confidence"] and 0 <= answer.confidence <= 1  # the badge node's
    with pytest.raises(AttributeError):
        answer.text = "changed"


def test_citations_outside_the_root_carry_no_code_and_say_why(monkeypatch, tmp_path, program):
    answer = answer_with(monkeypatch, tmp_path, program,
                         "`add` returns a + b [pkg/core.py:3-3], also ../outside.py:1 and /etc/passwd.py:1.")
    data = json.loads((answer.run_dir / "telemetry.json").read_text())
    assert answer.grounded is data["grounded"] is False
    assert answer.why == why_not(answer.telemetry, False) and answer.why.startswith("the citation check failed")
    by_path = {c.path: c for c in answer.citations}
    assert by_path["pkg/core.py"].code == "    return a + b" and by_path["pkg/core.py"].valid
    outside = [c for c in answer.citations if c.path != "pkg/core.py"]
    assert outside and all(c.code is None and not c.valid and c.removed and c.reason for c in outside)
    assert not any("SECRET" in (c.code or "") for c in answer.citations)


def test_keyword_call_with_the_real_tiny_model(tmp_path, program):
    answer = pipeline.generate_answer(model_id="tiny_random", adapters_npz=None, program_root=str(program),
                                      prompt="how does add work", overrides=[f"paths.outputs={tmp_path / 'out'}", *QUICK])
    data = json.loads((answer.run_dir / "telemetry.json").read_text())
    assert answer == data["answer"] and str(answer) == data["answer"]
    assert answer.grounded is bool(data["grounded"]) and (answer.why == "") is answer.grounded
    assert answer.telemetry is not None and answer.telemetry.prompt == "how does add work"
    assert len(answer.citations) == len(data["citations"])


@pytest.mark.parametrize("fields, expected", [
    ({"grounded": True}, ""),
    ({"status": "failed", "error": "decode: out of memory"}, "the run failed: decode: out of memory"),
    ({"answer": None}, "no answer was recorded"),
    ({}, "the answer cites no code"),
    ({"citations": (CitationRecord(path="a.py", start=1, reason="not in evidence", removed=True),)},
     "its one citation is not valid (not in evidence); 1 removed from the text"),
    ({"citations": (CitationRecord(path="a.py", start=1), CitationRecord(path="b.py", start=2))},
     "none of its 2 citations is valid"),
    ({"citations": (CitationRecord(path="a.py", start=1, valid=True),), "first_check": {"reason": "too few"}},
     "the citation check failed: too few"),
    ({"citations": (CitationRecord(path="a.py", start=1, valid=True),), "first_check": {"reason": "too few"},
      "fallback_used": True}, "the citation check failed on the retry too (the first draft: too few)"),
])
def test_why_not_reads_the_record(fields, expected):
    fields = {"answer": "text", **fields}
    grounded = bool(fields.get("grounded"))
    assert why_not(Telemetry(**fields), grounded) == expected


def test_an_answer_is_used_like_its_text():
    a, b = Answer(text="x"), Answer(text="x")
    assert a == "x" and a != "y" and a == b and hash(a) == hash("x") and str(a) == "x" and f"{a}" == "x"
    assert Answer(text="x", grounded=True) != a
