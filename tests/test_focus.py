"""One file as the program (`program_root=pkg/signer.py`) and one file's lines as the thing asked about
(`focus=signer.py:180-215`), issue 37 item 6."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
from conftest import call_main

import pipeline.run as run_app
from pipeline.engine.errors import InputError
from stages.common.program import walk
from stages.common.program.indexing import build_index
from stages.common.retrieval.focus import Focus, parse

SIGNER = "".join(f"def helper_{n}(x):\n    return x + {n}\n\n\n" for n in range(30)) + (
    "def sign(message, key):\n    \"\"\"Sign a message with a key.\"\"\"\n    return hash((message, key))\n\n\n"
    "def verify(message, key, signature):\n    \"\"\"Check a signature.\"\"\"\n"
    "    return sign(message, key) == signature\n")
TREE = {"pkg/__init__.py": "", "pkg/signer.py": SIGNER,
        "pkg/other.py": "def sign_other(message):\n    \"\"\"Sign a message elsewhere.\"\"\"\n    return message\n",
        "pkg/sub/deep.py": "def deep_sign(key):\n    return key\n"}
QUICK = ["decode.max_new_tokens=4", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4"]


def args(tmp_path, program, *extra: str) -> list[str]:
    return ["model=tiny_random", f"paths.outputs={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}",
            f"program_root={program}", "prompt=How is a message signed with a key?", "select=question",
            f"telemetry.telemetry_out={tmp_path / 'telemetry.json'}", *QUICK, *extra]


def answer(tmp_path, program, *extra: str) -> dict:
    code, out, err = call_main(run_app.main, args(tmp_path, program, *extra))
    assert code == 0, err
    return json.loads((tmp_path / "telemetry.json").read_text())


def test_a_file_is_a_program_of_that_file_alone(tmp_path, make_tree, monkeypatch):
    root = make_tree(tmp_path / "prog", TREE)
    read: list[str] = []
    real = walk.read_file

    def spy(base, full, rel, *rest, **kw):
        read.append(str(full))
        return real(base, full, rel, *rest, **kw)

    monkeypatch.setattr(walk, "read_file", spy)
    monkeypatch.setattr(walk, "scan", lambda *a, **k: pytest.fail("the folder beside the file was walked"))
    index = build_index(str(root / "pkg" / "signer.py"), [], 1_000_000, 80, None)
    assert list(index.files) == ["signer.py"] and index.file == "signer.py"
    assert index.root == (root / "pkg").resolve() and index.location == (root / "pkg" / "signer.py").resolve()
    assert read == [str((root / "pkg" / "signer.py").resolve())]  # no sibling, no __init__.py
    assert index.files["signer.py"].module == "signer"  # not pkg.signer: the folder is not read as a package
    assert {w.path for w in index.windows} == {"signer.py"} and "sign" in {s.name for s in index.symbols}
    assert index.fingerprint != build_index(str(root / "pkg"), [], 1_000_000, 80, None).fingerprint


def test_a_one_file_program_answers_with_citations_of_that_file(tmp_path, make_tree):
    root = make_tree(tmp_path / "prog", TREE)
    record = answer(tmp_path, root / "pkg" / "signer.py")
    assert record["status"] == "ok" and record["files_selected"] == ["signer.py"]
    assert record["windows_packed"] and {w["path"] for w in record["windows_packed"]} == {"signer.py"}
    assert all(c["path"] == "signer.py" for c in record["citations"] if c["valid"])
    manifests = list((tmp_path / "out" / "adapters").rglob("manifest.json"))
    assert manifests and all(json.loads(m.read_text())["commit"] is None for m in manifests)
    assert any(m.parent.name.startswith("signer.py-") for m in manifests)


def test_focus_restricts_the_packed_windows_to_the_lines(tmp_path, make_tree):
    root = make_tree(tmp_path / "prog", TREE)
    sign_at = SIGNER.splitlines().index("def sign(message, key):") + 1
    record = answer(tmp_path, root, f"focus=pkg/signer.py:{sign_at}-{sign_at + 2}")
    assert record["files_selected"] == ["pkg/signer.py"]
    # the one window overlapping the lines: sign's (the head window ends before it, verify's starts after)
    assert [(w["path"], w["start"], w["end"]) for w in record["windows_packed"]] == [
        ("pkg/signer.py", sign_at, sign_at + 2)]
    # lines no window covers (the blank lines between two definitions) are shown as they are
    blank = sign_at - 1
    record = answer(tmp_path, root, f"focus=pkg/signer.py:{blank}")
    assert [(w["path"], w["start"], w["end"]) for w in record["windows_packed"]] == [("pkg/signer.py", blank, blank)]


def test_focus_narrows_question_and_hybrid_selection_to_the_file(tmp_path, make_tree, compose):
    from pipeline.engine.graph import build_graph

    root = make_tree(tmp_path / "prog", TREE)
    index = build_index(str(root), [], 1_000_000, 80, None)
    for option in ("question", "hybrid"):
        graph = build_graph(compose(f"select={option}", f"program_root={root}")).instantiate()
        stage = graph.nodes["select"].stage
        assert stage.config.focus is None
        plain = stage.run(index, "How is a message signed?")["selection"]
        focused = dataclasses.replace(stage.config, focus="pkg/signer.py")
        stage.config = focused
        only = stage.run(index, "How is a message signed?")["selection"]
        assert "pkg/signer.py" in plain.files and len(plain.files) > 1 and only.files == ["pkg/signer.py"]
        assert only.modules == ["pkg.signer"] and only.matched_files == 1
        assert [w for _, w in only.window_ranking["pkg/signer.py"]] and all(
            s > 0 for s, _ in only.window_ranking["pkg/signer.py"])


@pytest.mark.parametrize("spec, want", [
    ("signer.py", Focus("signer.py", 1, None)), ("./signer.py:7", Focus("signer.py", 7, 7)),
    (" a/b.py:180-215 ", Focus("a/b.py", 180, 215)),
])
def test_focus_spellings(spec, want):
    assert parse(spec) == want


@pytest.mark.parametrize("spec", ["", "signer.py:", "signer.py:abc", "signer.py:9-3", "signer.py:0-4", ":5",
                                  "signer.py:1-2-3"])
def test_a_malformed_focus_is_refused(spec):
    with pytest.raises(InputError, match="is not <file>"):
        parse(spec)


BAD_FOCUS = [
    ("malformed", "focus=signer.py:ten-twenty", "error: node 'select': focus 'signer.py:ten-twenty' is not <file>"),
    ("missing file", "focus=pkg/nope.py:1-3", "focus file 'pkg/nope.py' is not in the program"),
    ("range beyond the file", "focus=pkg/signer.py:500-600", "focus lines 500-600 are outside pkg/signer.py, which has 128 lines"),
]


@pytest.mark.parametrize("name, focus, expected", BAD_FOCUS, ids=[r[0] for r in BAD_FOCUS])
def test_a_bad_focus_is_one_line(tmp_path, make_tree, monkeypatch, name, focus, expected):
    from stages.model import TinyRandomLlama

    root = make_tree(tmp_path / "prog", TREE)
    if name == "malformed":  # its spelling is checked before any model loads
        monkeypatch.setattr(TinyRandomLlama, "run", lambda self: pytest.fail("the model loaded"))
    code, out, err = call_main(run_app.main, args(tmp_path, root, focus))
    # log records (the run folder's log; on stderr too while logging is configured so) are not the message
    message = [line for line in err.splitlines() if not re.match(r"\[[\d-]+ [\d:,]+\]\[", line)]
    assert code == 2 and len(message) == 1 and expected in message[0] and "Traceback" not in out + err, err
    assert message[0].startswith("error: node 'select': focus")


def test_a_fifo_as_program_root_is_refused(tmp_path):
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="neither a folder nor a regular file"):
        build_index(str(fifo), [], 1_000_000, 80, None)


def test_a_file_on_a_pseudo_filesystem_is_refused():
    with pytest.raises(InputError, match="proc pseudo filesystem"):
        build_index("/proc/self/status", [], 1_000_000, 80, None)


def test_the_report_and_chat_read_a_one_file_programs_code_and_nothing_beside_it(tmp_path, make_tree):
    from pipeline.runfolder import read_lines

    root = make_tree(tmp_path / "prog", TREE)
    program = str(root / "pkg" / "signer.py")
    assert read_lines(program, "signer.py", 1, 2) == (["def helper_0(x):", "    return x + 0"], "")
    lines, why = read_lines(program, "other.py", 1, 2)
    assert lines is None and "not the program's one file signer.py" in why
