"""Issue 36, second red-team pass: a program of empty files, an override without a key, a program on a tmpfs under
/dev, skipped files summarised at WARNING, citations with ASCII digits only and parsed in linear time.

docs/faults.md describes each row.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import call_main

import pipeline.run as run_app
from pipeline.engine.errors import ConfigError, InputError
from stages.common.program.indexing import build_index
from stages.common.program.walk import mount_table, pseudo_kind, resolve_root

GOOD = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add."""\n    return a + b\n'}
README_ONLY = {"README.md": "Kettle notes.\nThe kettle boils water at 100 degrees.\n"}


def call(args: list[str]) -> tuple[int, str, str]:
    return call_main(run_app.main, args)


def base_args(tmp_path: Path, program: Path) -> list[str]:
    return ["model=tiny_random", f"paths.outputs={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}",
            f"program_root={program}", "prompt=how does the kettle boil water", "decode.max_new_tokens=4",
            "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4"]


def one_line(code: int, out: str, err: str, start: str, expected: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith(start) and expected in err, err
    assert "Traceback" not in err + out


# ---- 7. a program whose only file is empty ----------------------------------------------------------------------

@pytest.mark.parametrize("select", ["hybrid", "question", "zoom"])
def test_a_program_of_empty_files_is_one_line_whatever_the_select(tmp_path, make_tree, tiny_lm, select):
    # no window to show the model and no line to cite: no grounded answer is possible, as for an empty folder
    program = make_tree(tmp_path / "prog", {"__init__.py": ""})
    extra = [f"select={select}"] + (["select.zoom_symbol=boil"] if select == "zoom" else [])
    code, out, err = call(base_args(tmp_path, program) + extra)
    one_line(code, out, err, "error: node 'index':", "has no indexable text files (1 empty: __init__.py)")


def test_empty_files_beside_skipped_ones_are_both_named(tmp_path, make_tree):
    program = make_tree(tmp_path / "prog", {"a/__init__.py": "", "b/__init__.py": "", "blob.bin": b"\x00\x01"})
    with pytest.raises(InputError, match=r"has no indexable text files \(2 empty: a/__init__.py, b/__init__.py; "
                                         r"1 skipped: binary\)"):
        build_index(str(program), [], 1_000_000, 80, None)


def test_select_and_pack_take_an_index_without_windows(tmp_path, make_tree, tiny_lm):
    """The index refuses such a program; the stages still hold when handed one (the select=hybrid crash was a float
    array of no test flags, `bitwise_and`-ed with booleans)."""
    from stages.pack import PackFunctionFirst, PackHeads, PackWindows
    from stages.rerank import HeuristicRerank
    from stages.select import HybridSelect, QuestionSelect

    full = build_index(str(make_tree(tmp_path / "prog", README_ONLY)), [], 1_000_000, 80, None)
    index = dataclasses.replace(full, windows=[], _derived={})
    for select in (HybridSelect(progress=False), QuestionSelect()):
        selection = select.run(index=index, prompt="how does it boil")["selection"]
        assert selection.files == ["README.md"]
        selection = HeuristicRerank().run(index=index, selection=selection, prompt="boil")["selection"]
        for pack in (PackWindows(), PackHeads(), PackFunctionFirst()):
            assert pack.run(index=index, selection=selection, prompt="boil", lm=tiny_lm)["evidence"].windows == []


README_RUNS = [["select=hybrid"], ["select=question"], ["pack=heads"], ["pack=function_first"], ["pack=none"],
               ["rerank=lm"], ["rerank=none"]]


@pytest.mark.parametrize("extra", README_RUNS, ids=[r[0] for r in README_RUNS])
def test_a_program_of_one_text_file_answers(tmp_path, make_tree, tiny_lm, extra):
    program = make_tree(tmp_path / "prog", README_ONLY)
    code, out, err = call(base_args(tmp_path, program) + extra)
    assert code == 0, err
    telemetry = json.loads((tmp_path / "run" / "telemetry.json").read_text())
    assert telemetry["status"] == "ok" and telemetry["files_selected"] == ["README.md"]
    packed = [w["path"] for w in telemetry["windows_packed"]]
    assert packed == ([] if extra == ["pack=none"] else ["README.md"])


def test_zoom_on_a_program_without_symbols_is_one_line(tmp_path, make_tree, tiny_lm):
    program = make_tree(tmp_path / "prog", README_ONLY)
    code, out, err = call(base_args(tmp_path, program) + ["select=zoom", "select.zoom_symbol=boil"])
    one_line(code, out, err, "error: node 'select':", "select.zoom_symbol 'boil' is not defined in the program")


# ---- 8. an override without a key ------------------------------------------------------------------------------

KEYLESS = ["=3", "~=3", "+=3", "++=3", "=", "~", "@=3", "@pkg=x", " =3"]


@pytest.mark.parametrize("override", KEYLESS)
def test_an_override_without_a_key_is_one_line(tmp_path, override):
    code, out, err = call(["model=tiny_random", f"hydra.run.dir={tmp_path / 'run'}", override])
    one_line(code, out, err, f"error: the override '{override}' has no key", "write key=value")
    assert not (tmp_path / "run").exists()


def test_an_override_without_a_key_is_a_config_error_in_the_api():
    import pipeline.api

    with pytest.raises(ConfigError, match="the override '~=3' has no key"):
        pipeline.api.compose(["model=tiny_random", "~=3"])


def test_overrides_with_keys_are_left_to_hydra():
    from pipeline.cli import keyless

    assert keyless(["select=question", "+x=1", "++y=2", "~rerank", "group@pkg=opt", "prompt==x", "-m", "--cfg",
                    "job"]) is None


# ---- 9. a program on a tmpfs under /dev ------------------------------------------------------------------------

TABLE = {"/": "ext4", "/dev": "devtmpfs", "/dev/shm": "tmpfs", "/dev/pts": "devpts", "/proc": "proc",
         "/sys": "sysfs", "/sys/fs/cgroup": "cgroup2", "/run": "tmpfs"}


@pytest.mark.parametrize("path, kind", [
    ("/dev/shm/prog", None), ("/dev/shm", None), ("/run/user/1", None), ("/home/me/prog", None),
    ("/dev", "devtmpfs"), ("/dev/disk/by-id", "devtmpfs"), ("/dev/pts/0", "devpts"), ("/proc/self", "proc"),
    ("/sys/kernel", "sysfs"), ("/sys/fs/cgroup/x", "cgroup2"),
])
def test_the_longest_mount_point_decides(path, kind):
    assert pseudo_kind(Path(path), TABLE) == kind


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm here")
def test_a_program_on_dev_shm_is_indexed(make_tree):
    if pseudo_kind(Path("/dev/shm").resolve(), mount_table()):
        pytest.skip("/dev/shm is not a tmpfs here")
    folder = Path(tempfile.mkdtemp(prefix="pca-test-", dir="/dev/shm"))
    try:
        program = make_tree(folder / "prog", GOOD)
        assert resolve_root(str(program)) == program.resolve()
        assert sorted(build_index(str(program), [], 1_000_000, 80, None).files) == ["pkg/__init__.py", "pkg/core.py"]
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("root", ["/dev", "/proc", "/sys"])
def test_dev_proc_and_sys_stay_refused(root):
    kind = pseudo_kind(Path(root), mount_table())
    if kind is None:
        pytest.skip(f"{root} is not a pseudo filesystem here")
    with pytest.raises(InputError, match=f"is on a {kind} pseudo filesystem"):
        resolve_root(root)


def test_a_tmpfs_inside_a_program_is_walked_a_pseudo_one_is_not(tmp_path, make_tree, monkeypatch):
    import stages.common.program.walk as walk

    program = make_tree(tmp_path / "prog", {**GOOD, "shm/notes.py": "x = 1\n", "kernel/kmsg": "would block\n"})
    table = {"/": "ext4", str(program / "shm"): "tmpfs", str(program / "kernel"): "proc"}
    monkeypatch.setattr(walk, "mount_table", lambda: table)
    index = build_index(str(program), [], 1_000_000, 80, None)
    assert "shm/notes.py" in index.files and index.skipped["kernel"] == "proc pseudo filesystem"


# ---- also: files skipped while indexing, at WARNING -----------------------------------------------------------

def test_skipped_files_are_one_warning(tmp_path, make_tree, caplog):
    files = {**GOOD, "blob.bin": b"\x00\x01" * 10, "image.png": b"\x89PNG\x00", "big.txt": "x" * 2_000,
             "data.json": '"' + "y" * 300 + '"\n'}
    program = make_tree(tmp_path / "prog", files)
    from stages.common.program.walk import Limits

    with caplog.at_level(logging.WARNING, logger="stages"):
        build_index(str(program), [], 1_000, 80, None, limits=Limits(1_000, max_line_chars=200))
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.getMessage() == (
        f"skipped 4 path(s) of {program} (2 binary, 1 a line over index.max_line_chars, 1 larger than "
        "max_file_bytes): big.txt (larger than max_file_bytes (2000 > 1000)), blob.bin (binary), data.json (a line "
        "of 302 characters (longer than index.max_line_chars=200)), image.png (binary)")


def test_many_skipped_files_show_the_first_five(tmp_path, make_tree, caplog):
    program = make_tree(tmp_path / "prog", {**GOOD, **{f"b{i}.bin": b"\x00" for i in range(7)}})
    with caplog.at_level(logging.WARNING, logger="stages"):
        build_index(str(program), [], 1_000_000, 80, None)
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "skipped 7 path(s)" in record.getMessage() and "(7 binary)" in record.getMessage()
    assert record.getMessage().endswith("b4.bin (binary) ...")


def test_nothing_skipped_or_left_out_on_purpose_is_no_warning(tmp_path, make_tree, caplog):
    program = make_tree(tmp_path / "prog", {**GOOD, "old-run/.hydra/config.yaml": "a: 1\n", "old-run/x.py": "y = 1\n"})
    (program / "linked").symlink_to(program / "pkg", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="stages"):
        index = build_index(str(program), [], 1_000_000, 80, None)
    assert index.skipped["old-run"].startswith("a run folder") and index.skipped["linked"] == "symlinked folder"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- also: citations take ASCII digits, in linear time --------------------------------------------------------

@pytest.fixture(scope="module")
def cited(tmp_path_factory, make_index):
    return make_index(tmp_path_factory.mktemp("cited"), {"a.py": "x = 1\n" * 30, "pkg/b.py": "y = 2\n" * 30,
                                                        "2.0.1": "v\n"})


def spans(text, index):
    from stages.common.grounding.citations import parse_citations

    return [(path, a, b) for _, _, path, a, b in parse_citations(text, index)]


@pytest.mark.parametrize("text, expected", [
    ("see a.py:١-٣ and [a.py:١] and pkg/b.py:٢", []),  # Arabic-Indic digits
    ("see a.py:۱-۳ and a.py:३", []),  # Persian and Devanagari digits
    ("see a.py:1-٣", [("a.py", 1, 1)]),  # the range stops where the ASCII digits do
    ("see a.py:1-3 and [pkg/b.py:4]", [("a.py", 1, 3), ("pkg/b.py", 4, 4)]),
    ("a.py:" + "1" * 5_000, [("a.py", 10**18, 10**18)]),  # past int()'s 4,300 digits: no such line, no crash
])
def test_citations_take_ascii_digits_only(cited, text, expected):
    assert spans(text, cited) == expected


def test_labels_and_the_report_take_ascii_digits_only(cited):
    from pipeline.report.answer import citations_in
    from stages.common.grounding.labels import LABELLED

    assert LABELLED.search("`x` [a.py:١-٣]") is None and LABELLED.search("`x` [a.py:1-3]") is not None
    text = "a.py:١-٣ then a.py:2-4"
    assert citations_in(text) == [(text.index("a.py:2"), len(text), "a.py", 2, 4)]


def test_the_citation_trie_takes_ascii_digits_only(tiny_lm):
    from stages.common.grounding.constraints import END, TokenTrie

    tok = tiny_lm.tokenizer
    trie = TokenTrie.of_strings(tok, ["a.py:1-3]"])

    def reaches_end(text: str) -> bool:
        node = trie.root
        for token in tok(text, add_special_tokens=False)["input_ids"]:
            if token not in node:
                return False
            node = node[token]
        return END in node

    assert reaches_end("a.py:1-3]") and not reaches_end("a.py:١-٣]")


# the pattern parse_citations used before (ASCII digits): the reference the linear parser must agree with
_BRACKETED = r"\[(?:path:\s*)?([^\[\]\n]+?):([0-9]+)(?:-([0-9]+))?\]"
_BARE = r"(?:path:\s*)?(/?(?:[\w.-]+/)+[\w.-]+|[\w./-]+\.\w+):([0-9]+)(?:-([0-9]+))?"
REFERENCE = re.compile(f"{_BRACKETED}|{_BARE}")

ORDINARY = [
    "`add` [pkg/core.py:4-6] adds two numbers.\n\nIt is called by [pkg/api.py:10-12] and tests/test_core.py:3.",
    "See path: a.py:3-5, then (./a.py:11) and <https://x.org/a.py:12>; released in 1.2.3:4.",
    "In [dir with space/mod é.py:2-4] and /etc/passwd:1-5, etc/hosts:2, a.py:3-4b.py:5, xpath: b.py:7.",
    "`Kettle.boil` [kettle.py:10-20]\n```python\ndef boil(self):\n    return heat()  # [kettle.py:12]\n```",
]


def reference(text: str) -> list[tuple]:
    found = []
    for m in REFERENCE.finditer(text):
        groups = m.group(1, 2, 3) if m.group(1) is not None else m.group(4, 5, 6)
        found.append((m.start(), m.end(), *groups))
    return found


def test_the_linear_parser_finds_what_the_regex_found():
    from stages.common.grounding.citations import CITATION

    rng = random.Random(36)
    alphabet = list("a.b/-:12[] \n(é_") + ["path:", "path: ", ".py", "://", "//", ":3-4", "x.y:", "١"]
    texts = ORDINARY + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for text in texts:
        assert [(m.start(), m.end(), m.path, m.first, m.last) for m in CITATION.finditer(text)] == reference(text), text
        assert CITATION.sub(" ", text) == REFERENCE.sub(" ", text)


@pytest.mark.parametrize("name, text", [
    ("a.a.a", "a." * 20_000), ("a/a/a", "a/" * 20_000), ("a-a-a", "a-" * 20_000), ("dots then :1", "a." * 20_000 + "a:1"),
    ("bracket no end", "[a:1" * 10_000), ("many citations", "a.py:1" * 6_700), ("paragraphs", "a.py:1\n\n" * 5_000),
])
def test_parsing_and_checking_citations_is_linear(cited, name, text):
    """40k characters in well under 2 s on a loaded 2-core machine (the regex took ~20 s on `a.a.a…`)."""
    from stages.common.grounding.citations import check
    from stages.common.grounding.quoteguard import normal
    from stages.common.types import Evidence, PackedWindow

    evidence = Evidence([PackedWindow("a.py", 1, 5, "x = 1\n" * 5)], 100)
    started = time.perf_counter()
    spans(text, cited)
    check(text, cited, evidence, 1, True, ["a.py"])
    normal(text)
    assert time.perf_counter() - started < 2.0
