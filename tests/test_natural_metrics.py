"""Natural questions (docs/behaviour.md §9): the natural line format, evidence hit over several gold spans, the
answer's lead and lead hit, key-fact recall, telemetry counts, calibration, and the eval graph's natural report
(an old set's report unchanged)."""
from __future__ import annotations

import json

import pytest
from conftest import KETTLE_PROGRAM, evaluate

from pipeline.engine.errors import InputError, PipelineError
from pipeline.engine.records import Telemetry
from stages.common.retrieval.evaluation import Question, Record, entry, load_questions, natural_row
from stages.common.retrieval.natural import (
    aggregate,
    answer_lead,
    calibration,
    correct,
    evidence_hit,
    facts_stated,
    key_fact_recall,
    lead_hit,
    prose,
    summarize,
)

GOLD = (("_hooks.py", 120, 160), ("_manager.py", 30, 40))


def test_evidence_hit_is_any_window_over_any_gold_span():
    assert evidence_hit([("_hooks.py", 1, 20), ("_manager.py", 38, 60)], GOLD)
    assert evidence_hit([("_hooks.py", 160, 170)], GOLD)  # one shared line is an overlap
    assert not evidence_hit([("_hooks.py", 161, 170), ("_manager.py", 1, 29), ("other.py", 120, 160)], GOLD)
    assert not evidence_hit([], GOLD)


def test_the_answers_lead_is_its_first_cited_name_else_the_recorded_choice():
    text = "The order: `tryfirst` comes first. `HookCaller._add_hookimpl` [_hooks.py:130-150] sorts them; `x` [a.py:1]"
    assert answer_lead(text) == ("HookCaller._add_hookimpl", ("_hooks.py", 130, 150))
    assert answer_lead("`validate()` [timed.py:160-167] calls unsign") == ("validate", ("timed.py", 160, 167))
    assert answer_lead("`x` [a.py:7] first") == ("x", ("a.py", 7, 7))
    # no cited name in the text: telemetry's lead choice stands for it
    assert answer_lead("no names here", "`Signer.unsign` [signer.py:72-160]") == ("Signer.unsign", ("signer.py", 72, 160))
    assert answer_lead("`name` without a citation", "") is None and answer_lead(None) is None


@pytest.mark.parametrize("name, cited, hit", [
    ("HookCaller._add_hookimpl", ("elsewhere.py", 1, 2), True),  # the qualname itself: no citation needed
    ("_add_hookimpl", ("_hooks.py", 130, 150), True),  # the method's name, cited inside the gold span
    ("_add_hookimpl", ("_hooks.py", 1, 20), False),  # the same name cited elsewhere: another definition
    ("_add_hookimpl", None, False),
    ("pluggy.HookCaller._add_hookimpl", ("_hooks.py", 125, 125), True),  # more qualified, cited in the span
    ("add_hookimpl", ("_hooks.py", 130, 150), False),  # not a dotted suffix: a different name
    ("HookCaller", ("_hooks.py", 130, 150), False),  # the class is not its method
])
def test_lead_hit_matches_qualnames_and_dotted_suffixes_cited_in_the_gold_span(name, cited, hit):
    assert lead_hit((name, cited), ["HookCaller._add_hookimpl"], GOLD) is hit


def test_lead_hit_without_a_lead_or_without_leads():
    assert lead_hit(None, ["f"], GOLD) is False
    assert lead_hit(("f", None), [], GOLD) is None
    assert lead_hit(("g", None), ["f", "g"], GOLD) is True  # any of the alternatives


def test_key_facts_are_whole_words_case_insensitive_with_alternatives():
    answer = ("`unsign` [timed.py:137-153] compares the `age` with MAX_AGE and raises `SignatureExpired` when "
              "it is older; hook wrappers run around them.")
    assert facts_stated(answer, ["max_age", "SignatureExpired", "BadSignature|SignatureExpired", "expired",
                                 "hook   wrappers", "age", "153"]) == [True, True, True, False, True, True, False]
    assert key_fact_recall(answer, ["max_age", "BadTimeSignature"]) == 0.5
    assert key_fact_recall("It returns False.", ["raises", "False|None"]) == 0.5
    assert key_fact_recall(answer, []) is None and key_fact_recall(None, ["x"]) == 0.0


def test_a_fact_is_not_stated_by_a_longer_identifier_or_by_the_pipelines_markers():
    assert facts_stated("uses max_age_seconds and trylast_impl", ["max_age", "trylast"]) == [False, False]
    # a citation's line numbers, a marker's words and a bare citation are not the answer's statements
    text = "It calls `f` [a.py:3600-3610] [the code says: f returns None] as b.py:12-14 shows"
    assert facts_stated(text, ["3600", "None", "12", "f"]) == [False, False, False, True]
    assert "d['k']" in prose("`d['k']` is read")  # brackets inside code stay
    # a fact that begins or ends with punctuation has no word boundary to find
    assert facts_stated('it strips "=" from the end: rstrip(b"=")', ['"="', "rstrip"]) == [True, True]


def test_counts_correctness_and_calibration():
    assert correct(0.5, True) is True and correct(0.25, True) is False and correct(1.0, False) is False
    assert correct(None, True) is True and correct(None, None) is None
    rows = [{"confidence": 0.1, "correct": False}, {"confidence": 0.3, "correct": True},
            {"confidence": 0.9, "correct": True}, {"confidence": 1.0, "correct": False},
            {"confidence": None, "correct": True}, {"confidence": 0.6, "correct": None}]
    table = calibration(rows)
    assert [(b["bucket"], b["answers"], b["correct"]) for b in table] == [
        ("[0.00, 0.25)", 1, 0.0), ("[0.25, 0.50)", 1, 1.0), ("[0.50, 0.75)", 0, None), ("[0.75, 1.00]", 2, 0.5)]
    assert calibration([{"confidence": None, "correct": True}]) == []


def test_aggregates_leave_absent_metrics_as_none():
    rows = [{"kind": "how", "program": "p", "evidence_hit": True, "lead_hit": True, "key_fact_recall": 1.0,
             "claims_contradicted": None, "grounded": True, "seconds": 2.0},
            {"kind": "why", "program": "p", "evidence_hit": False, "lead_hit": False, "key_fact_recall": 0.0,
             "claims_contradicted": None, "grounded": False, "seconds": 4.0}]
    overall = aggregate(rows)
    assert overall["evidence_hit"] == 0.5 and overall["key_fact_recall"] == 0.5 and overall["seconds"] == 3.0
    assert overall["claims_contradicted"] is None and overall["confidence"] is None
    report = summarize(rows)
    assert list(report["by_kind"]) == ["how", "why"] and report["by_kind"]["how"]["lead_hit"] == 1.0
    assert report["by_program"]["p"]["questions"] == 2 and report["calibration"] == []


def test_natural_row_reads_the_answer_and_telemetry():
    q = Question("How are hooks ordered?", "_hooks.py", 120, 160, natural=True, id="p-1", program="p", kind="how",
                 gold=GOLD, leads=("HookCaller._add_hookimpl",), key_facts=("tryfirst", "trylast", "hookwrapper"))
    answer = "`_add_hookimpl` [_hooks.py:121-140] puts tryfirst ones last in the list."
    r = Record(files=["_hooks.py"], windows=[("_hooks.py", 100, 130)], seconds=3.25, citations=[
        {"path": "_hooks.py", "start": 121, "end": 140, "valid": True}], answer=answer, grounded=None,
        confidence=0.8, claims_checked=2, claims_contradicted=1)
    row = natural_row(q, r)
    assert row["evidence_hit"] and row["lead"] == "_add_hookimpl" and row["lead_hit"] is True
    assert row["key_facts_stated"] == ["tryfirst"] and row["key_fact_recall"] == pytest.approx(1 / 3, abs=1e-4)
    assert row["correct"] is False and row["grounded"] is True  # no badge recorded: a valid citation stands for it
    assert (row["confidence"], row["claims_checked"], row["claims_contradicted"]) == (0.8, 2, 1)
    retrieval = natural_row(q, Record(files=[], windows=[("_manager.py", 40, 41)], seconds=0.5))
    assert retrieval["evidence_hit"] and "lead_hit" not in retrieval and "answer" not in retrieval


def test_telemetry_entries_are_fields_or_extra_keys():
    assert entry(Telemetry().with_entries({"confidence": 0.4, "margin_only": 2}), "confidence") == 0.4
    assert entry(Telemetry().with_entries({"margin_only": 2}), "margin_only") == 2  # an extra key of the record
    assert entry(Telemetry(), "confidence") is None and entry(Telemetry(), "no_such_key") is None


class _Result:
    def __init__(self, values):
        self.values = values

    def output(self, node, port, default=None):
        return self.values.get((node, port), default)


def test_claim_counts_are_read_only_where_claims_were_checked():
    from types import SimpleNamespace as Report  # the claims node's report, as the eval reads it

    from stages.eval import record

    refs = {"telemetry": ("telemetry", "telemetry"), "claims": ("claims", "report")}
    checked = record(_Result({("claims", "report"): Report(action="mark", checked=3, contradicted=2)}), refs, 1.0)
    assert (checked.claims_checked, checked.claims_contradicted) == (3, 2)
    none = Report(action="none", checked=0, contradicted=0)
    for values in ({("claims", "report"): none}, {}):  # claims=none, or no claims node
        unchecked = record(_Result(values), refs, 1.0)
        assert unchecked.claims_checked is None and unchecked.claims_contradicted is None


LINE = {"id": "k-1", "program": "kettle", "kind": "how", "question": "How is water boiled?", "path": "kettle.py",
        "start": 1, "end": 4, "gold": [{"path": "kettle.py", "start": 1, "end": 4}, {"path": "cup.py", "start": 1,
                                                                                         "end": 3}],
        "leads": ["boil_water"], "key_facts": ["temperature", "100|hundred"], "answer": "It multiplies by 100."}


def _write(path, *items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_natural_lines_load_with_every_key_and_old_lines_stay_plain(tmp_path):
    old = {"question": "Boil water.", "path": "kettle.py", "start": 1, "end": 4}
    natural, plain = load_questions(_write(tmp_path / "q.jsonl", LINE, old))
    assert natural.natural and natural.id == "k-1" and natural.kind == "how" and natural.leads == ("boil_water",)
    assert natural.spans == (("kettle.py", 1, 4), ("cup.py", 1, 3)) and natural.key_facts == ("temperature", "100|hundred")
    assert not plain.natural and plain.spans == (("kettle.py", 1, 4),) and plain.key_facts == ()


@pytest.mark.parametrize("change, culprit", [
    ({"kind": "when"}, "'kind' must be one of"),
    ({"gold": [{"path": "kettle.py", "start": 5, "end": 2}]}, "each 'gold' span"),
    ({"gold": {"path": "kettle.py"}}, "'gold' must be a list"),
    ({"leads": "boil_water"}, "'leads' must be a list"),
    ({"key_facts": ["a||b"]}, "empty alternative"),
    ({"key_facts": [""]}, "'key_facts' must be a list of non-empty strings"),
    ({"id": 3}, "'id' must be a string"),
])
def test_bad_natural_lines_are_one_line_errors(tmp_path, change, culprit):
    with pytest.raises(InputError, match="line 1") as info:
        load_questions(_write(tmp_path / "q.jsonl", {**LINE, **change}))
    assert culprit in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def kettle(tmp_path_factory, make_tree):
    base = tmp_path_factory.mktemp("natural")
    return base, make_tree(base / "prog", KETTLE_PROGRAM)


def test_a_gold_span_outside_the_program_names_the_question(kettle, tmp_path):
    base, program = kettle
    bad = _write(tmp_path / "q.jsonl", {**LINE, "gold": [{"path": "cup.py", "start": 1, "end": 99}]})
    with pytest.raises(PipelineError, match="question 1: cup.py:1-99 is past the end"):
        evaluate(base, program, bad, run_dir=tmp_path / "run")


def test_the_eval_reports_natural_metrics_and_leaves_old_sets_as_they_were(kettle, tmp_path):
    base, program = kettle
    old = {"question": "Fill the cup with water up to its brim.", "path": "cup.py", "start": 1, "end": 3}
    _, _, plain = evaluate(base, program, _write(tmp_path / "old.jsonl", old), run_dir=tmp_path / "old")
    assert "natural" not in plain and "evidence_hit" not in plain["metrics"]["ours"]
    assert set(plain["per_question"][0]) == {"question", "sentence", "path", "start", "end", "ours", "bm25"}
    second = {**LINE, "id": "k-2", "kind": "where", "question": "Where is a cup filled?", "path": "cup.py",
              "start": 1, "end": 3, "gold": [], "leads": ["fill_cup"], "key_facts": ["water"]}
    questions = _write(tmp_path / "n.jsonl", LINE, second)
    _, _, report = evaluate(base, program, questions, "eval.metric=evidence_hit", run_dir=tmp_path / "n")
    ours = report["metrics"]["ours"]
    assert 0 <= ours["evidence_hit"] <= 1 and ours["lead_hit"] is None and ours["key_fact_recall"] is None
    assert report["metrics"]["bm25"]["evidence_hit"] is not None
    assert set(report["natural"]["ours"]["by_kind"]) == {"how", "where"}
    assert report["natural"]["ours"]["by_program"]["kettle"]["questions"] == 2
    item = report["per_question"][0]
    assert (item["id"], item["kind"], item["program"]) == ("k-1", "how", "kettle")
    # a window over the main span is a window over a gold span
    assert all(i["ours"]["window_rank"] is None or i["ours"]["natural"]["evidence_hit"] for i in report["per_question"])
    assert "answer" not in item["ours"]["natural"]
    # answer mode: the answer's lead, facts, badge and seconds, per question and overall
    _, _, answered = evaluate(base, program, questions, "eval.mode=answer", "decode.max_new_tokens=6",
                              run_dir=tmp_path / "a")
    row = answered["per_question"][1]["ours"]["natural"]
    assert {"answer", "lead", "lead_hit", "key_fact_recall", "grounded", "confidence", "claims_contradicted",
            "correct", "seconds"} <= set(row)
    assert isinstance(row["lead_hit"], bool) and 0 <= row["key_fact_recall"] <= 1 and row["seconds"] > 0
    assert isinstance(row["claims_contradicted"], int)  # the default graph checks claims
    overall = answered["natural"]["ours"]["overall"]
    assert overall["questions"] == 2 and overall["lead_hit"] is not None and overall["grounded_rate"] is not None
