"""Stage `select` (docs/behaviour.md §5): zoom on this project's real graph, and question selection."""
from __future__ import annotations

import ast

import pytest

from pipeline.engine.errors import InputError
from stages.common.program.indexing import build_index
from stages.select import QuestionSelect, ZoomSelect, find_symbols

# ---------------------------------------------------------------- zoom on the project's own source


def test_project_index_honours_the_configured_ignore_list(project_index):
    assert "pipeline/engine/graph.py" in project_index.files and "stages/select.py" in project_index.files
    assert not any(p.startswith((".venv/", "outputs/", ".git/")) or "__pycache__" in p for p in project_index.files)


def test_zoom_radius_0_is_the_seed_file(project_index):
    selection = ZoomSelect(zoom_symbol="build_graph", zoom_radius=0, top_k=100).run(project_index, "")["selection"]
    assert selection.files == ["pipeline/engine/graph.py"]
    assert selection.symbols == ["build_graph"]
    assert "sym:pipeline/engine/graph.py::build_graph" in selection.nodes
    assert selection.modules == ["pipeline.engine.graph"]


def callers_of(index, name: str) -> set[str]:
    """Files (outside tests) whose code calls `name(...)` or `x.name(...)`, found with ast, not with the index."""
    out = set()
    for path, text in index.texts.items():
        if not path.endswith(".py") or path.startswith("tests/"):
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                if called == name:
                    out.add(path)
    return out


def test_zoom_radius_1_reaches_the_callers(project_index):
    callers = callers_of(project_index, "build_graph")
    assert "pipeline/app.py" in callers  # imports and calls it
    selection = ZoomSelect(zoom_symbol="build_graph", zoom_radius=1, top_k=1000).run(project_index, "")["selection"]
    assert selection.files[0] == "pipeline/engine/graph.py"  # distance 0 first
    assert callers <= set(selection.files), callers - set(selection.files)
    radius0 = set(ZoomSelect(zoom_symbol="build_graph", zoom_radius=0, top_k=1000).run(project_index, "")["selection"].files)
    radius2 = set(ZoomSelect(zoom_symbol="build_graph", zoom_radius=2, top_k=1000).run(project_index, "")["selection"].files)
    assert radius0 < set(selection.files) <= radius2


def test_zoom_top_k_caps_the_region(project_index):
    selection = ZoomSelect(zoom_symbol="build_graph", zoom_radius=2, top_k=2).run(project_index, "")["selection"]
    assert len(selection.files) == 2 and selection.files[0] == "pipeline/engine/graph.py"


def test_zoom_accepts_qualnames_and_module_qualified_names(project_index):
    assert {s.path for s in find_symbols(project_index, "pipeline.engine.graph.build_graph")} == {"pipeline/engine/graph.py"}
    seeds = find_symbols(project_index, "Graph.instantiate")
    assert [(s.path, s.kind) for s in seeds] == [("pipeline/engine/graph.py", "method")]


def test_zoom_unknown_symbol_lists_close_matches(project_index):
    with pytest.raises(InputError) as info:
        ZoomSelect(zoom_symbol="build_grahp", zoom_radius=1).run(project_index, "")
    message = str(info.value)
    assert "'build_grahp'" in message and "close matches" in message and "build_graph" in message
    with pytest.raises(InputError, match="no similar symbol"):
        ZoomSelect(zoom_symbol="qqqzzzxxyy", zoom_radius=1).run(project_index, "")


# ---------------------------------------------------------------- zoom on a small tree

ZOOM_TREE = {
    "a.py": "def f():\n    return 1\n",
    "calls.py": "import a\n\n\ndef g():\n    return a.f()\n",
    "imports_only.py": "from a import f\n\nHANDLERS = [f]\n",
    "far.py": "from calls import g\n\n\ndef h():\n    return g()\n",
    "unrelated.py": "def other():\n    return 2\n",
}


def test_zoom_radius_on_a_small_tree(tmp_path, make_tree):
    idx = build_index(str(make_tree(tmp_path / "prog", ZOOM_TREE)), [], 1_000_000, 80, None)
    files = lambda r: set(ZoomSelect(zoom_symbol="f", zoom_radius=r, top_k=100).run(idx, "")["selection"].files)  # noqa: E731
    assert files(0) == {"a.py"}
    assert "calls.py" in files(1) and "far.py" not in files(1) and "unrelated.py" not in files(1)
    assert "far.py" in files(2) and "unrelated.py" not in files(3)


def test_zoom_radius_1_reaches_a_file_that_only_imports_the_symbol(tmp_path, make_tree):
    idx = build_index(str(make_tree(tmp_path / "prog", ZOOM_TREE)), [], 1_000_000, 80, None)
    assert "imports_only.py" in ZoomSelect(zoom_symbol="f", zoom_radius=1, top_k=100).run(idx, "")["selection"].files


# ---------------------------------------------------------------- question selection

QUESTION_TREE = {
    "report/__init__.py": "",
    "report/render.py": (
        "def render_table(rows):\n"
        '    """Format rows as an aligned text table."""\n'
        '    return "\\n".join(map(str, rows))\n\n\n'
        "def render_header(title):\n"
        "    return title.upper()\n"
    ),
    "app.py": ("from report.render import render_table\n\n\n"
               "def main(table_rows):\n    # prints render_table output for each table\n"
               "    print(render_table(table_rows))\n"),
    "tables/table.py": 'class Table:\n    """A table of rows."""\n\n    def rows(self):\n        return []\n',
    "tests/test_render.py": ("from report.render import render_table\n\n\n"
                             "def test_render_table():\n    assert render_table([1])\n"),
    "docs/notes.md": "The render step builds a table.\n",
    "parse/tokens.py": "def split_words(text):\n    return text.split()\n",
}


@pytest.fixture(scope="module")
def question_index(tmp_path_factory, make_index):
    return make_index(tmp_path_factory.mktemp("question"), QUESTION_TREE)


@pytest.mark.parametrize("prompt,first", [
    ("What does render_table return?", "report/render.py"),
    ("How is renderTable implemented?", "report/render.py"),
    ("Where is split_words defined?", "parse/tokens.py"),
    ("What is the Table class for?", "tables/table.py"),
])
def test_a_prompt_naming_a_symbol_selects_its_file_first(question_index, prompt, first):
    selection = QuestionSelect(top_k=8).run(question_index, prompt)["selection"]
    assert selection.files[0] == first, selection.scores


def test_question_selection_top_k_and_fields(question_index):
    selection = QuestionSelect(top_k=2).run(question_index, "What does render_table return?")["selection"]
    assert len(selection.files) == 2
    assert "render_table" in selection.symbols
    assert selection.modules[0] == "report.render"
    assert selection.scores[selection.files[0]] >= selection.scores[selection.files[1]] > 0
    assert selection.matched_files >= 2


def test_question_without_matching_words_still_selects(question_index):
    selection = QuestionSelect(top_k=3).run(question_index, "qqqq zzzz?")["selection"]
    assert len(selection.files) == 3 and selection.matched_files == 0
