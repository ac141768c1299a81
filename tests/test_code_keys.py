"""Issue 16 item 3: cached artifacts are keyed on the source of the code that made them, not on hand-bumped versions.

An edit to that code is a miss that heals (rebuilt, rewritten atomically); unchanged code is a hit, also in a new
process (simulated by forgetting the per-process caches)."""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline import api
from pipeline.engine import resources
from pipeline.engine.cache import source_fingerprint
from pipeline.engine.errors import ConfigError
from stages.common.program import indexstore, pyfacts
from stages.common.program.indexing import build_index
from stages.common.retrieval import dense
from tests.test_adapters import PROGRAM


@pytest.fixture(autouse=True)
def fresh_fingerprints():
    source_fingerprint.cache_clear()
    yield
    source_fingerprint.cache_clear()


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A throwaway package on sys.path: stage.py imports common.helper (absolute) and common.more (relative)."""
    name = f"codekeys_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "src" / name
    files = {
        "__init__.py": "",
        "common/__init__.py": "",
        "common/helper.py": "def scale(x):\n    return 2 * x\n",
        "common/more.py": "OFFSET = 1\n",
        "common/unused.py": "UNUSED = 0\n",
        "stage.py": (f"import json\nfrom {name}.common import helper\n\n\nclass Thing:\n"
                     "    def run(self, x):\n        from .common.more import OFFSET\n"
                     "        return helper.scale(x) + OFFSET\n"),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return name, root


def edit(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)
    source_fingerprint.cache_clear()  # a new process


def test_the_fingerprint_covers_the_module_and_what_it_imports_from_its_package(package):
    name, root = package
    first = source_fingerprint(f"{name}.stage.Thing")
    assert first == source_fingerprint(f"{name}.stage")  # an object's code is its module's
    edit(root / "common" / "unused.py", "# not imported by the stage\n")
    assert source_fingerprint(f"{name}.stage.Thing") == first
    for rel in ("stage.py", "common/helper.py", "common/more.py", "common/__init__.py"):
        before = source_fingerprint(f"{name}.stage.Thing")
        edit(root / rel, "# an edit\n")
        assert source_fingerprint(f"{name}.stage.Thing") != before, rel


def test_the_fingerprint_is_computed_once_per_process(package):
    name, root = package
    first = source_fingerprint(f"{name}.stage")
    (root / "stage.py").write_text((root / "stage.py").read_text() + "# edited under a running process\n")
    assert source_fingerprint(f"{name}.stage") == first


def test_an_unknown_module_is_a_config_error():
    with pytest.raises(ConfigError, match="no_such_package_xyz"):
        source_fingerprint("no_such_package_xyz.Stage")


# --- the index store ------------------------------------------------------------------------------------------

def test_index_cache_hits_while_the_indexing_code_is_unchanged_and_heals_when_it_changes(
        tmp_path, make_tree, fresh_index_memory, monkeypatch, caplog):
    root = make_tree(tmp_path / "prog", PROGRAM)
    cache = tmp_path / "cache"
    first = build_index(str(root), [], 1_000_000, 80, cache)
    (stored,) = (cache / "index").glob("*.npz")
    parses = []
    real = pyfacts.python_facts
    monkeypatch.setattr("stages.common.program.indexing.python_facts", lambda *a: parses.append(1) or real(*a))

    resources.clear("program-index")  # a new process, same code: everything from the store
    source_fingerprint.cache_clear()
    same = build_index(str(root), [], 1_000_000, 80, cache)
    assert parses == [] and same.fingerprint == first.fingerprint

    monkeypatch.setattr("stages.common.program.indexing.indexing_code", lambda: "edited")  # the indexing code was edited
    resources.clear("program-index")
    with caplog.at_level(logging.INFO, logger="stages"):
        rebuilt = build_index(str(root), [], 1_000_000, 80, cache)
    py_files = sum(p.endswith(".py") for p in PROGRAM)
    assert len(parses) == py_files  # every file parsed again: no fact of the old code is reused
    assert rebuilt.fingerprint != first.fingerprint  # so artifacts keyed by it are a miss too
    assert rebuilt.windows == first.windows
    assert list((cache / "index").glob("*.npz")) == [stored]  # rewritten in place, nothing piles up
    assert "other code" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert indexstore.load(stored, 80, "edited") is not None

    resources.clear("program-index")  # and the healed store hits again
    build_index(str(root), [], 1_000_000, 80, cache)
    assert len(parses) == py_files


# --- dense vectors ----------------------------------------------------------------------------------------------

class CountingEncoder:
    """Stands in for MiniLM: the cache logic only needs ``folder``, ``dim``, ``adapter`` and ``encode``."""

    def __init__(self, folder: Path):
        self.folder, self.dim, self.calls, self.adapter = folder, 4, [], None

    def encode(self, texts, max_tokens, progress=False):
        self.calls.append(len(texts))
        return np.full((len(texts), self.dim), 0.5, np.float32)


def test_dense_vectors_of_other_code_are_embedded_again(tmp_path, make_tree, fresh_index_memory, monkeypatch):
    root = make_tree(tmp_path / "prog", PROGRAM)
    enc = CountingEncoder(tmp_path / "model")

    def fresh_index():
        resources.clear("program-index")
        return build_index(str(root), [], 1_000_000, 80, None)

    index = fresh_index()
    dense.window_vectors(index, enc, 64, tmp_path / "cache", False)
    dense.window_vectors(fresh_index(), enc, 64, tmp_path / "cache", False)
    assert enc.calls == [len(index.windows)]  # unchanged code: a hit
    monkeypatch.setattr(dense, "source_fingerprint", lambda name: "edited")
    dense.window_vectors(fresh_index(), enc, 64, tmp_path / "cache", False)
    assert enc.calls == [len(index.windows)] * 2  # other code: every window again
    (cache_file,) = (tmp_path / "cache" / "dense").glob("*.npz")
    with np.load(cache_file, allow_pickle=False) as data:
        assert str(data["code"]) == "edited"


# --- build artifacts ---------------------------------------------------------------------------------------------

def test_an_edited_synth_stage_is_a_new_artifact_key_and_the_unchanged_one_a_hit(tmp_path, make_tree, monkeypatch):
    """The synth stage is a copy in a throwaway module (so its source can be edited); the build config names it."""
    name = f"synthcopy_{uuid.uuid4().hex[:8]}"
    module = tmp_path / "src" / f"{name}.py"
    module.parent.mkdir()
    module.write_text("from stages.synth import HashedSynth as _Hashed\n\n\nclass HashedSynth(_Hashed):\n"
                      "    \"\"\"version 1\"\"\"\n")
    monkeypatch.syspath_prepend(str(module.parent))
    program = make_tree(tmp_path / "prog", PROGRAM)

    def build(tag: str):
        source_fingerprint.cache_clear()  # each build as a new process
        resources.clear("program-index")
        folder, result = api.run(["pipeline=build", "model=tiny_random", f"paths.outputs={tmp_path / 'out'}",
                                  f"program_root={program}", f"synth._target_={name}.HashedSynth"],
                                 run_dir=tmp_path / tag)
        return Path(str(folder)), {t.node: t.status for t in result.trace}

    first, statuses = build("first")
    assert statuses["synth"] == "ok"
    again, statuses = build("again")
    assert again == first and statuses["synth"] == statuses["store"] == "skipped"  # unchanged code: a hit
    module.write_text(module.read_text().replace("version 1", "version 2"))
    edited, statuses = build("edited")
    assert edited != first and statuses["synth"] == statuses["store"] == "ok"  # edited code: a miss, rebuilt
    manifest = (edited / "manifest.json").read_text()
    assert name in manifest and "stages.artifacts" in manifest  # the manifest says which code made it
