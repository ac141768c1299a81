"""The honest badge (stage `badge`, stages/common/grounding/badge.py): `grounded` is false on every degenerate or cut
reply and true on a clean one; a cut reply ends at its last full sentence with a notice, and its citations agree with
its text; the confidence is in [0, 1] and lower for a degenerate or cut reply than for a clean one."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import networkx as nx
import pytest

import pipeline
from stages.badge import HonestBadge
from stages.common.grounding.badge import (
    NOTICE,
    BadgeSettings,
    degenerate,
    judge,
    last_sentence_end,
    loop,
    trim_cut,
)
from stages.common.grounding.citations import check
from stages.common.grounding.claimcheck import ClaimsReport
from stages.common.types import Answer, Citation, Draft, Evidence, FileRecord, PackedWindow, ProgramIndex

LEAD = "`add` [pkg/core.py:1-3]"
CLEAN = f"{LEAD} adds its two arguments and returns the sum.\n\nIt is called by `total` [pkg/core.py:6-10] in a loop."
BRACKETS = f"{LEAD}]]]]]]]]]]]] adds its two arguments and returns the sum."
LOOPING = LEAD + " returns the sum of its arguments," * 4 + " and stops."
EMPTY = f"{LEAD}\n\n[pkg/core.py:6-10]"
CORE = 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n\n\ndef total(xs):\n    out = 0\n    for x in xs:\n' \
       "        out = add(out, x)\n    return out\n"
PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": CORE}
QUICK = ["decode.max_new_tokens=4", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4"]


def index() -> ProgramIndex:
    files = {"pkg/core.py": FileRecord("pkg/core.py", "", len(CORE), 10, "pkg.core", True)}
    return ProgramIndex(Path("/nowhere"), files, [], [], nx.MultiDiGraph(), "")


def evidence(first: float = 2.0, second: float = 1.0) -> Evidence:
    return Evidence([PackedWindow("pkg/core.py", 1, 3, "", first), PackedWindow("pkg/core.py", 6, 10, "", second)], 0)


def answer(text: str, cut_at: int | None = None, margin: float | None = 2.0) -> Answer:
    """``text`` as the answer of a draft (lead chosen with ``margin``), its citations checked against evidence()."""
    draft = Draft(text, 10, 20, 0.0, "cpu", lead={"lead": LEAD, "lead_margin": margin}, cut_at=cut_at)
    report = check(text, index(), evidence(), 1, False, ())
    return Answer(text, report.citations, draft, report, 0, False)


@pytest.mark.parametrize("text, trait", [
    (BRACKETS, "a run of 13 ']'"),  # the citation's own ']' and 12 more
    (LOOPING, "a loop ('returns the sum of its arguments' 4 times)"),
    (EMPTY, "an empty explanation after the lead"),
    (f"{LEAD} adds it", "an empty explanation after the lead (2 words)"),
    # code and bare citations are no explanation (the shape small models write when they cannot explain)
    (f"{LEAD}\n[pkg/core.py:6-10]\ndef add(a, b):\n    return a + b\n```\nadds the two\n```",
     "an empty explanation after the lead"),
])
def test_each_degenerate_trait_is_found_and_named(text, trait):
    assert degenerate(text, LEAD, 0, BadgeSettings()) == [trait]
    badge = judge(answer(text), evidence(), 0, BadgeSettings())
    assert not badge.grounded and trait in badge.reasons["degenerate"] and set(badge.reasons) == {"degenerate"}


def test_the_prompt_written_back_is_degenerate():
    text = f"{LEAD} adds its two arguments and returns the sum.\n\nQuestion: How does add work? [pkg/core.py:1-3]"
    assert degenerate(text, LEAD, 0, BadgeSettings()) == ["the prompt repeated ('Question: How does add work? [pkg/core.p')"]
    rule = f"{LEAD} adds its two arguments. Cite the lines you rely on in brackets, like [pkg/core.py:1-3]."
    assert degenerate(rule, LEAD, 0, BadgeSettings()) == [f"the prompt repeated ('{rule[:40]}')",
                                                           "an empty explanation after the lead"]  # the line is the rule's
    assert degenerate(f"{LEAD}\nQuestion: How? [pkg/core.py:1-3]", LEAD, 0, BadgeSettings()) == [
        "the prompt repeated ('Question: How? [pkg/core.py:1-3]')", "an empty explanation after the lead"]


def test_a_clean_reply_is_grounded_and_its_confidence_is_the_highest():
    clean = judge(answer(CLEAN), evidence(), 0, BadgeSettings())
    assert clean.grounded and clean.reasons == {} and 0 <= clean.confidence <= 1
    assert degenerate(CLEAN, LEAD, 0, BadgeSettings()) == []
    for text in (BRACKETS, LOOPING, EMPTY):
        worse = judge(answer(text), evidence(), 0, BadgeSettings())
        assert 0 <= worse.confidence < clean.confidence
    cut = judge(trim_cut(answer(CLEAN + " Then it", cut_at=64), index(), "trim"), evidence(), 0, BadgeSettings())
    assert not cut.grounded and cut.reasons == {"cut": "cut at max_new_tokens=64"} and cut.cut_at == 64
    assert 0 <= cut.confidence < clean.confidence


def test_a_cut_reply_ends_at_its_last_full_sentence_with_the_notice_and_its_citations_agree():
    text = CLEAN + " When the list is empty it returns `0` [pkg/core.py:7-7] and the loop [pkg/x.py:9] never"
    cut = trim_cut(answer(text, cut_at=256), index(), "trim")
    assert cut.text == CLEAN + " " + NOTICE.format(limit=256)
    assert cut.text.endswith("in a loop. … [cut at max_new_tokens=256]")
    # the two citations of the sentence cut away left the list; the ones the reader sees stay, in order
    assert [(c.path, c.start, c.end) for c in cut.citations] == [("pkg/core.py", 1, 3), ("pkg/core.py", 6, 10)]
    assert len(check(cut.text, index(), evidence(), 1, False, ()).citations) == len(cut.citations)
    # cut=mark says so and keeps every word and citation
    marked = trim_cut(answer(text, cut_at=256), index(), "mark")
    assert marked.text == text + " " + NOTICE.format(limit=256) and marked.citations == answer(text).citations
    # a reply that ended by itself is left as it is
    assert trim_cut(answer(text), index(), "trim") == answer(text)


@pytest.mark.parametrize("text, kept", [
    ("It returns a. Then b [a.py:1-2] and", "It returns a."),
    ("It returns a [a.py:1-2]. [a.py:3-4] Then", "It returns a [a.py:1-2]. [a.py:3-4]"),
    ("Steps:\n1. open the file and", None),  # a list number ends no sentence
    ("It works, e.g. for lists and", None),
    ("`add` [a.py:1-3]\n\nIt adds a and", "`add` [a.py:1-3]"),  # a paragraph a blank line ends
    ("It is this.\n\n```python\nx = 1. \ny = 2\n```\nand then", "It is this."),  # a fence holds no end
    ("It adds. Here is how:\n\n```python\nx = 1\n", "It adds."),  # a paragraph that leads into the cut text
    ("Is it? Yes! It returns `a.b`. And then", "Is it? Yes! It returns `a.b`."),
])
def test_the_last_full_sentence(text, kept):
    end = last_sentence_end(text)
    assert (text[:end] if end is not None else None) == kept


def test_a_repair_marker_cut_away_leaves_the_list_too():
    text = f"{LEAD} adds a and b. It also reads [not in evidence: pkg/core.py:9-9] and"
    base = answer(text, cut_at=8)
    gone = Citation("pkg/core.py", 9, 9, False, "model", True, "span is not in the packed evidence")  # as repair keeps it
    base = dataclasses.replace(base, citations=[base.citations[0], gone])
    cut = trim_cut(base, index(), "trim")
    assert cut.text.startswith(f"{LEAD} adds a and b. …") and len(cut.citations) == 1 and cut.citations[0].valid


def test_the_settings_move_the_checks():
    assert degenerate(BRACKETS, LEAD, 0, BadgeSettings(bracket_run=14)) == []
    assert loop(LOOPING, 6, 5) == ("", 0) and loop(LOOPING, 13, 3) == ("", 0)
    assert degenerate(LOOPING, LEAD, 0, BadgeSettings(loop_ngram=13)) == []
    assert degenerate(LOOPING, LEAD, 0, BadgeSettings(loop_repeats=5)) == []
    assert degenerate(EMPTY, LEAD, 0, BadgeSettings(min_explanation_words=0)) == []
    assert degenerate(CLEAN, LEAD, 0, BadgeSettings(min_explanation_words=30)) != []


def confidence(text: str = CLEAN, contradicted: int = 0, margin: float | None = 2.0, ev: Evidence | None = None,
               cut_at: int | None = None, **settings) -> float:
    return judge(answer(text, cut_at, margin), ev or evidence(), contradicted, BadgeSettings(**settings)).confidence


def test_the_confidence_formula_and_its_settings():
    import math

    m, e = 1 - math.exp(-2.0 / 4.0), 1.0  # the lead's margin 2 nats (scale 4); it cites the best packed window
    assert confidence() == round((m + e) / 2, 4)
    assert confidence(margin_weight=0.0) == 1.0 and confidence(evidence_weight=0.0) == round(m, 4)
    assert confidence(margin_scale=8.0) < confidence()  # the same margin counts for less
    assert confidence(margin=None) == round((0.5 + e) / 2, 4)  # one lead choice: no runner-up
    assert confidence(margin=None, no_margin=0.0) == 0.5
    flat = Evidence([PackedWindow("pkg/core.py", 1, 3, "", 0.0)], 0)  # pack=heads: no window is scored
    assert confidence(ev=flat, no_evidence=0.0, margin_weight=0.0) == 0.0
    assert confidence(ev=flat, margin_weight=0.0) == 0.5
    weaker = evidence(first=1.0, second=4.0)  # the best window is one the answer cites less well
    assert confidence(ev=weaker, margin_weight=0.0) == 1.0  # it cites 6-10 too
    only_lead = f"{LEAD} adds its two arguments and returns the sum."
    assert confidence(only_lead, ev=weaker, margin_weight=0.0) == 0.25
    base = confidence()
    assert confidence(contradicted=2) == pytest.approx(base * 0.25, abs=1e-4)
    assert confidence(contradicted=2, claims_factor=1.0) == base
    assert confidence(BRACKETS) == pytest.approx(base * 0.2, abs=1e-4)
    assert confidence(BRACKETS, degenerate_factor=1.0) == base
    assert confidence(CLEAN + " And", cut_at=9) == pytest.approx(base * 0.5, abs=1e-4)  # untrimmed here: only the factor
    assert confidence(CLEAN + " And", cut_at=9, cut_factor=0.1) == pytest.approx(base * 0.1, abs=1e-4)
    uncited = "`add` adds a and b, returning their sum."
    assert confidence(uncited) < base and confidence(uncited, citations_factor=1.0, margin_weight=0.0) == 0.0
    for text in (CLEAN, BRACKETS, LOOPING, EMPTY, uncited):
        assert 0.0 <= confidence(text, contradicted=3) <= 1.0


def test_the_stage_reads_a_claims_report_and_says_why():
    stage = HonestBadge(cut="trim")
    report = ClaimsReport(claims=(SimpleNamespace(verdict="contradicted"), SimpleNamespace(verdict="supported")))
    out = stage.run(answer(CLEAN), index(), evidence(), claims=report)
    assert not out["badge"].grounded and out["badge"].reasons == {"claims": "1 contradicted claim"}
    assert stage.run(answer(CLEAN), index(), evidence(), claims=ClaimsReport())["badge"].grounded
    out = stage.run(answer(CLEAN), index(), evidence())  # a graph without a claims node
    assert out["badge"].grounded and out["answer"].text == CLEAN
    marked = HonestBadge(cut="mark").run(answer(CLEAN + " And", cut_at=5), index(), evidence())["answer"]
    assert marked.text == CLEAN + " And " + NOTICE.format(limit=5)


# ------------------------------------------------------------------------------------------------ through the graph


@pytest.fixture
def program(tmp_path, make_tree):
    return make_tree(tmp_path / "prog", PROGRAM)


def ask(monkeypatch, tmp_path, program, draft: Draft | None, *overrides: str) -> pipeline.Answer:
    """An answer of `model=tiny_random`; with ``draft``, its decoding replaced by that draft."""
    import stages.decode

    if draft is not None:
        monkeypatch.setattr(stages.decode, "generate", lambda lm, prompt, settings, reuse=None: draft)
    return pipeline.generate_answer("tiny_random", None, str(program), "how does add work",
                                    overrides=[f"paths.outputs={tmp_path / 'out'}", *overrides])


def test_the_tiny_random_models_reply_is_not_grounded_and_says_why(tmp_path, program):
    got = ask(None, tmp_path, program, None, "decode.max_new_tokens=24", "fallback.max_new_tokens_floor=24")
    record = json.loads((got.run_dir / "telemetry.json").read_text())
    assert record["cut_at"] == 24 and got.text.endswith(NOTICE.format(limit=24))
    assert got.grounded is record["grounded"] is False
    assert "degenerate" in record["not_grounded"] and "cut at max_new_tokens=24" in got.why
    assert got.confidence == record["confidence"] and 0 <= got.confidence <= 1
    assert record["citations_total"] == len(record["citations"])
    lead = record["lead"]  # the lead's margin over the runner-up, when there is one
    assert (lead["lead_margin"] is None) is (lead["lead_choices"] == 1) and (lead["lead_margin"] or 0) >= 0


def test_a_reply_that_ends_by_itself_is_not_cut():
    import torch

    from stages.common.generation.stops import ReplyStop

    stop = ReplyStop(["x", "\n\n", "y"], 1, 2, False)
    assert not stop(torch.tensor([[9, 0, 1]]), None)[0] and not stop.done  # one paragraph of two
    assert stop(torch.tensor([[9, 0, 1, 2, 1]]), None)[0] and stop.done  # the generate loop then sets no cut_at


def test_clean_and_cut_replies_through_the_graph(monkeypatch, tmp_path, program):
    first = "`add` returns the sum of its two arguments [pkg/core.py:1-3]."
    clean = ask(monkeypatch, tmp_path, program, Draft(first, 5, 5, 0.0, "cpu"), *QUICK)
    assert clean.grounded and clean.why == "" and clean.text == first
    text = first + " It is used by `total` [pkg/core.py:1-3] to sum a list and"
    cut = ask(monkeypatch, tmp_path, program, Draft(text, 5, 4, 0.0, "cpu", cut_at=4), *QUICK)
    assert not cut.grounded and cut.why == "cut at max_new_tokens=4"
    assert cut.text == first + " … [cut at max_new_tokens=4]"
    assert [(c.path, c.start, c.end) for c in cut.citations] == [("pkg/core.py", 1, 3)]
    assert cut.telemetry is not None and cut.telemetry.citations_total == 1 and cut.telemetry.cut_at == 4
    assert cut.confidence is not None and clean.confidence is not None and cut.confidence < clean.confidence


# ------------------------------------------------------------------------------------------------ what the reader sees


def test_the_checks_line_the_chat_and_the_report_show_the_badge_and_why(monkeypatch, tmp_path, program):
    import io

    from pipeline.answer import badge_words, why_not
    from pipeline.chat import NOT_FOUND, show_answer
    from pipeline.engine.records import Telemetry
    from pipeline.output import checks_line
    from pipeline.report import write_report
    from pipeline.runfolder import RunFolder, settings_of

    first = "`add` returns the sum of its two arguments [pkg/core.py:1-3]."
    cut = ask(monkeypatch, tmp_path, program, Draft(first + " Then it", 5, 4, 0.0, "cpu", cut_at=4), *QUICK)
    record = cut.telemetry
    assert record is not None and badge_words(record) == f"not grounded: cut at max_new_tokens=4 · confidence " \
                                                          f"{record.confidence:.2f}"
    line = checks_line(cut.text, [first + " Then it"], record)
    assert line == f"── checked: Then it → … [cut at max_new_tokens=4] · {badge_words(record)} ──", line
    assert checks_line(cut.text, [cut.text], record) == f"── {badge_words(record)} ──"
    assert checks_line(cut.text, [cut.text], Telemetry(answer=cut.text, grounded=True)) is None  # an older run
    settings = {**settings_of(None), "program_root": str(program)}
    out = io.StringIO()
    show_answer(cut.run_dir, settings, out)  # its citations passed: shown, with its badge line and its code
    assert out.getvalue().startswith(f"{cut.text}\n── {badge_words(record)} ──\n") and "1 │ def add" in out.getvalue()
    html = write_report(cut.run_dir, settings).read_text()
    assert 'id="confidence"' in html and "cut at max_new_tokens=4</p>" in html
    assert RunFolder.load(cut.run_dir, settings).found() is True
    # citations that fail: not found, and why
    bad = ask(monkeypatch, tmp_path, program, Draft("`add` is defined in [pkg/none.py:1-3] somewhere else.", 5, 4,
                                                   0.0, "cpu"), *QUICK)
    assert not bad.grounded and "citations" in bad.telemetry.not_grounded and bad.why == why_not(bad.telemetry, False)
    out = io.StringIO()
    show_answer(bad.run_dir, settings, out)
    assert out.getvalue() == f"{NOT_FOUND}\n── {badge_words(bad.telemetry)} ──\n"


def test_an_older_record_reads_without_a_confidence():
    from pipeline.engine.records import Telemetry

    old = Telemetry.from_json({"answer": "x", "grounded": True})
    assert old.confidence is None and old.not_grounded == {} and old.cut_at is None
    new = Telemetry(answer="x", grounded=False, not_grounded={"cut": "cut at max_new_tokens=9"}, confidence=0.25,
                    cut_at=9)
    assert Telemetry.from_json(new.to_json()) == new
