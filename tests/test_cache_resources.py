"""pipeline.engine.cache (content keys, crash-safe writes) and pipeline.engine.resources (process-wide handles)."""
from __future__ import annotations

import pytest

from pipeline.engine import resources
from pipeline.engine.cache import fingerprint, publish_dir, write_atomic


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint("x")) == 64 and len(fingerprint("x", 12)) == 12


def test_write_atomic_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "deep" / "file.json"
    write_atomic(target, "one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "file.txt"
    write_atomic(target, "old")
    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]  # cannot be written
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_publish_dir_is_all_or_nothing(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(RuntimeError):
        with publish_dir(final) as tmp:
            (tmp / "half.npz").write_text("x")
            raise RuntimeError("crash mid-build")
    assert list(tmp_path.iterdir()) == []
    with publish_dir(final) as tmp:
        (tmp / "a.txt").write_text("first")
    with publish_dir(final) as tmp:  # a second build of the same thing: the first published folder wins
        (tmp / "a.txt").write_text("second")
    assert (final / "a.txt").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_shared_resources_reuse_and_evict():
    resources.clear("test-ns")
    made = []

    def factory(value):
        return lambda: made.append(value) or value

    assert resources.shared("test-ns", "a", factory("A"), keep=2) == "A"
    assert resources.shared("test-ns", "a", factory("A2"), keep=2) == "A"
    assert resources.shared("test-ns", "b", factory("B"), keep=2) == "B"
    resources.shared("test-ns", "a", factory("A3"), keep=2)  # touch a: b is now the oldest
    resources.shared("test-ns", "c", factory("C"), keep=2)
    assert made == ["A", "B", "C"]
    assert resources.get("test-ns", "b") is None and resources.get("test-ns", "a") == "A"
    assert resources.stats("test-ns") == {"hits": 2, "misses": 3}
    resources.clear("test-ns")
    assert resources.get("test-ns", "a") is None and resources.stats("test-ns") == {"hits": 0, "misses": 0}
