"""Content keys and crash-safe writes: a cache entry or artifact folder is either complete or absent."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


def fingerprint(value: Any, length: int = 64) -> str:
    """sha256 of the canonical JSON of ``value`` (dict order does not matter)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary sibling, then rename over ``path`` (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a published file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


PARTIAL_LOCK = ".owner.lock"  # inside a .partial folder: flock'ed by the process writing it, for as long as it writes
STALE_AFTER_S = 3600.0  # a .partial folder without a lock file (killed before locking, other OS) is stale after this


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success rename it to ``final``.

    When another process published ``final`` first, its folder wins and ours is discarded, so two builds
    of the same thing at once leave exactly one complete folder. On error nothing is left behind; a folder
    left by a killed process (``.<name>.*.partial``) is removed by the next ``publish_dir`` or
    ``clean_stale_partials`` in that parent, never while its writer is alive (it holds a lock on it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    lock = None
    try:
        lock = _hold(tmp / PARTIAL_LOCK)
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp / PARTIAL_LOCK)  # still locked through our open handle until we close it
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.close()


def discard(folder: Path) -> None:
    """Take a (corrupt) cache folder out of the way at once with a rename, then delete it. Of two runs healing
    it at once, one renames it and the other finds it gone."""
    folder = Path(folder)
    aside = folder.with_name(f".{folder.name}.{os.getpid()}.discarded")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _hold(path: Path):
    """An open handle with an exclusive flock on ``path`` (None where flock does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: stale folders are recognised by age alone
        return None
    handle = open(path, "wb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a filesystem without flock: the folder's age is what cleaners go by
        pass
    return handle


def clean_stale_partials(parent: Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the ``.*.partial`` folders of ``parent`` whose writer is gone; return what was removed.

    A writer holds an flock on the folder's lock file while it writes: when we can take that lock, the writer
    died (the kernel drops the locks of a killed process). A folder without a lock file counts as stale only
    after ``stale_after_s`` (its writer may have just created it)."""
    removed = []
    try:
        candidates = [p for p in Path(parent).iterdir() if p.name.startswith(".") and p.name.endswith(".partial")]
    except OSError:
        return removed
    for folder in candidates:
        if _writer_gone(folder, stale_after_s):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                log.warning("removed '%s', left by a build that did not finish", folder)
                removed.append(folder)
    return removed


def _writer_gone(folder: Path, stale_after_s: float) -> bool:
    try:
        import fcntl
    except ImportError:
        fcntl = None
    lock_file = folder / PARTIAL_LOCK
    if fcntl is not None and lock_file.is_file():
        try:
            with open(lock_file, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the handle closes
            return True
        except BlockingIOError:
            return False  # its writer is alive and still writing
        except OSError:
            pass  # no flock on this filesystem: go by age
    try:
        return time.time() - folder.stat().st_mtime > stale_after_s
    except OSError:
        return False
