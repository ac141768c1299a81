"""Issue 13: the index stored as arrays (no pickle, no JSON), parsing in worker processes, networkx only on demand."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.engine import resources
from stages.common.program import pyfacts
from stages.common.program.callgraph import CallGraph, pack_strings, unpack_strings
from stages.common.program.indexing import Parsing, build_index
from tests.test_index import SIMPLE

MORE = {
    **SIMPLE,
    "pkg/deep/__init__.py": "from ..core import helper\n",
    "pkg/deep/mod.py": (
        "from . import other\nfrom pkg.core import Engine as E\n\n\n"
        "def f(x: 'Annotated[int, Range(ge=1)]' = g()):\n    return helper(x) + other.h()\n\n\n"
        "class K(E):\n    def m(self):\n        return [helper(i) for i in range(3)]\n"
    ),
    "pkg/deep/other.py": "def h():\n    '''Doc with \\u00e9 and a NUL-free line.'''\n    return 1\n",
    "pkg/broken.py": "def oops(:\n",
    "notes.txt": "plain\ntext\n",
}


def _same(a, b) -> None:
    assert a.files == b.files and a.symbols == b.symbols and a.windows == b.windows
    assert a.fingerprint == b.fingerprint and a.texts == b.texts
    ga, gb = a.graph, b.graph
    assert list(ga.nodes(data=True)) == list(gb.nodes(data=True))
    assert list(ga.edges(keys=True, data=True)) == list(gb.edges(keys=True, data=True))


def test_strings_round_trip_including_odd_text():
    values = ["", "a", "é ü", "\ud800x", "tab\tand\nnewline", "with\x00nul"]
    back = unpack_strings(pack_strings(values))
    assert back[:5] == values[:5] and back[5] == "with\ufffdnul"
    assert unpack_strings(pack_strings([])) == [] and unpack_strings(pack_strings([""])) == [""]
    with pytest.raises(ValueError):
        unpack_strings(pack_strings(["a", "b"])[:-1])  # truncated


def test_unchanged_tree_loads_from_arrays_without_parsing_or_networkx(tmp_path, make_tree, fresh_index_memory,
                                                                       monkeypatch):
    root = make_tree(tmp_path / "prog", MORE)
    cache = tmp_path / "cache"
    first = build_index(str(root), [], 1_000_000, 80, cache)
    stored = list((cache / "index").glob("*.npz"))
    assert len(stored) == 1
    with np.load(stored[0], allow_pickle=False) as npz:  # plain arrays only
        assert all(npz[name].dtype != object for name in npz.files)
    resources.clear("program-index")  # a new process
    monkeypatch.setattr(pyfacts, "python_facts", lambda *a: pytest.fail("parsed an unchanged file"))
    monkeypatch.setattr("stages.common.program.indexing.python_facts", lambda *a: pytest.fail("parsed an unchanged file"))
    second = build_index(str(root), [], 1_000_000, 80, cache)
    assert second.callgraph._nx is None  # nothing asked for graph algorithms yet
    _same(first, second)
    assert second.callgraph._nx is not None


def test_a_changed_file_reparses_alone_and_keeps_the_graph_right(tmp_path, make_tree, fresh_index_memory):
    root = make_tree(tmp_path / "prog", MORE)
    cache = tmp_path / "cache"
    build_index(str(root), [], 1_000_000, 80, cache)
    (root / "pkg/use.py").write_text(MORE["pkg/use.py"] + "\n\ndef more():\n    return run() + helper(2)\n")
    resources.clear("program-index")
    incremental = build_index(str(root), [], 1_000_000, 80, cache)
    resources.clear("program-index")
    scratch = build_index(str(root), [], 1_000_000, 80, None)
    _same(incremental, scratch)
    assert ("sym:pkg/use.py::more", "sym:pkg/core.py::helper") in {(u, v) for u, v in incremental.graph.edges()}


@pytest.mark.parametrize("damage", ["truncate", "garbage", "object_array", "bad_edge"])
def test_a_damaged_store_is_rebuilt(tmp_path, make_tree, fresh_index_memory, damage, caplog):
    root = make_tree(tmp_path / "prog", MORE)
    cache = tmp_path / "cache"
    first = build_index(str(root), [], 1_000_000, 80, cache)
    path = next((cache / "index").glob("*.npz"))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip")
    else:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        if damage == "object_array":
            data["sym_kind"] = np.array([{"x": 1}], dtype=object)
        else:
            data["edge_dst"] = data["edge_dst"] + 10_000
        np.savez(path, **data)
    resources.clear("program-index")
    again = build_index(str(root), [], 1_000_000, 80, cache)
    _same(first, again)
    assert "rebuilding" in caplog.text


def test_parsing_in_worker_processes_gives_the_same_index(tmp_path, make_tree, fresh_index_memory):
    files = {**MORE, **{f"gen/m{i}.py": f"import gen.m{(i + 1) % 30}\n\ndef f{i}():\n    return f{(i + 1) % 30}()\n"
                        for i in range(30)}}
    root = make_tree(tmp_path / "prog", files)
    serial = build_index(str(root), [], 1_000_000, 80, None, parsing=Parsing(workers=1))
    resources.clear("program-index")
    parallel = build_index(str(root), [], 1_000_000, 80, None, parsing=Parsing(workers=2, parallel_min_files=1))
    _same(serial, parallel)


def test_a_failing_worker_falls_back_to_this_process(monkeypatch, caplog):
    texts = ["def a():\n    b()\n", "x = (\n", "class C:\n    def m(self):\n        return 1\n"]
    monkeypatch.setattr(pyfacts.sys, "executable", "/bin/false")
    facts = pyfacts.parse_many(texts, 80, 2)
    assert facts == [pyfacts.python_facts(t, 80) for t in texts]
    assert "parse worker failed" in caplog.text


def test_callgraph_counts_match_networkx(tmp_path, make_tree, fresh_index_memory):
    idx = build_index(str(make_tree(tmp_path / "prog", MORE)), [], 1_000_000, 80, None)
    cg, g = idx.callgraph, idx.graph
    for node in g.nodes:
        for direction, edges in (("in", g.in_edges), ("out", g.out_edges)):
            for types in (("calls",), ("imports", "calls"), ("imports", "calls", "tests")):
                expected = sum(1 for _, _, d in edges(node, data=True) if d["type"] in types)
                assert cg.degree(node, direction, types) == expected
    assert cg.count("imports") == sum(1 for *_, d in g.edges(data=True) if d["type"] == "imports")
    assert CallGraph.from_networkx(g).ids == cg.ids
    wanted = {"pkg/core.py"}
    assert cg.nodes_with_path(wanted) == [n for n, d in g.nodes(data=True) if d.get("path") in wanted]
