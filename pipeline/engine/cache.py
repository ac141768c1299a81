"""Content keys and crash-safe writes: a cache entry or artifact folder is either complete or absent.

A cached artifact is keyed by what it was made from: its inputs and config (``fingerprint``) and the code that
made it (``source_fingerprint``), so an edit to that code is a cache miss, never a stale hit.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.engine.errors import ConfigError

log = logging.getLogger(__name__)


def fingerprint(value: Any, length: int = 64) -> str:
    """sha256 of the canonical JSON of ``value`` (dict order does not matter)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def source_fingerprint(name: str, length: int = 16) -> str:
    """A hash of the code behind ``name``: a module, or an object in one (a ``_target_`` such as ``pkg.mod.Cls``).

    The rule: the source files of that module and, transitively, of every module of the same top-level package
    that it imports (``import``/``from ... import`` statements anywhere in the file, read from its text, not run),
    hashed in module-name order. For a stage ``stages.synth`` that is ``stages/synth.py`` and the
    ``stages.common`` modules it uses, directly or through each other; third-party code and the framework are
    left out (their versions are not part of the key). Computed once per process per name (the source cannot
    change under a running process without a reload); ``source_fingerprint.cache_clear()`` forgets it.
    """
    return _source_fingerprint(name)[:length]


@functools.cache
def _source_fingerprint(name: str) -> str:
    module = _module_of(name)
    if module is None:
        raise ConfigError(f"cannot fingerprint the code of '{name}': no such module")
    package = module.split(".")[0]
    seen: dict[str, bytes] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen[current], imports = _source_and_imports(current, package)
        todo.extend(m for m in imports if m not in seen)
    digest = hashlib.sha256()
    for current in sorted(seen):
        digest.update(f"{current}\0{len(seen[current])}\0".encode())
        digest.update(seen[current])
    return digest.hexdigest()


source_fingerprint.cache_clear = _source_fingerprint.cache_clear  # type: ignore[attr-defined]


def _module_of(name: str) -> str | None:
    """The longest prefix of the dotted ``name`` that is an importable module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if _spec(candidate) is not None:
            return candidate
    return None


def _spec(module: str):
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__spec__", None) is not None:
        return loaded.__spec__
    parent = module.rpartition(".")[0]
    if parent and getattr(_spec(parent), "submodule_search_locations", None) is None:
        return None  # the parent is a plain module (`mod.func`) or absent: asking would import it
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent that is not a package, or a broken one: not a module
        return None


# an import statement at any indentation (imports inside functions count); `from x import (a,\n b)` included.
# Read from the text, not run: a match inside a string only adds a module that exists (one miss too many, never
# one too few)
_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)|import[ \t]+([^\n#;]*))",
                     re.MULTILINE)


def _source_and_imports(module: str, top: str) -> tuple[bytes, set[str]]:
    """The bytes of a module's file and the modules of package ``top`` that its import statements name."""
    spec = _spec(module)
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not os.path.isfile(origin):  # a namespace package: no file of its own
        return b"", set()
    data = Path(origin).read_bytes()
    if not origin.endswith(".py"):  # compiled: its bytes are the code, its imports are not readable
        return data, set()
    package = module if spec.submodule_search_locations is not None else module.rpartition(".")[0]
    names: set[str] = set()
    for base, imported, plain in _IMPORT.findall(data.decode("utf-8", errors="replace")):
        if plain:  # import a.b as c, d
            names.update(part.split()[0] for part in plain.split(",") if part.split())
            continue
        level = len(base) - len(base.lstrip("."))
        base = base[level:]
        if level:  # relative: from the package the module is in
            anchor = package.split(".")[: len(package.split(".")) - level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        names.add(base)
        if base.split(".")[0] == top:  # `from pkg import mod` names a module too, `from mod import f` does not
            for alias in imported.strip("()").split(","):
                alias = alias.split()[0] if alias.split() else "*"
                if alias != "*" and alias.isidentifier() and _spec(f"{base}.{alias}") is not None:
                    names.add(f"{base}.{alias}")
    names = {n for n in names if n.split(".")[0] == top}
    # importing a submodule runs its packages' __init__ first
    names.update(".".join(name.split(".")[:end]) for name in list(names) for end in range(1, name.count(".") + 1))
    return data, names


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


DISCARDED = re.compile(r"^\..+\.(\d+)(?:-[0-9a-f]{8})?\.discarded$")  # what `discard` renames a folder to
DISCARD_STALE_AFTER_S = 300.0  # a discarded folder of a live process is still being deleted for at most this long


def discard(folder: Path) -> None:
    """Take a (corrupt) cache folder out of the way at once with a rename, then delete it. Of two runs healing
    it at once, one renames it and the other finds it gone; what a killed run left aside, the next
    ``clean_stale_partials`` in that parent removes."""
    folder = Path(folder)
    aside = folder.with_name(f".{folder.name}.{os.getpid()}-{os.urandom(4).hex()}.discarded")
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
    """Remove the ``.*.partial`` folders of ``parent`` whose writer is gone, and the folders a killed ``discard``
    left aside (``clean_stale_discarded``); return what was removed.

    A writer holds an flock on the folder's lock file while it writes: when we can take that lock, the writer
    died (the kernel drops the locks of a killed process). A folder without a lock file counts as stale only
    after ``stale_after_s`` (its writer may have just created it)."""
    removed: list[Path] = []
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
    return removed + clean_stale_discarded(parent)


def clean_stale_discarded(parent: Path, stale_after_s: float = DISCARD_STALE_AFTER_S) -> list[Path]:
    """Remove the folders of ``parent`` that ``discard`` renamed aside (exactly its names, ``DISCARDED``) and did not
    finish deleting: those of a process that is gone, or set aside over ``stale_after_s`` ago. Their contents are
    garbage whoever deletes them, so a second deleter (another run, another host) costs nothing."""
    removed: list[Path] = []
    try:
        candidates = [p for p in Path(parent).iterdir() if DISCARDED.match(p.name)]
    except OSError:
        return removed
    for folder in candidates:
        match = DISCARDED.match(folder.name)
        try:
            set_aside = folder.lstat()
        except OSError:
            continue  # its deleter finished
        if not stat.S_ISDIR(set_aside.st_mode):
            continue  # discard renames folders only
        fresh = time.time() - set_aside.st_ctime <= stale_after_s  # the rename (and every deletion) sets ctime
        if fresh and _process_alive(int(match.group(1))):  # type: ignore[union-attr]  # matched above
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            log.warning("removed '%s', left by a run killed while deleting a corrupt cache entry", folder)
            removed.append(folder)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still run; True when it cannot be told (the age rule decides)."""
    if pid == os.getpid() or os.name != "posix":  # ours: another thread may be deleting it; elsewhere no signal 0
        return True
    try:
        os.kill(pid, 0)  # signal 0: delivers nothing, only asks whether the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or no such pid number: the age rule decides
        pass
    return True


def _writer_gone(folder: Path, stale_after_s: float) -> bool:
    fcntl: Any
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
