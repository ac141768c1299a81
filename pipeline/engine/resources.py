"""Process-wide handles reused across the jobs of a multirun (a loaded model, a parsed program, ...).

Hydra's basic launcher runs the jobs of ``-m`` one after the other in this process, so anything kept here
is loaded once per process. Entries are keyed by the caller; each namespace keeps its ``keep`` most recent.
Safe to call from several threads: a value is created once (the others wait for it), never twice.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")
_SHARED: dict[str, OrderedDict[Hashable, Any]] = {}
_STATS: dict[str, dict[str, int]] = {}
_GUARD = threading.RLock()  # held while a factory runs: two threads asking for one model load it once


def loading() -> threading.RLock:
    """The lock every factory runs under; hold it to load weights outside `shared`. transformers' `from_pretrained`
    patches torch process-wide while it runs (weight init, parameters created on the meta device): two loads at once
    in two threads can leave a third model's parameters on the meta device."""
    return _GUARD


def shared(namespace: str, key: Hashable, factory: Callable[[], T], keep: int = 1) -> T:
    """Return the cached value for ``(namespace, key)``, creating it with ``factory`` on a miss."""
    with _GUARD:
        return _shared(namespace, key, factory, keep)


def _shared(namespace: str, key: Hashable, factory: Callable[[], T], keep: int) -> T:
    entries = _SHARED.setdefault(namespace, OrderedDict())
    stats = _STATS.setdefault(namespace, {"hits": 0, "misses": 0})
    if key in entries:
        entries.move_to_end(key)
        stats["hits"] += 1
        return entries[key]
    stats["misses"] += 1
    value = factory()
    entries[key] = value
    while len(entries) > keep:
        entries.popitem(last=False)
    return value


def get(namespace: str, key: Hashable) -> Any | None:
    """The cached value or None, without creating anything."""
    with _GUARD:
        return _get(namespace, key)


def _get(namespace: str, key: Hashable) -> Any | None:
    entries = _SHARED.get(namespace)
    if entries is None or key not in entries:
        return None
    entries.move_to_end(key)
    return entries[key]


def put(namespace: str, key: Hashable, value: Any, keep: int = 1) -> None:
    with _GUARD:
        entries = _SHARED.setdefault(namespace, OrderedDict())
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > keep:
            entries.popitem(last=False)


def values(namespace: str) -> list[Any]:
    """Every cached value of a namespace, least recently used first."""
    with _GUARD:
        return list(_SHARED.get(namespace, {}).values())


def stats(namespace: str) -> dict[str, int]:
    with _GUARD:
        return dict(_STATS.get(namespace, {"hits": 0, "misses": 0}))


def clear(namespace: str | None = None) -> None:
    with _GUARD:
        for name in [namespace] if namespace else list(_SHARED):
            _SHARED.pop(name, None)
            _STATS.pop(name, None)
