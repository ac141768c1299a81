"""The `claims` node (stages/claims.py): statements of the answer about the definitions it names, checked against their
AST (stages/common/grounding/claims.py, claimcheck.py); mark, drop and retry; telemetry."""
from __future__ import annotations

import json

import pytest

import pipeline
from stages.claims import CheckClaims, CheckDraft, NoClaims
from stages.common.grounding.citations import check as check_citations
from stages.common.grounding.claimcheck import check_text, mark
from stages.common.grounding.claims import sentences
from stages.common.types import Answer, Draft, Evidence, PackedWindow

# small code with the shapes of the issue's examples: a check that returns False instead of raising, a function
# with one parameter that is said to take another, a three-parameter function returning None said to take one
STAMP = '''\
import functools


class Expired(Exception):
    pass


class BadStamp(Exception):
    pass


class Stamper:
    def unstamp(self, value):
        if not value:
            raise BadStamp("empty")
        return value[:-1]

    def verify(self, value, limit=None):
        try:
            self.unstamp(value)
        except BadStamp:
            return False
        return True

    def check_age(self, value, limit):
        if limit < 0:
            raise Expired(value)
        return self.unstamp(value)

    @property
    def size(self):
        return 3


def normalize_label(label):
    return label.lower()


def link_nodes(graph, nodes, inputs):
    for node in nodes:
        graph.append((node, inputs))


@functools.lru_cache
def cached_total(items):
    return sum(items)


LIMIT = 10


def parse_count(text):
    return int(text)


class Box:
    @property
    def label(self):
        return self._label

    @label.setter
    def label(self, value):
        self._label = value


class Shape:
    def render(self):
        """Subclasses draw."""
        raise NotImplementedError
'''
PROGRAM = {"pkg/__init__.py": "", "pkg/stamp.py": STAMP}
QUICK = ["decode.max_new_tokens=4", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4"]


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    from conftest import index_tree

    return index_tree(tmp_path_factory.mktemp("claims") / "prog", PROGRAM)


def verdicts(text: str, index) -> list[tuple[str, str, str]]:
    return [(c.kind, c.value, c.verdict) for c in check_text(text, index, None)]


@pytest.mark.parametrize("text, expected", [
    # parameters: how many, and their names
    ("`link_nodes` takes three arguments.", ("param_count", "3", "supported")),
    ("`link_nodes` takes a single argument, a list of nodes.", ("param_count", "1", "contradicted")),
    ("`normalize_label` takes a parameter `label`.", ("param_name", "label", "supported")),
    ("`normalize_label` takes a parameter `ref`.", ("param_name", "ref", "contradicted")),
    ("`normalize_label` takes an argument named `ref`.", ("param_name", "ref", "contradicted")),
    ("`Stamper.check_age` takes `value` and `limit`.", ("param_name", "limit", "supported")),
    # returns None or a value
    ("`link_nodes` returns None.", ("returns_none", "None", "supported")),
    ("`link_nodes` returns no value.", ("returns_none", "None", "supported")),
    ("`Stamper.verify` returns nothing.", ("returns_none", "None", "contradicted")),
    ("`link_nodes` returns a new list.", ("returns_value", "a new", "contradicted")),
    ("`link_nodes` links nodes. The function returns a new list.", ("returns_value", "a new", "contradicted")),
    ("`Stamper.verify` returns False when the stamp is bad.", ("returns_value", "False", "supported")),
    ("`Stamper.size` returns None.", ("returns_none", "None", "contradicted")),
    # raises X, or any exception
    ("`Stamper.check_age` raises `Expired` when the limit is negative.", ("raises", "Expired", "supported")),
    ("`Stamper.verify` raises `Expired`.", ("raises", "Expired", "contradicted")),
    ("`Stamper.unstamp` raises an exception for an empty value.", ("raises", "", "supported")),
    ("`Stamper.check_age` raises `BadStamp` through the call it makes.", ("raises", "BadStamp", "supported")),
    # calls X
    ("`Stamper.verify` calls `unstamp` first.", ("calls", "unstamp", "supported")),
    ("`link_nodes` calls `normalize_label` on each node.", ("calls", "normalize_label", "contradicted")),
    # kind
    ("`Stamper` is a class.", ("kind", "class", "supported")),
    ("`Stamper` is a function that stamps.", ("kind", "function", "contradicted")),
    ("The `size` property is short.", ("kind", "property", "supported")),
    ("`LIMIT` is a function.", ("kind", "function", "contradicted")),
    ("`normalize_label` is a class.", ("kind", "class", "contradicted")),
    # decorated
    ("`cached_total` is decorated with `@lru_cache`.", ("decorated", "lru_cache", "supported")),
    ("`cached_total` uses a decorator.", ("decorated", "", "supported")),
    ("`link_nodes` uses a decorator to log calls.", ("decorated", "", "contradicted")),
    ("`link_nodes` is decorated with `@property`.", ("decorated", "property", "contradicted")),
])
def test_each_claim_kind_true_and_false(program, text, expected):
    assert expected in verdicts(text, program), verdicts(text, program)
    others = [v for v in verdicts(text, program) if v[0] == expected[0] and v[2] != expected[2]]
    assert not others  # one reading of the sentence, not two that disagree


def test_the_facts_the_checks_add_to_definitions():
    from stages.common.program.definitions import read_definitions

    found = read_definitions(STAMP + "\n\ndef again(x):\n    try:\n        f(x)\n    except KeyError:\n        raise\n"
                                     "    if x:\n        return 1\n    else:\n        return 2\n", "s.py")
    assert found["Stamper.verify"].unguarded_calls == () and found["Stamper.verify"].calls == ("self.unstamp",)
    assert found["Stamper.check_age"].unguarded_calls == ("Expired", "self.unstamp")
    assert not found["Stamper.verify"].falls_through and found["link_nodes"].falls_through
    assert found["again"].reraises and not found["again"].falls_through and not found["Stamper.verify"].reraises


def test_the_issues_examples_on_code_of_the_same_shape(program):
    """The check that returns False said to raise; a parameter it does not have; three parameters said to be one,
    None said to be a new list, no decorator said to be one."""
    text = ("`Stamper.verify` [pkg/stamp.py:18-23] compares it with the one returned from `unstamp`; if they are not "
            "equal, it raises an exception.")
    claims = check_text(text, program, None)
    assert [(c.qualname, c.kind, c.verdict) for c in claims] == [("Stamper.verify", "raises", "contradicted")]
    assert mark(text, claims) == text + " [the code says: Stamper.verify raises no exception (the calls that may " \
                                        "raise are inside a try)]"
    text = ("`link_nodes` [pkg/stamp.py:37-39] links the nodes. It takes a single argument, a list of nodes, and "
            "returns a new list. It also uses a decorator.")
    got = {(c.kind, c.verdict, c.code_says) for c in check_text(text, program, None)}
    assert got == {("param_count", "contradicted", "link_nodes takes 3 parameters: graph, nodes, inputs"),
                   ("returns_value", "contradicted", "link_nodes returns None"),
                   ("decorated", "contradicted", "link_nodes has no decorator")}
    assert "returns a new list. [the code says: link_nodes takes 3 parameters: graph, nodes, inputs; link_nodes " \
           "returns None] It also uses a decorator. [the code says: link_nodes has no decorator]" in \
           mark(text, check_text(text, program, None))


@pytest.mark.parametrize("text", [
    "`frobnicate` takes two arguments and returns None.",  # no such definition
    "`Stamper.verify` does not raise an exception.",  # negated
    "If `link_nodes` raises an exception, nothing is linked.",  # a condition, not a statement
    "It returns a new list.",  # "it" with nothing named before
    "`link_nodes` takes `Stamper` objects.",  # a type, not a parameter name
    "`Stamper.verify` calls `unstamp`, which raises `BadStamp`.",  # `unstamp` raises it: right, and about unstamp
])
def test_what_is_not_clear_is_not_counted_as_contradicted(program, text):
    assert all(v != "contradicted" for _, _, v in verdicts(text, program)), verdicts(text, program)


@pytest.mark.parametrize("text", [
    "`Stamper.check_age` takes three arguments: `self`, `value` and `limit`.",  # self counted
    "`parse_count` raises an exception when the text is no number.",  # int() raises, implicitly
    "`parse_count` raises `ValueError` for bad text.",  # a builtin exception: not checked
    "`Box.label` returns the label.",  # the setter shares the getter's name
    "`Shape.render` returns the drawing.",  # a stub: subclasses return it
    "The `size` property of `Stamper` raises an exception.",  # `Stamper` is no subject here
    "`Stamper` uses a decorator to stay small.",  # a class "using" a decorator may offer one
    "Assign a new number to the `LIMIT` class variable.",  # "class" as an adjective (rich-08 of the dev set)
    "Change the `LIMIT` class attribute.",
])
def test_what_the_ast_cannot_settle_is_never_contradicted(program, text):
    assert all(v != "contradicted" for _, _, v in verdicts(text, program)), verdicts(text, program)


def test_unknown_names_are_unchecked_and_the_relative_clause_names_its_subject(program):
    assert verdicts("`frobnicate` takes two arguments and returns None.", program) == []
    got = check_text("`Stamper.verify` calls `unstamp`, which raises `BadStamp`.", program, None)
    assert [(c.qualname, c.kind, c.verdict) for c in got] == [("Stamper.verify", "calls", "supported"),
                                                              ("Stamper.unstamp", "raises", "supported")]


def test_a_degenerate_reply_is_read_in_linear_time(program):
    import time

    started = time.perf_counter()
    assert check_text("`link_nodes` takes `a`, `b`, " * 3000, program, None) == []  # one 60,000-character "sentence"
    assert len(check_text("`link_nodes` returns None. " * 2000, program, None)) == 2000
    assert time.perf_counter() - started < 10


def test_sentences_keep_periods_in_code_and_citations():
    text = "`a.b` [x.py:1-2] returns `c.d`. It is done, e.g. here.\n- a bullet\n```\nx = 1. 2\n```\nLast"
    got = [text[a:b] for a, b in sentences(text)]
    assert got == ["`a.b` [x.py:1-2] returns `c.d`.", "It is done, e.g. here.", "- a bullet", "Last"]


def test_a_name_means_the_definition_inside_the_packed_windows(tmp_path, make_index):
    index = make_index(tmp_path / "two", {"a.py": "def run(x):\n    return x\n", "b.py": "def run(x, y):\n    return x\n"})
    text = "`run` takes two arguments."
    assert verdicts(text, index) == []  # two definitions, one of each verdict: not settled
    only_a = Evidence([PackedWindow("a.py", 1, 2, "def run(x):\n    return x\n")], 0)
    assert [(c.qualname, c.verdict, c.code_says) for c in check_text(text, index, only_a)] == [
        ("run", "contradicted", "run takes 1 parameter: x")]


# ---------------------------------------------------------------------------------------------------- the stage


def answer_of(text: str, index) -> Answer:
    windows = [PackedWindow("pkg/stamp.py", 1, 60, STAMP)]
    report = check_citations(text, index, Evidence(windows, 0), 1, False, ())
    return Answer(text, report.citations, Draft(text, 5, 5, 0.0, "cpu"), report, 0, False)


WRONG = ("`Stamper.verify` [pkg/stamp.py:18-23] checks the value. It raises an exception [pkg/stamp.py:13-16] when "
         "the stamp is bad. `Stamper.check_age` [pkg/stamp.py:25-28] raises `Expired`.")


def test_drop_leaves_out_the_sentence_and_its_citations(program):
    answer = answer_of(WRONG, program)
    out = CheckClaims(on_contradiction="drop").run(answer, program, None)
    text, citations = out["answer"].text, out["answer"].citations
    assert text == "`Stamper.verify` [pkg/stamp.py:18-23] checks the value. `Stamper.check_age` [pkg/stamp.py:25-28] " \
                   "raises `Expired`."
    assert [(c.start, c.end) for c in citations] == [(18, 23), (25, 28)]  # the list matches the text again
    assert out["report"].dropped == 1 and out["report"].contradicted == 1 and out["report"].checked == 2
    marked = CheckClaims().run(answer, program, None)["answer"]
    assert "when the stamp is bad. [the code says: Stamper.verify raises no exception" in marked.text
    assert marked.citations == answer.citations
    assert NoClaims().run(answer, program, None)["answer"] is answer


def test_the_first_drafts_check_gates_the_retry_only_with_retry(program):
    draft = Draft(WRONG, 5, 5, 0.0, "cpu")
    assert CheckDraft().run(draft, program, True)["passed"] is True  # mark: cite.passed passes through
    got = CheckDraft(on_contradiction="retry").run(draft, program, True)
    assert got["passed"] is False and got["report"].contradicted == 1
    assert CheckDraft(on_contradiction="retry").run(draft, program, False)["passed"] is False


# ---------------------------------------------------------------------------------------------------- the graph


@pytest.fixture
def tree(tmp_path, make_tree):
    return make_tree(tmp_path / "prog", PROGRAM)


def ask(monkeypatch, tmp_path, tree, first: str, retry: str, *overrides: str):
    """An answer of `model=tiny_random` whose first and stage-2 decodes are ``first`` and ``retry``."""
    import stages.decode

    def fixed(lm, prompt, settings, reuse=None):
        return Draft(first if prompt.attempt == 1 else retry, 5, 5, 0.0, "cpu")

    monkeypatch.setattr(stages.decode, "generate", fixed)
    answer = pipeline.generate_answer("tiny_random", None, str(tree), "how is a stamp verified",
                                      overrides=[f"paths.outputs={tmp_path / 'out'}", *QUICK, *overrides])
    return answer, json.loads((answer.run_dir / "telemetry.json").read_text())


RIGHT = "`Stamper.verify` [pkg/stamp.py:18-23] returns False when `unstamp` raises `BadStamp`."


@pytest.mark.parametrize("action", ["mark", "drop", "retry"])
def test_each_action_through_the_graph(monkeypatch, tmp_path, tree, action):
    answer, record = ask(monkeypatch, tmp_path, tree, WRONG, RIGHT, f"claims.on_contradiction={action}")
    if action == "mark":
        assert "[the code says: Stamper.verify raises no exception" in answer.text
        assert record["claims_contradicted"] == 1 and record["retries"] == 0
        shown_in_report_and_chat(answer.run_dir)
    elif action == "drop":
        assert "It raises an exception" not in answer.text and "[the code says" not in answer.text
        assert record["claims_dropped"] == 1 and record["claims_contradicted"] == 1
        assert [(c["start"], c["end"]) for c in record["citations"]] == [(18, 23), (25, 28)]
    else:  # the first draft passed its citation check; its contradiction sent it to stage 2, whose answer is kept
        assert record["retries"] == 1 and record["fallback_used"] is True
        assert answer.text.startswith(RIGHT) and record["claims_contradicted"] == 0
    assert record["claims_checked"] == len(record["claims"]) >= 1
    contradicted = [c for c in record["claims"] if c["verdict"] == "contradicted"]
    assert len(contradicted) == record["claims_contradicted"]
    assert all(c["code_says"] and c["qualname"] == "Stamper.verify" for c in contradicted)


def shown_in_report_and_chat(run_dir):
    import io

    from pipeline.chat import show_answer
    from pipeline.report import write_report
    from pipeline.runfolder import RunFolder

    settings = RunFolder.load(run_dir).settings
    html = write_report(run_dir, settings).read_text()
    assert '<span class="contradicted"' in html and "Claims checked against the code: 2, contradicted 1" in html
    out = io.StringIO()
    show_answer(run_dir, settings, out)
    assert "[the code says: Stamper.verify raises no exception" in out.getvalue()
    assert "claims checked against the code: 2, contradicted 1" in out.getvalue()


def test_claims_none_and_the_old_telemetry_still_read(monkeypatch, tmp_path, tree):
    from pipeline.engine.records import Telemetry

    answer, record = ask(monkeypatch, tmp_path, tree, WRONG, RIGHT, "claims=none")
    assert answer.text == WRONG and record["claims_checked"] == 0 and record["claims"] == []
    old = {k: v for k, v in record.items() if not k.startswith("claims")}
    assert Telemetry.from_json(old).claims_checked == 0
    assert Telemetry.from_json(record).claims == ()


def test_a_big_program_reads_only_the_files_that_define_the_names_asked_for(tmp_path, monkeypatch):
    from conftest import index_tree

    import stages.common.grounding.claims as claims
    import stages.common.program.definitions as definitions

    eager = index_tree(tmp_path / "eager", PROGRAM)
    assert claims.catalog(eager).paths == {}  # built now: every file read up front
    monkeypatch.setattr(claims, "EAGER_FILES", 0)  # every program is "big" now
    lazy = index_tree(tmp_path / "lazy", {**PROGRAM, "other.py": "def elsewhere():\n    return 1\n"})
    read: list[str] = []
    real = definitions.read_definitions
    monkeypatch.setattr(definitions, "read_definitions", lambda text, path: read.append(path) or real(text, path))
    # the same verdicts as when every file is read up front, reading only the file that defines the names
    for text in ("`link_nodes` takes three arguments.", "`Stamper.verify` calls `unstamp` first.",
                 "`Stamper.check_age` raises `BadStamp` through the call it makes."):
        assert verdicts(text, lazy) == verdicts(text, eager)
    assert read and "other.py" not in read
    assert "elsewhere" in claims.catalog(lazy) and "other.py" in read
