"""One loaded model, many answers: a per-model lock that serialises its users.

One model is shared by every answer of the process (a multirun, an application's threads), so its users are
serialised by a per-model lock (``exclusive``). The lock belongs to the ``LanguageModel``, not its torch module, so an
answer that never loads the weights (decoded by llama.cpp) is serialised all the same. An ``AdapterMix``
(stages/common/adapters/mixing.py) holds it from its first ``apply`` (mix) to its ``restore`` (unmix, a node that runs
even after a failure or Ctrl-C); a mix that is dropped without a restore (a custom graph without unmix) is restored
and its lock released when it is garbage collected. A second thread's answer waits at its mix until the first one has
unmixed. The lock is re-entrant within a thread.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Any

log = logging.getLogger(__name__)


class ModelLock:
    """Serialises the users of one loaded model across threads; re-entrant per thread.

    Unlike ``threading.RLock`` it may be released by another thread than the one that took it: the garbage
    collector may finalise an abandoned mix anywhere, and its lock must still come back.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, lease: Lease | None = None) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner not in (None, me):
                log.info("waiting for another answer to finish with the model")
                while self._owner not in (None, me):
                    self._cond.wait()
            self._owner, self._depth = me, self._depth + 1
            if lease is not None:
                lease.held = True

    def release(self) -> None:
        with self._cond:
            if self._depth == 0:
                raise RuntimeError("model lock released more often than taken")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @property
    def held(self) -> bool:
        return self._owner is not None


_LOCKS: weakref.WeakKeyDictionary[Any, ModelLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> ModelLock:
    """The lock of one model (its ``LanguageModel``; created on first use, gone with it)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = ModelLock()
        return lock


@contextlib.contextmanager
def exclusive(model: Any):
    """Use the shared model alone for a while (scoring, training, tokenizing): no other thread's mix is in it."""
    lock = model_lock(model)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


class Lease:
    """One holder's share of a ``ModelLock``: taken at most once, given back at most once."""

    def __init__(self, lock: ModelLock) -> None:
        self.lock, self.held = lock, False

    def take(self) -> None:
        if not self.held:
            self.lock.acquire(self)

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()
