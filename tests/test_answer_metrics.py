"""Answer metrics (docs/behaviour.md §9) on hand-made records, and the code-like-name check behind unknown identifiers."""
from __future__ import annotations

import pytest

from stages.common.grounding.identifiers import UNKNOWN_MARK, check_names, code_names, mark_unknown
from stages.common.retrieval.evaluation import ANSWER_METRICS, Question, Record, answer_metrics, mentions, score

Q1 = Question("Checks if an encoding is ascii.", "_compat.py", 43, 48, "is_ascii_encoding")
Q2 = Question("Returns the best encoding.", "_compat.py", 51, 56, "get_best_encoding")
Q3 = Question("Opens a file.", "utils.py", 381, 427, "open_file")


def cite(path, start, end, valid=True, source="model"):
    return {"path": path, "start": start, "end": end, "valid": valid, "source": source, "removed": not valid}


RECORDS = [
    # model cites the answer itself and names it; one unknown of four names; no retry
    Record([], [], 10.0, [cite("_compat.py", 43, 48)], 0, "`is_ascii_encoding` [_compat.py:43-48] uses codec_x.",
           names=4, unknown=["codec_x"], new_tokens=100, decode_seconds=4.0, code_lines=3, code_unverified=2,
           mislabelled=1),
    # the model cites a wrong window; repair attributes the right one; a retry ran
    Record([], [], 20.0, [cite("_compat.py", 1, 9), cite("_compat.py", 50, 56, source="attributed")], 1,
           "`decode_it` [_compat.py:1-9]", names=2, unknown=[], new_tokens=300, decode_seconds=10.0),
    # no valid model citation at all (an invalid one), symbol mentioned through a qualname
    Record([], [], 30.0, [cite("other.py", 1, 2, valid=False)], 0, "`Helpers.open_file` does it.",
           names=2, unknown=["Helpers.open_file", "x_y"], new_tokens=50, decode_seconds=0.0),
]


def test_answer_metrics_from_hand_made_records():
    metrics = answer_metrics(list(zip([Q1, Q2, Q3], RECORDS)))
    assert metrics["model_citation_rate"] == pytest.approx(2 / 3, abs=1e-4)  # answers 1 and 2
    assert metrics["model_citation_hit"] == pytest.approx(1 / 3, abs=1e-4)  # only answer 1's model citation hits
    assert metrics["first_citation_hit"] == pytest.approx(1 / 3, abs=1e-4)  # answer 1's first (its lead)
    later = Record([], [], 1.0, [cite("_compat.py", 1, 9), cite("_compat.py", 43, 48)], 0, "", names=0)
    assert answer_metrics([(Q1, later)])["model_citation_hit"] == 1.0  # a later citation hits ...
    assert answer_metrics([(Q1, later)])["first_citation_hit"] == 0.0  # ... the first does not
    assert metrics["citation_hit"] == pytest.approx(2 / 3, abs=1e-4)  # answer 2's attributed one hits too
    assert metrics["symbol_hit"] == pytest.approx(2 / 3, abs=1e-4)  # answers 1 and 3
    assert metrics["unknown_identifier_rate"] == pytest.approx(3 / 8)  # 1 + 0 + 2 unknown of 4 + 2 + 2 names
    assert metrics["unknown_per_answer"] == pytest.approx(1.0)
    assert metrics["invented_code_rate"] == pytest.approx(1 / 3, abs=1e-4)  # answer 1: 2 of its 3 code lines
    assert metrics["invented_code_lines"] == pytest.approx(2 / 3, abs=1e-4)
    assert metrics["mislabelled_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics["retry_rate"] == pytest.approx(1 / 3, abs=1e-4) and metrics["retries"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics["tokens_per_second"] == pytest.approx((25 + 30) / 2)  # the answer with no decode time is left out
    assert metrics["citation_precision"] == pytest.approx(3 / 4)


def test_score_leaves_answer_metrics_empty_in_retrieval_mode():
    metrics = score([Q1], [Record(["_compat.py"], [("_compat.py", 40, 50)], 0.1)], 5)
    assert set(answer_metrics(list(zip([Q1, Q2, Q3], RECORDS)))) == set(ANSWER_METRICS)  # every one is left empty here
    assert all(metrics[name] is None for name in ANSWER_METRICS)
    assert metrics["evidence_recall@5"] == 1.0 and metrics["symbol_hit"] is None and metrics["retry_rate"] is None


@pytest.mark.parametrize("text, name, hit", [
    ("see `Context.invoke`", "invoke", True), ("invoke_all is different", "invoke", False),
    ("the invoker", "invoke", False), ("call invoke()", "invoke", True), ("", "invoke", False),
])
def test_symbol_mention_is_a_whole_identifier(text, name, hit):
    assert mentions(text, name) is hit


def test_code_like_names_and_their_shapes():
    text = ("`is_ascii_encoding` [_compat.py:43-48] checks. It calls codecs.lookup; StepType, build_pipelines() and "
            "myVar, HTTPServer, __init__, _private. e.g. plain words, a URL https://x.org/a_b, version 1.2.3.\n"
            "```python\nx = foo_bar(1)\n```\n")
    skip = [(text.index("["), text.index("]") + 1)]
    assert code_names(text, skip) == ["is_ascii_encoding", "codecs.lookup", "StepType", "build_pipelines", "myVar",
                                      "HTTPServer", "__init__", "_private", "foo_bar"]


def test_unknown_names_are_those_the_program_and_question_lack(make_index, tmp_path):
    index = make_index(tmp_path / "p", {"pkg/io_utils.py": "import codecs\n\n\nclass Reader:\n"
                                                           "    def read_all(self):\n        return codecs.lookup('x')\n"})
    text = ("`Reader.read_all` reads with codecs.lookup and io_utils.py; it also calls fetch_remote, "
            "`Reader.write_all` and user_given, then os.path.joinx.")
    check = check_names(text, index, "Why does user_given fail?")
    assert check.unknown == ["fetch_remote", "Reader.write_all", "os.path.joinx"]
    assert "Reader.read_all" in check.names and "io_utils.py" in check.names and "user_given" in check.names
    assert check.rate == pytest.approx(3 / len(check.names))


def test_unknown_names_are_marked_once_after_their_backticks():
    marked = mark_unknown("Use `fetch_remote` then fetch_remote again, and x_y.", ["fetch_remote", "x_y"])
    assert marked == f"Use `fetch_remote`{UNKNOWN_MARK} then fetch_remote again, and x_y{UNKNOWN_MARK}."
