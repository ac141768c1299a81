"""Stage `index` (docs/behaviour.md §1) on tricky trees, and its cache."""
from __future__ import annotations

import hashlib
import os

import pytest

from pipeline.engine import resources
from pipeline.engine.errors import InputError, StageFailed
from pipeline.engine.execute import execute
from pipeline.engine.graph import build_graph
from pipeline.engine.stage import RunContext
from stages.common.program import indexing
from stages.common.program.indexing import build_index
from stages.index import IndexProgram

SIMPLE = {
    "pkg/__init__.py": "",
    "pkg/core.py": (
        '"""Core helpers."""\n'
        "import os\n\n\n"
        "def helper(x: int) -> int:\n"
        '    """Double it."""\n'
        "    return 2 * x\n\n\n"
        "@staticmethod\n"
        "def decorated():\n"
        "    return helper(1)\n\n\n"
        "class Engine:\n"
        "    def start(self):\n"
        "        return helper(3)\n\n"
        "    def _stop(self):\n"
        "        pass\n"
    ),
    "pkg/use.py": "from pkg.core import helper\n\n\ndef run():\n    return helper(5)\n",
    "tests/test_core.py": "from pkg.core import helper\n\n\ndef test_helper():\n    assert helper(1) == 2\n",
    "README.md": "# demo\n\nSome text.\n",
}


def index_tree(root, max_file_bytes=1_000_000, window_lines=80, ignore=(), cache_dir=None):
    return IndexProgram(ignore=list(ignore), max_file_bytes=max_file_bytes, window_lines=window_lines,
                        cache_dir=str(cache_dir) if cache_dir else None).run(program_root=str(root))["index"]


def test_records_symbols_windows_and_edges(tmp_path, make_tree):
    root = make_tree(tmp_path / "prog", SIMPLE)
    idx = index_tree(root)
    assert sorted(idx.files) == sorted(SIMPLE)
    core = idx.files["pkg/core.py"]
    data = (root / "pkg/core.py").read_bytes()
    assert core.sha256 == hashlib.sha256(data).hexdigest() and core.bytes == len(data)
    assert core.lines == len(data.decode().splitlines()) and core.parsed and core.module == "pkg.core"
    syms = {s.qualname: s for s in idx.symbols if s.path == "pkg/core.py"}
    assert set(syms) == {"helper", "decorated", "Engine", "Engine.start", "Engine._stop"}
    assert syms["helper"].kind == "function" and syms["helper"].doc == "Double it."
    assert syms["helper"].signature == "helper(x: int) -> int"
    assert syms["Engine.start"].kind == "method" and syms["Engine"].kind == "class"
    assert syms["Engine._stop"].is_public is False and syms["helper"].is_public is True
    assert syms["decorated"].start == 10  # from its decorator
    windows = {(w.anchor, w.kind) for w in idx.windows_of("pkg/core.py")}
    assert windows == {("head", "head"), ("helper", "function"), ("decorated", "function"), ("Engine", "class")}
    assert [(w.start, w.end) for w in idx.windows_of("README.md")] == [(1, 3)]
    edges = {(u, v, d["type"]) for u, v, d in idx.graph.edges(data=True)}
    assert ("mod:pkg.use", "mod:pkg.core", "imports") in edges
    assert ("sym:pkg/use.py::run", "sym:pkg/core.py::helper", "calls") in edges
    assert ("sym:pkg/core.py::Engine.start", "sym:pkg/core.py::helper", "calls") in edges
    assert any(v == "sym:pkg/core.py::helper" and t == "tests" for _, v, t in edges)


def test_windows_are_cut_at_window_lines(tmp_path, make_tree):
    body = "def long():\n" + "".join(f"    x{i} = {i}\n" for i in range(100))
    root = make_tree(tmp_path / "prog", {"long.py": body})
    idx = index_tree(root, window_lines=20)
    spans = {w.anchor: (w.start, w.end) for w in idx.windows_of("long.py")}
    assert spans == {"head": (1, 20), "long": (1, 20)}


def test_tricky_files(tmp_path, make_tree):
    outside = make_tree(tmp_path / "outside", {"secret.py": "SECRET = 'outside'\n", "dir/leak.py": "LEAK = 1\n"})
    root = make_tree(tmp_path / "prog", {
        "ok.py": "def f():\n    return 1\n",
        "image.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "latin1.py": b"# caf\xe9\nname = 'caf\xe9'\n",
        "latin1.txt": b"na\xefve text\n",
        "big.txt": "a" * 5000,
        "broken.py": "def f(:\n    pass\n\nclass\n",
        "ignored/skip.py": "X = 1\n",
        ".git/config": "[core]\n",
        "__pycache__/ok.cpython-311.pyc": b"\x00\x01",
    })
    os.symlink(outside / "secret.py", root / "link_out.py")
    os.symlink(outside / "dir", root / "link_dir")
    os.symlink(root / "loop", root / "loop")  # a link to itself
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # a folder loop back into the root
    idx = index_tree(root, max_file_bytes=1000, ignore=[".git", "__pycache__", "ignored"])

    assert sorted(idx.files) == ["broken.py", "latin1.py", "latin1.txt", "ok.py"]
    assert idx.skipped["image.png"] == "binary"
    assert "max_file_bytes" in idx.skipped["big.txt"]
    assert "outside" in idx.skipped["link_out.py"] and "link_dir" in idx.skipped
    assert "loop" in idx.skipped and "sub/up" in idx.skipped
    # nothing from outside the root was read
    assert not any("SECRET" in text or "LEAK" in text for text in idx.texts.values())
    # non-UTF-8 text is indexed (undecodable bytes replaced)
    assert "na\ufffdve" in idx.texts["latin1.txt"]
    # Python that does not parse is still indexed as text, with a head window
    broken = idx.files["broken.py"]
    assert broken.parsed is False and broken.lines == 4
    assert [(w.start, w.end, w.kind) for w in idx.windows_of("broken.py")] == [(1, 4, "head")]
    assert not [s for s in idx.symbols if s.path == "broken.py"]


def test_python_nested_deeper_than_the_stack_is_indexed_as_text(tmp_path, make_tree):
    # parses (the C parser goes deeper than Python's recursion limit) but overflows an ast visitor; seen in sympy
    deep = "def total():\n    return " + " + ".join(["1"] * 1500) + "\n"
    idx = index_tree(make_tree(tmp_path / "prog", {"deep.py": deep, "ok.py": "def f():\n    return 1\n"}))
    assert idx.files["deep.py"].parsed is False and idx.files["ok.py"].parsed is True
    assert [w.kind for w in idx.windows_of("deep.py")] == ["head"]


@pytest.mark.parametrize("setup,fragments", [
    ("empty", ["has no indexable text files"]),
    ("only_binary", ["has no indexable text files", "binary"]),
    ("missing", ["does not exist"]),
    ("fifo", ["is neither a folder nor a regular file"]),
])
def test_unusable_program_root(tmp_path, setup, fragments):
    target = tmp_path / "prog"
    if setup == "empty":
        target.mkdir()
    elif setup == "only_binary":
        target.mkdir()
        (target / "blob.bin").write_bytes(b"\x00" * 10)
    elif setup == "fifo":  # one regular file is a program of that file (tests/test_focus.py)
        os.mkfifo(target)
    with pytest.raises(InputError) as info:
        index_tree(target)
    message = str(info.value)
    assert "prog" in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_empty_program_root_string():
    with pytest.raises(InputError, match="program_root"):
        index_tree("")


def test_unusable_root_fails_the_index_node(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"pipeline": {"name": "index-only", "inputs": {"program_root": str(tmp_path / "nope")},
                                         "nodes": {"index": {"stage": "stages.index.IndexProgram",
                                                             "in": {"program_root": "inputs.program_root"}}}}})
    with pytest.raises(StageFailed) as info:
        execute(build_graph(cfg), RunContext(tmp_path, [], {}))
    assert info.value.node == "index" and isinstance(info.value.error, InputError)
    assert "node 'index'" in str(info.value) and "does not exist" in str(info.value)


def test_a_file_with_a_line_over_max_line_chars_is_skipped(tmp_path, make_tree, fresh_index_memory):
    root = make_tree(tmp_path / "prog", {"ok.py": "x = 1\n", "wide.py": "y = '" + "a" * 60 + "'\n"})
    assert sorted(index_tree(root).files) == ["ok.py", "wide.py"]
    narrow = IndexProgram(ignore=[], max_line_chars=50).run(program_root=str(root))["index"]
    assert sorted(narrow.files) == ["ok.py"] and "longer than index.max_line_chars=50" in narrow.skipped["wide.py"]


def test_progress_bar_over_the_files_parsed_in_this_process(tmp_path, make_tree, monkeypatch, fresh_index_memory):
    import tqdm.auto

    real, shown = tqdm.auto.tqdm, []

    def spy(*args, **kwargs):
        shown.append(kwargs["disable"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    root = make_tree(tmp_path / "prog", {f"m{i}.py": f"def f{i}():\n    return {i}\n" for i in range(201)})
    for progress in (True, False):
        resources.clear("program-index")
        IndexProgram(progress=progress, workers=1).run(program_root=str(root))
    assert shown == [None, True]  # None: tqdm draws the bar on a terminal only


# ---------------------------------------------------------------- cache


@pytest.fixture
def parse_counter(monkeypatch):
    calls: list[str] = []
    real_py, real_text = indexing.python_facts, indexing.text_facts

    def count_py(text, window_lines):
        calls.append(text)
        return real_py(text, window_lines)

    def count_text(text, window_lines):
        calls.append(text)
        return real_text(text, window_lines)

    monkeypatch.setattr(indexing, "python_facts", count_py)
    monkeypatch.setattr(indexing, "text_facts", count_text)
    return calls


def test_cache_reuse_and_reparse_of_a_changed_file(tmp_path, make_tree, parse_counter, fresh_index_memory):
    root = make_tree(tmp_path / "prog", SIMPLE)
    cache = tmp_path / "cache"
    first = build_index(str(root), [], 1_000_000, 80, cache)
    assert len(parse_counter) == len(SIMPLE)

    # same process, unchanged tree: the very same index
    parse_counter.clear()
    assert build_index(str(root), [], 1_000_000, 80, cache) is first
    assert parse_counter == []

    # a new process (in-process memory gone): facts come from the disk cache, nothing is parsed
    resources.clear("program-index")
    second = build_index(str(root), [], 1_000_000, 80, cache)
    assert parse_counter == []
    assert second is not first and second.files == first.files and second.symbols == first.symbols
    assert second.windows == first.windows and second.fingerprint == first.fingerprint

    # one file changes: only that one is parsed again
    (root / "pkg/use.py").write_text(SIMPLE["pkg/use.py"] + "\n\ndef more():\n    return run()\n")
    third = build_index(str(root), [], 1_000_000, 80, cache)
    assert parse_counter == [(root / "pkg/use.py").read_text()]
    assert "more" in {s.qualname for s in third.symbols}
    assert third.files["pkg/use.py"].sha256 != first.files["pkg/use.py"].sha256
    assert third.fingerprint != first.fingerprint


def test_cache_with_other_settings_is_separate(tmp_path, make_tree, parse_counter, fresh_index_memory):
    root = make_tree(tmp_path / "prog", SIMPLE)
    cache = tmp_path / "cache"
    build_index(str(root), [], 1_000_000, 80, cache)
    parse_counter.clear()
    narrow = build_index(str(root), [], 1_000_000, 3, cache)  # other window_lines: other facts
    assert len(parse_counter) == len(SIMPLE)
    assert all(w.end - w.start < 3 for w in narrow.windows)


def test_unreadable_cache_is_rebuilt(tmp_path, make_tree, parse_counter, fresh_index_memory):
    root = make_tree(tmp_path / "prog", SIMPLE)
    cache = tmp_path / "cache"
    build_index(str(root), [], 1_000_000, 80, cache)
    for path in (cache / "index").iterdir():
        path.write_text("{not json")
    resources.clear("program-index")
    parse_counter.clear()
    idx = build_index(str(root), [], 1_000_000, 80, cache)
    assert len(parse_counter) == len(SIMPLE) and len(idx.files) == len(SIMPLE)


def test_in_process_index_survives_writes_to_ignored_folders(tmp_path, make_tree, fresh_index_memory):
    root = make_tree(tmp_path / "prog", {**SIMPLE, "outputs/old.json": "{}"})
    first = build_index(str(root), ["outputs"], 1_000_000, 80, None)
    (root / "outputs" / "run.json").write_text("{}")
    assert build_index(str(root), ["outputs"], 1_000_000, 80, None) is first
