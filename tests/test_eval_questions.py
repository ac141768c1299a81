"""Question-set generator (docs/behaviour.md §9): first docstring sentences as questions, a stripped copy with line numbers kept."""
from __future__ import annotations

import ast
import json

import pytest
from conftest import write_tree

from pipeline.api import run
from pipeline.engine.errors import InputError, PipelineError
from pipeline.engine.stage import RunContext
from stages.common.program.docstrings import documented, first_sentence, strip_docstrings
from stages.qgen import DocstringQuestions

TRICKY = (
    "import functools\n"
    "\n"
    "\n"
    "@functools.lru_cache()\n"
    "def cached(x):\n"
    '    """Return the cached square of a number.\n'
    "\n"
    "    More text that is not part of the question.\n"
    '    """\n'
    "    return x * x\n"
    "\n"
    "\n"
    'def only_doc():  # café\n'
    "    '''A function whose body is only this docstring.'''\n"
    "\n"
    "\n"
    'def same_line(): """Docstring on the def line itself, then code."""; return 1\n'
    "\n"
    "\n"
    "class Box:\n"
    '    """A box that holds things. Second sentence."""\n'
    "\n"
    "    def put(self, thing):\n"
    '        """Put a thing into the box and close the lid.\n'
    '        """\n'
    "        def inner():\n"
    '            """Inner helper that is also documented here."""\n'
    "        return thing\n"
    "\n"
    "\n"
    "def short():\n"
    '    """Too short."""\n'
    "\n"
    "\n"
    "def plain():\n"
    "    return 2\n"
)


def defs(tree):
    return [(n.name, n.lineno) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def test_strip_keeps_every_line_number_and_parses():
    tree = ast.parse(TRICKY)
    stripped = strip_docstrings(TRICKY, [doc for _, doc in documented(tree)])
    after = ast.parse(stripped)
    assert len(stripped.splitlines()) == len(TRICKY.splitlines())
    assert defs(after) == defs(tree)
    assert documented(after) == []  # every docstring is gone (an empty "" is no docstring)
    assert "Return the cached" not in stripped and "café" in stripped and "return 1" in stripped
    for before_line, after_line in zip(TRICKY.splitlines(), stripped.splitlines()):
        if '"""' not in before_line and "'''" not in before_line and not before_line.startswith("    More text"):
            assert before_line == after_line


def test_first_sentence_cleans_rst_roles():
    assert first_sentence("Same as :func:`echo`, but ``fast``.  Then more.\n\nBody") == "Same as echo, but fast."
    assert first_sentence("Line one\n    continues here. Next.") == "Line one continues here."


def make_questions(tmp_path, files, **config):
    root = write_tree(tmp_path / "prog", files)
    stage = DocstringQuestions(out=str(tmp_path / "out"), **config)
    return root, stage.run(RunContext(tmp_path / "run", [], {}), str(root))


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_stage_writes_questions_and_the_stripped_copy(tmp_path):
    root, out = make_questions(tmp_path, {"pkg/tricky.py": TRICKY, "pkg/dup.py": DUPLICATES, "notes.md": "# notes\n",
                                          "broken.py": "def (:\n"})
    items = read_jsonl(out["questions"])
    by_symbol = {i["symbol"]: i for i in items}
    assert set(by_symbol) == {"cached", "only_doc", "same_line", "Box", "put", "inner", "unique"}  # short one skipped
    assert by_symbol["cached"] == {"question": "Return the cached square of a number.", "path": "pkg/tricky.py",
                                   "start": 4, "end": 10, "symbol": "cached"}  # start = the decorator line
    assert by_symbol["Box"]["question"] == "A box that holds things."
    assert by_symbol["only_doc"]["end"] == 14  # the definition as it stands in the stripped copy
    copy = tmp_path / "out" / "prog"
    assert out["program"] == str(copy)
    assert (copy / "notes.md").read_text() == "# notes\n" and (copy / "broken.py").read_text() == "def (:\n"
    stripped = (copy / "pkg" / "tricky.py").read_text()
    assert "Return the cached" not in stripped and len(stripped.splitlines()) == len(TRICKY.splitlines())
    assert (root / "pkg" / "tricky.py").read_text() == TRICKY  # the program itself is untouched
    assert "questions=" in out["text"] and "pipeline=eval" in out["text"]


DUPLICATES = (
    "def a():\n    \"\"\"Shared sentence used by two functions.\"\"\"\n\n\n"
    "def b():\n    \"\"\"Shared sentence used by two functions.\"\"\"\n\n\n"
    "def unique():\n    \"\"\"A sentence only this function has.\"\"\"\n"
)


def test_ambiguous_questions_are_dropped_and_min_words_applies(tmp_path):
    _, out = make_questions(tmp_path, {"dup.py": DUPLICATES}, min_words=2)
    assert [i["symbol"] for i in read_jsonl(out["questions"])] == ["unique"]
    with pytest.raises(InputError, match="no documented def/class with a 9\\+ word"):
        make_questions(tmp_path / "again", {"dup.py": DUPLICATES}, min_words=9)


PRIVATE = (
    "def _hidden():\n    \"\"\"A private helper that nobody outside should call.\"\"\"\n\n\n"
    "def shown():\n    \"\"\"A public helper that everyone may call.\"\"\"\n"
)


def test_private_defs_ignored_folders_and_large_files_can_be_left_out(tmp_path):
    big = "X = 1\n" * 60 + "def large():\n    \"\"\"A function in a file above the size limit.\"\"\"\n"
    files = {"pkg/a.py": PRIVATE, "vendor/v.py": DUPLICATES, "big.py": big}
    _, every = make_questions(tmp_path / "all", files)
    assert {i["symbol"] for i in read_jsonl(every["questions"])} == {"_hidden", "shown", "unique", "large"}
    _, fewer = make_questions(tmp_path / "few", files, include_private=False, ignore=["vendor"], max_file_bytes=300)
    assert [i["symbol"] for i in read_jsonl(fewer["questions"])] == ["shown"]
    copy = tmp_path / "few" / "out" / "prog"
    assert (copy / "pkg" / "a.py").is_file() and not (copy / "vendor").exists() and not (copy / "big.py").exists()


def test_out_inside_the_program_is_refused(tmp_path):
    root = tmp_path / "prog"
    root.mkdir()
    (root / "a.py").write_text(DUPLICATES)
    with pytest.raises(InputError, match="inside program_root"):
        DocstringQuestions(out=str(root / "qs")).run(RunContext(tmp_path, [], {}), str(root))


def test_questions_graph_through_the_framework(tmp_path):
    root = tmp_path / "prog"
    root.mkdir()
    (root / "dup.py").write_text(DUPLICATES)
    text, result = run(["pipeline=questions", f"program_root={root}", f"qgen.out={tmp_path / 'qs'}"],
                       run_dir=tmp_path / "run")
    assert text.startswith("1 questions from 1 files")
    assert read_jsonl(tmp_path / "qs" / "questions.jsonl")[0]["symbol"] == "unique"
    with pytest.raises(PipelineError, match="node 'qgen'.*does not exist"):
        run(["pipeline=questions", f"program_root={tmp_path / 'missing'}"], run_dir=tmp_path / "run2")
