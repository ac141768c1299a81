"""Module- and class-level values as symbols of the index, and the names a question writes (issue 35 items 2 and 4),
on small real code (click 8's `_compat.py`, `shell_completion.py` and `types.py`, cut down)."""
from __future__ import annotations

import pytest
from conftest import index_tree
from conftest import write_tree as make_tree

from pipeline.engine import resources
from stages.common.grounding.labels import mislabels
from stages.common.program import indexstore
from stages.common.program.indexing import build_index, indexing_code
from stages.common.program.pyfacts import python_facts
from stages.common.retrieval.names import find_names
from stages.common.types import Evidence, PackedWindow
from stages.pack import PackWindows
from stages.scaffold import lead_choices
from stages.select import QuestionSelect

COMPAT = '''import logging
import re
import sys

__all__ = ["strip_ansi", "WIN"]

log = logging.getLogger(__name__)
WIN = sys.platform.startswith("win")
# One CSI escape sequence per the ECMA-48 grammar: parameter bytes, intermediate bytes, then a final byte.
_ansi_re = re.compile(r"\\033\\[[0-?]*[ -/]*[@-~]")


def strip_ansi(value):
    return _ansi_re.sub("", value)


def open_stream(filename, mode="r"):
    if filename == "-":
        return sys.stdin
    local = {"a": 1}  # a function's own names are no symbols
    return open(filename, mode)


def _split(value):
    return value.split("=", 1)
'''

SHELLS = '''class ShellComplete:
    """Base class for providing shell completion support."""

    name = ""
    """Name to register the shell as with add_completion_class."""

    def __init__(self, cli, prog_name):
        self.cli = cli
        self.prog_name = prog_name

    def source(self):
        """Produce the shell script that defines the completion function."""
        return self.source_template % {"prog_name": self.prog_name}

''' + "\n".join(f'''
class {shell.capitalize()}Complete(ShellComplete):
    """Shell completion for {shell}."""

    name = "{shell}"
    source_template = "{shell} script"

    def get_completion_args(self):
        cwords = self.cli.split()
        return cwords, ""
''' for shell in ("bash", "zsh", "fish")) + '''

_available_shells = {
    "bash": BashComplete,
    "fish": FishComplete,
    "zsh": ZshComplete,
}
PathLike = str | bytes
Name: TypeAlias = str
get = _available_shells.get


def add_completion_class(cls, name=None):
    if name is None:
        name = cls.name
    _available_shells[name] = cls
    return cls


def get_completion_class(shell):
    """Look up a registered ShellComplete subclass by the name provided by the completion instruction."""
    return _available_shells.get(shell)
'''

TYPES = '''class ParamType:
    """Represents the type of a parameter."""

    name = "param"

    def convert(self, value, param, ctx):
        return value


class BoolParamType(ParamType):
    name = "boolean"

    bool_states = {
        "1": True,
        "0": False,
        "yes": True,
        "no": False,
        "true": True,
        "false": False,
    }
    """A mapping of string values to boolean states."""

    def convert(self, value, param, ctx):
        norm = value.strip().lower()
        return self.bool_states[norm]
'''

FILES = {"pkg/__init__.py": "", "pkg/_compat.py": COMPAT, "pkg/shell_completion.py": SHELLS, "pkg/types.py": TYPES}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return index_tree(tmp_path_factory.mktemp("symbols") / "pkg", {k.removeprefix("pkg/"): v for k, v in FILES.items()})


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def symbol(index, qualname: str):
    found = [s for s in index.symbols if s.qualname == qualname]
    assert len(found) == 1, (qualname, found)
    return found[0]


# ---------------------------------------------------------------- item 2: values are symbols


def test_constants_regexes_tables_attributes_and_all_are_symbols(index):
    regex = symbol(index, "_ansi_re")
    assert (regex.kind, regex.path, regex.start, regex.end) == ("constant", "_compat.py", 10, 10)
    assert set(regex.reads) == {"re", "compile"} and regex.signature.startswith("_ansi_re = re.compile(")
    assert symbol(index, "__all__").kind == "constant" and symbol(index, "__all__").is_public
    assert symbol(index, "WIN").kind == "constant"
    table = symbol(index, "_available_shells")
    first = line_of(SHELLS, "_available_shells = {")
    assert (table.kind, table.start, table.end) == ("constant", first, first + 4)
    assert set(table.reads) == {"BashComplete", "FishComplete", "ZshComplete"}
    states = symbol(index, "BoolParamType.bool_states")
    first = line_of(TYPES, "bool_states = {")
    assert (states.kind, states.start, states.end) == ("attribute", first, first + 7)
    assert states.doc == "A mapping of string values to boolean states."  # the attribute's docstring
    assert symbol(index, "ShellComplete.name").doc.startswith("Name to register the shell")
    assert symbol(index, "PathLike").kind == "constant" and symbol(index, "Name").kind == "constant"  # type aliases
    names = {s.qualname for s in index.symbols}
    assert "log" not in names and "get" not in names  # a handle made by a call, an alias: no values of their own
    assert "local" not in names and "open_stream.local" not in names  # a function's own names
    assert "ShellComplete.cli" not in names  # instance attributes set in methods are not class attributes
    assert all(s.is_definition for s in index.symbols if s.kind in ("function", "class", "method"))


def test_values_ride_in_their_window_and_a_loose_run_of_them_is_one_window(tmp_path):
    lines = ["import re", "", *[f"def f{i}():\n    return {i}\n" for i in range(30)],
             "# the separators", "SEP = '='", "", "PAIR = re.compile(r'(\\w+)=(\\w+)')", "TABLE = {", "    'a': 1,",
             "    'b': 2,", "}", "", "def last():", "    return TABLE"]
    text = "\n".join(lines) + "\n"
    facts = python_facts(text, 20)
    value_windows = [w for w in facts["windows"] if w[3] == "constant"]
    sep = next(s for s in facts["symbols"] if s["name"] == "SEP")
    table = next(s for s in facts["symbols"] if s["name"] == "TABLE")
    # SEP, PAIR and TABLE lie outside every other window: one window from the comment above SEP to TABLE's end
    assert value_windows == [[sep["start"] - 1, table["end"], "SEP", "constant"]]
    # a value the head window or a class window shows gets no window of its own
    assert [w for w in python_facts(COMPAT, 80)["windows"] if w[3] == "constant"] == []
    assert [w for w in python_facts(TYPES, 80)["windows"] if w[3] == "constant"] == []


def test_the_store_keeps_values_and_a_store_of_older_facts_is_not_served(tmp_path, fresh_index_memory):
    root = make_tree(tmp_path / "pkg", {k.removeprefix("pkg/"): v for k, v in FILES.items()})
    cache = tmp_path / "cache"
    first = build_index(str(root), [], 1_000_000, 80, cache)
    stored = next((cache / "index").glob("*.npz"))
    loaded = indexstore.load(stored, 80, indexing_code())
    assert loaded is not None
    by_place = sorted((s.path, s.start, s.qualname, s.kind, s.reads, s.doc) for s in first.symbols)
    assert sorted((s.path, s.start, s.qualname, s.kind, s.reads, s.doc) for s in loaded.symbols([None] * 4)) == by_place
    # the same files' facts as the indexing code made them before values were symbols, stored by that code: the
    # store's code fingerprint (which takes in pyfacts.py) differs, so the facts are parsed again, values and all
    facts = [loaded.facts(i) for i in range(len(loaded.paths))]
    for f in facts:
        f["symbols"] = [s for s in f["symbols"] if s["kind"] not in ("constant", "attribute")]
        f["windows"] = [w for w in f["windows"] if w[3] != "constant"]
    records = [first.files[p] for p in loaded.paths]
    # stored as today's code: served as it is (the code key is what tells an old store from a new one) ...
    indexstore.save(stored, 80, records, facts, loaded.graph(), code=indexing_code())
    resources.clear("program-index")
    assert not any(s.kind == "constant" for s in build_index(str(root), [], 1_000_000, 80, cache).symbols)
    # ... stored by the code before values were symbols: not served
    indexstore.save(stored, 80, records, facts, loaded.graph(), code="the indexing code before values")
    resources.clear("program-index")
    again = build_index(str(root), [], 1_000_000, 80, cache)
    assert sorted((s.path, s.start, s.qualname, s.kind, s.reads, s.doc) for s in again.symbols) == by_place


def test_labels_judge_constants_but_not_bare_attribute_names(index):
    # `_ansi_re` is defined at _compat.py:10; a citation of strip_ansi's lines with its name is mislabelled
    assert [m.name for m in mislabels("`_ansi_re` [_compat.py:13-14]", index)] == ["_ansi_re"]
    assert mislabels("`_ansi_re` [_compat.py:9-10]", index) == []
    # `name` is an attribute of four classes: as a bare word it stands for none of them, and is not judged
    assert mislabels("`name` [shell_completion.py:58-63]", index) == []


# ---------------------------------------------------------------- item 4: names in the question


def windows_of(index, found):
    return {(index.windows[i].path, index.windows[i].anchor) for i in found.windows}


def test_an_exact_name_finds_its_definition(index):
    found = find_names(index, "What does BoolParamType accept, and where is _ansi_re used?")
    assert {s.qualname for s in found.symbols} == {"BoolParamType", "_ansi_re"}
    assert windows_of(index, found) == {("types.py", "BoolParamType"), ("_compat.py", "head")}
    dotted = find_names(index, "When is ShellComplete.source called?")
    assert {s.qualname for s in dotted.symbols} == {"ShellComplete.source"}


def test_a_fuzzy_name_joins_words_as_snake_or_camel_case(index):
    assert {s.qualname for s in find_names(index, "How does get completion class look a shell up?").symbols} == {
        "get_completion_class"}
    assert {s.qualname for s in find_names(index, "how does strip ansi work").symbols} == {"strip_ansi"}
    assert {s.qualname for s in find_names(index, "what is a bool param type").symbols} == {"BoolParamType"}
    # an attribute is named as code; plain words name definitions and module constants only
    assert {s.qualname for s in find_names(index, "Which values does bool_states hold?").symbols} == {
        "BoolParamType.bool_states"}
    assert find_names(index, "Which values do bool states hold?").symbols == ()
    assert {s.qualname for s in find_names(index, "What are the available shells?").symbols} == {"_available_shells"}
    # plain words alone are no names; nor is a name that fits too many symbols
    assert find_names(index, "How does it convert a value?").symbols == ()
    assert find_names(index, "What is the `name` of a shell?").symbols == ()


def test_a_quoted_string_finds_where_the_source_writes_it(index):
    found = find_names(index, 'Why is the value split at "=" only once?')
    assert found.symbols == ()
    assert windows_of(index, found) == {("_compat.py", "_split")}
    # an apostrophe is no quote
    assert find_names(index, "Why doesn't click's split keep it?").windows == {}


def run_retrieval(index, tiny_lm, question: str, **select):
    selection = QuestionSelect(**select).run(index, question)["selection"]
    evidence = PackWindows(context_tokens=4000).run(index, selection, question, tiny_lm)["evidence"]
    return selection, [(w.path, w.start, w.end) for w in evidence.windows]


def covers(packed, path: str, line: int) -> bool:
    return any(p == path and a <= line <= b for p, a, b in packed)


@pytest.mark.parametrize("question, path, line", [
    ("Where is the regular expression _ansi_re defined?", "_compat.py", 10),           # a compiled regex
    ("Which shells are in _available_shells?", "shell_completion.py", line_of(SHELLS, '"fish": Fish')),  # a table
    ("Which strings does BoolParamType.bool_states map to True?", "types.py", line_of(TYPES, '"yes"')),  # an attribute
    ("What does __all__ export?", "_compat.py", 5),                                    # __all__
])
def test_a_named_value_is_found_and_packed_first(index, tiny_lm, question, path, line):
    selection, packed = run_retrieval(index, tiny_lm, question)
    assert selection.files[0] == path
    assert covers(packed[:1], path, line), packed


def test_the_name_boost_brings_a_named_definition_forward(index, tiny_lm):
    question = "How does the shell source call get completion class?"  # its words favour the shell classes
    _, plain = run_retrieval(index, tiny_lm, question, name_boost=0.0)
    _, boosted = run_retrieval(index, tiny_lm, question, name_boost=0.5)
    line = symbol(index, "get_completion_class").start
    assert covers(boosted[:1], "shell_completion.py", line), boosted
    assert not covers(plain[:1], "shell_completion.py", line), plain


def test_lead_choices_offer_named_values_and_tables_not_every_one_liner(index):
    head = PackedWindow("_compat.py", 1, 20, "", 1.0)
    shells = next(w for w in index.windows if w.path == "shell_completion.py" and w.anchor == "BashComplete")
    evidence = Evidence([head, PackedWindow(shells.path, shells.start, shells.end, "", 0.5)], 0, "")
    names = {choice.split("`")[1] for choice in lead_choices(evidence, index, "How is WIN decided?")}
    assert {"strip_ansi", "WIN", "BashComplete", "BashComplete.get_completion_args"} <= names
    assert "_ansi_re" not in names and "BashComplete.name" not in names  # one-liners the question does not name
    assert "__all__" not in names
    tables = {choice.split("`")[1] for choice in lead_choices(
        Evidence([PackedWindow("types.py", 10, 25, "", 1.0)], 0, ""), index, "How are booleans parsed?")}
    assert "BoolParamType.bool_states" in tables and "BoolParamType.name" not in tables


def test_a_named_class_lifts_its_best_matching_part_not_its_header(tmp_path):
    import numpy as np

    from stages.common.retrieval.names import boost
    from stages.common.retrieval.scoring import RELEVANCE, score_windows

    small = build_index(str(make_tree(tmp_path / "pkg", {"shell_completion.py": SHELLS})), [], 1_000_000, 8, None)
    question = "How does ShellComplete produce the script that defines the completion function?"
    found = find_names(small, question)
    header = next(i for i, w in enumerate(small.windows) if w.anchor == "ShellComplete")
    method = next(i for i, w in enumerate(small.windows) if w.anchor == "ShellComplete.source")
    assert header in found.windows and method in found.parts[header]
    scores = np.zeros(len(small.windows))
    for i, value in score_windows(small, question, RELEVANCE).items():
        scores[i] = value
    assert scores[method] > scores[header]
    lifted = boost(scores, found, 0.5) - scores
    assert lifted[method] > 0 and lifted[header] == 0
