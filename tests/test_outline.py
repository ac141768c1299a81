"""The map of the program (issue 35 item 5): `python -m pipeline.outline`, its report section and `scaffold.map_tokens`."""
from __future__ import annotations

import json
import time

import pytest
from conftest import call_main, index_tree, write_tree

from pipeline.outline import main
from stages.common.program.outline import build_map, map_block, symbol_view, trimmed_map
from stages.common.tokens import encode_text, encode_texts
from stages.common.types import Evidence, PackedWindow
from stages.scaffold import BuildPrompt

PROGRAM = {
    "util.py": (
        '"""Small helpers everyone uses."""\n'
        "LIMIT = 10\n"
        '"""The most a helper adds."""\n\n\n'
        "def helper(x):\n"
        '    """Add one, up to LIMIT."""\n'
        "    return min(x + 1, LIMIT)\n\n\n"
        "def lonely(y):\n"
        "    return y\n"
    ),
    "a.py": "from util import helper\n\n\ndef first(x):\n    return helper(x) + helper(x)\n",
    "b.py": "from util import helper\n\n\ndef second(x):\n    return helper(x)\n",
    "c.py": (
        "from util import helper\n\n\n"
        "class Runner:\n"
        "    kind = 'fast'\n\n"
        "    def go(self, x):\n"
        '        """Run both."""\n'
        "        return helper(x) + mid(x)\n\n\n"
        "def mid(x):\n"
        "    return helper(x)\n"
    ),
}


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    root = write_tree(tmp_path_factory.mktemp("outline") / "prog", PROGRAM)
    return root, index_tree(root, {})


def outline(root, tmp_path, *args):
    return call_main(main, [f"program_root={root}", f"paths.cache={tmp_path / 'cache'}",
                            f"hydra.run.dir={tmp_path / 'run'}", *args], "pipeline.outline")


def test_a_widely_called_function_ranks_above_an_uncalled_one(program):
    root, index = program
    sections = build_map(index)
    util = next(s for s in sections if s.path == "util.py")
    names = [e.name for e in util.entries]
    assert names.index("helper") < names.index("lonely")
    score = {e.name: e.score for s in sections for e in s.entries}
    assert score["helper"] > 2 * score["lonely"]
    assert sections[0].path == "util.py"  # the file everyone calls into comes first
    # values are symbols of the map too: a module constant with its attribute docstring, a class attribute
    kinds = {e.name: (e.kind, e.summary) for s in sections for e in s.entries}
    assert kinds["LIMIT"] == ("constant", "The most a helper adds.")
    assert kinds["Runner.kind"][0] == "attribute"
    assert kinds["lonely"][1] == "(y)"  # no docstring: the signature


def test_the_command_prints_the_map_alone(program, tmp_path):
    root, _ = program
    code, out, err = outline(root, tmp_path, "outline.symbols_per_file=1", "outline.files=2", "outline.damping=0.5")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"map of {root}: 4 files")
    assert lines[1].startswith("util.py  1-12  Small helpers everyone uses.")
    assert lines[2] == "  def helper  6-8  Add one, up to LIMIT."
    assert sum(not line.startswith(" ") for line in lines[1:]) == 2  # outline.files=2
    assert "run folder" not in out and "report:" in err
    report = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "Map of the program" in report and "helper" in report


def test_report_files_zero_writes_no_map_for_the_report(program, tmp_path):
    root, _ = program
    code, _, err = outline(root, tmp_path, "outline.report_files=0")
    assert code == 0, err
    assert not (tmp_path / "run" / "outline.json").exists()
    assert "Map of the program" not in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


def test_symbol_prints_its_callers_and_callees(program, tmp_path):
    root, index = program
    code, out, err = outline(root, tmp_path, "symbol=mid")
    assert code == 0, err
    head, callers, *rest = out.strip().splitlines()
    assert head.startswith("def mid  c.py:")
    assert callers == "called by (1):" and "def Runner.go" in rest[0]
    assert rest[1] == "calls (1):" and "def helper" in rest[2]
    view = symbol_view(index, "helper")[0]
    assert {c["name"]: c["sites"] for c in view["callers"]} == {"first": 2, "second": 1, "Runner.go": 1, "mid": 1}
    assert view["callees"] == [] and view["file"]["path"] == "util.py"


def test_json_parses(program, tmp_path):
    root, _ = program
    code, out, _ = outline(root, tmp_path, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["files_total"] == 4 and data["files"][0]["path"] == "util.py"
    assert data["files"][0]["entries"][0] == {**data["files"][0]["entries"][0], "name": "helper", "kind": "function"}
    code, out, _ = outline(root, tmp_path, "--json", "symbol=helper")
    assert code == 0 and json.loads(out)["matches"][0]["symbol"]["name"] == "helper"


@pytest.mark.parametrize("args, culprit", [(["symbol=helpr"], "symbol 'helpr' is not defined"),
                                           (["program_root=/no/such/tree"], "'/no/such/tree' does not exist")])
def test_bad_input_is_one_line_exit_2(program, tmp_path, args, culprit):
    root, _ = program
    code, out, err = outline(root, tmp_path, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and culprit in err
    if "symbol" in args[0]:
        assert "closest: helper" in err


def test_the_trimmed_map_respects_its_budget(program, tiny_lm):
    _, index = program
    tok = tiny_lm.tokenizer
    for budget in (8, 40, 100):
        text = map_block(tok, index, budget)
        assert not text or sum(len(ids) for ids in encode_texts(tok, [line + "\n" for line in text.splitlines()])) <= budget
    assert map_block(tok, index, 0) == "" and map_block(tok, None, 100) == ""
    whole = trimmed_map(index, lambda lines: [1] * len(lines), 10_000)
    assert whole.startswith("[program map]\nutil.py") and len(whole.splitlines()) == 1 + 4 + len(index.symbols)


def test_map_tokens_off_is_todays_prompt_and_on_prepends_the_map(program, tiny_lm):
    _, index = program
    evidence = Evidence([PackedWindow("c.py", 10, 11, "\n".join(index.lines("c.py")[9:11]))], 0)
    question = "What does mid call?"
    today = BuildPrompt().run(question, evidence, tiny_lm, index)["prompt"]
    off = BuildPrompt(map_tokens=0).run(question, evidence, tiny_lm, index)["prompt"]
    assert off.text == today.text and "[program map]" not in off.text
    on = BuildPrompt(map_tokens=60).run(question, evidence, tiny_lm, index)["prompt"]
    block = map_block(tiny_lm.tokenizer, index, 60)
    assert block and block in on.text and on.text.index(block) < on.text.index("[ctx] path: c.py:10-11")
    assert len(encode_text(tiny_lm.tokenizer, block)) <= 60 + len(block.splitlines())  # line-wise count, joined
    assert on.citations == today.citations and on.lead == today.lead


def test_a_generated_tree_of_300_modules(tmp_path):
    files = {}
    for m in range(300):
        deps = [(m * 7 + k) % 300 for k in (1, 2)]
        files[f"gen/mod{m:03d}.py"] = "".join(f"from gen.mod{d:03d} import work{d}\n" for d in deps) + (
            f"\n\ndef work{m}(x):\n    return {' + '.join(f'work{d}(x)' for d in deps)}\n\n\n"
            f"def spare{m}():\n    return {m}\n")
    files["gen/__init__.py"] = ""
    files["gen/hub.py"] = "def hub():\n    return 0\n" + "".join(f"\n\ndef use{k}():\n    return hub()\n" for k in range(40))
    started = time.perf_counter()
    index = index_tree(tmp_path / "tree", files)
    sections = build_map(index, files=3)
    assert time.perf_counter() - started < 60
    assert len(index.files) == 302 and sections[0].path == "gen/hub.py"
    ranked = {e.name: e.score for s in build_map(index) for e in s.entries}
    assert min(ranked[f"work{m}"] for m in range(300)) > max(ranked[f"spare{m}"] for m in range(300))
