"""Walking and reading a program tree safely: nothing outside the root is read, symlinks included."""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import os
import re
import stat
from pathlib import Path

from pipeline.engine.errors import InputError
from stages.common.program.lines import split_lines

# docs/behaviour.md §1's list, plus run output and tool caches (conf/index/default.yaml writes the same list; a test checks it)
DEFAULT_IGNORE = (".git", "__pycache__", "*.egg-info", "build", "dist", ".venv", "node_modules", "outputs", "multirun",
                  "*_cache", ".cache")


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str  # POSIX, relative to the root
    data: bytes
    sha256: str
    text: str


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one walk may take: a root such as ``/`` is refused by these budgets instead of read for hours."""

    max_file_bytes: int = 1_000_000
    max_files: int = 50_000  # files counted (after ignore globs) before the walk gives up
    max_total_bytes: int = 500_000_000  # summed size of the files it would read
    max_line_chars: int = 10_000  # a longer line (minified code, data blobs) skips its file
    exclude: tuple[str, ...] = ()  # folders never walked wherever they are (our outputs folder, this run's folder)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file or folder of a walk, with its ``lstat``."""

    rel: str
    full: Path
    stat: os.stat_result
    is_dir: bool


# filesystems whose "files" are kernel interfaces: reading /proc/kmsg blocks forever, /sys attributes may block
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2", "pstore", "bpf",
    "configfs", "fusectl", "mqueue", "hugetlbfs", "efivarfs", "binfmt_misc", "autofs", "selinuxfs", "rpc_pipefs",
    "nsfs", "binder",
})


def mount_table() -> dict[str, str]:
    """Mount point -> filesystem type of every mount (/proc/self/mountinfo; {} elsewhere); of a point mounted over,
    the last (the one on top)."""
    mounts: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.read(4_000_000).splitlines()
    except OSError:
        return mounts
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, kind = head.split(), tail.split()[:1]
        if len(fields) >= 5 and kind:
            mounts[_unescape(fields[4])] = kind[0]
    return mounts


def pseudo_kind(real: Path, mounts: dict[str, str]) -> str | None:
    """The pseudo filesystem that ``real`` (a resolved path) lies on, or None: the filesystem of its longest mount
    point prefix decides (a tmpfs at /dev/shm is a real filesystem, though /dev is a devtmpfs)."""
    kind = next((mounts[str(p)] for p in (real, *real.parents) if str(p) in mounts), None)
    return kind if kind in PSEUDO_FILESYSTEMS else None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def resolve_root(program_root: str) -> Path:
    if program_root is None or program_root == "":
        raise InputError("program_root is empty; pass program_root=<folder>")
    root = Path(program_root).expanduser()
    if not root.exists():
        raise InputError(f"program_root '{program_root}' does not exist")
    if not root.is_dir():
        raise InputError(f"program_root '{program_root}' is a file, not a folder")
    return _real(program_root, root)


def resolve_program(program_root: str) -> tuple[Path, str | None]:
    """The folder of the program and, when ``program_root`` names one regular file, that file's name: the whole
    program is then that file, and nothing else of its folder is read."""
    path = Path(program_root).expanduser() if program_root else None
    if path is None or not path.exists() or path.is_dir():
        return resolve_root(program_root), None
    if not path.is_file():  # a FIFO or device is never opened: reading may never return
        raise InputError(f"program_root '{program_root}' is neither a folder nor a regular file")
    real = _real(program_root, path)
    return real.parent, real.name


def _real(program_root: str, path: Path) -> Path:
    kind = pseudo_kind(path.resolve(), mount_table())
    if kind:
        raise InputError(f"program_root '{program_root}' is on a {kind} pseudo filesystem (kernel interfaces, "
                         "not a source tree); point program_root at a project folder")
    return path.resolve()


def inside(root: Path, candidate: Path) -> bool:
    """Whether the real location of ``candidate`` lies within ``root`` (``root`` already resolved)."""
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target or a symlink loop
        return False
    return real == root or root in real.parents


def scan(root: Path, ignore: list[str], limits: Limits) -> tuple[list[Entry], dict[str, str]]:
    """Every file and folder to consider under ``root`` (sorted walk, nothing opened), and ``{path: reason}`` for
    folders left out. Stops with an InputError naming the budget as soon as ``max_files`` or
    ``max_total_bytes`` is exceeded, so an absurd root costs a bounded walk, not an endless one."""
    mounts = mount_table()
    excluded = set()  # (device, inode) of the folders to leave out: no path spelling or symlink gets around it
    for folder in limits.exclude:
        with contextlib.suppress(OSError):
            held = os.stat(folder)
            excluded.add((held.st_dev, held.st_ino))
    entries: list[Entry] = []
    skipped: dict[str, str] = {}
    files = total = 0

    def unreadable(err: OSError) -> None:  # os.walk would drop a folder it cannot list without a word
        rel = Path(err.filename).relative_to(root).as_posix() if err.filename else "."
        skipped[rel] = f"unreadable folder ({err.strerror or err})"

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            full, rel, st = _stat_entry(root, here, name, ignore, skipped, "unreadable folder")
            if st is None:
                continue
            reason = _folder_reason(root, full, st, mounts, excluded)
            if reason:
                skipped[rel] = reason
                continue
            entries.append(Entry(rel, full, st, True))
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            full, rel, st = _stat_entry(root, here, name, ignore, skipped, "unreadable")
            if st is None:
                continue
            files += 1
            if files > limits.max_files:
                raise InputError(
                    f"program_root '{root}' has more than index.max_files={limits.max_files} files (reached at "
                    f"'{rel}'); point program_root at one project, add ignore globs (index.ignore), or raise "
                    "index.max_files")
            if stat.S_ISREG(st.st_mode) and st.st_size <= limits.max_file_bytes:
                total += st.st_size
                if total > limits.max_total_bytes:
                    raise InputError(
                        f"program_root '{root}' holds more than index.max_total_bytes={limits.max_total_bytes} "
                        f"bytes of text files (reached at '{rel}'); point program_root at one project, add ignore "
                        "globs (index.ignore), or raise index.max_total_bytes")
            entries.append(Entry(rel, full, st, False))
    return entries, skipped


def scan_file(root: Path, name: str) -> tuple[list[Entry], dict[str, str]]:
    """``scan`` of a program that is the one file ``root/name``: no other path of ``root`` is looked at."""
    full = root / name
    try:
        return [Entry(name, full, os.lstat(full), False)], {}
    except OSError as err:
        return [], {name: f"unreadable ({err.strerror or err})"}


def _stat_entry(root: Path, here: Path, name: str, ignore: list[str], skipped: dict[str, str],
                unreadable: str) -> tuple[Path, str, os.stat_result | None]:
    """The entry's path, its path under the root and its lstat; None when ignored or unreadable (then noted)."""
    full = here / name
    rel = full.relative_to(root).as_posix()
    if ignored(name, rel, ignore):
        return full, rel, None
    try:
        return full, rel, os.lstat(full)
    except OSError as err:
        skipped[rel] = f"{unreadable} ({err.strerror or err})"
        return full, rel, None


def _folder_reason(root: Path, full: Path, st: os.stat_result, mounts: dict[str, str],
                   excluded: set[tuple[int, int]]) -> str:
    if stat.S_ISLNK(st.st_mode):
        # never descend through a link: it may leave the root or loop back into it
        return "symlinked folder" if inside(root, full) else "symlink outside the root"
    # a mount point inside the program; the walk starts at the resolved root and follows no link: paths are real
    if mounts.get(str(full)) in PSEUDO_FILESYSTEMS:
        return f"{mounts[str(full)]} pseudo filesystem"
    if (st.st_dev, st.st_ino) in excluded:
        return "the pipeline's own outputs folder"
    if (full / ".hydra" / "config.yaml").is_file() or _our_trace(full / "trace.json"):
        return "a run folder (outputs of an earlier run)"
    return ""


def _our_trace(path: Path) -> bool:
    """Whether ``path`` is the trace.json every run of this framework writes into its run folder."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and b'"pipeline":' in head


def walk(root: Path, ignore: list[str], max_file_bytes: int,
         limits: Limits | None = None) -> tuple[list[SourceFile], dict[str, str]]:
    """All indexable text files under ``root`` in sorted order, and ``{path: reason}`` for what was skipped."""
    limits = limits or Limits(max_file_bytes)
    entries, skipped = scan(root, ignore, limits)
    return read_entries(root, entries, skipped, limits)


def read_entries(root: Path, entries: list[Entry], skipped: dict[str, str],
                 limits: Limits) -> tuple[list[SourceFile], dict[str, str]]:
    files: list[SourceFile] = []
    skipped = dict(skipped)
    for entry in entries:
        if entry.is_dir:
            continue
        # a regular file the walk found (it follows no link, from the resolved root) is inside the root: no need to
        # resolve its path again; it is opened with O_NOFOLLOW, so a link swapped in since the walk is refused
        walked = stat.S_ISREG(entry.stat.st_mode)
        reason, source = read_file(root, entry.full, entry.rel, limits.max_file_bytes, limits.max_line_chars, walked)
        if source is None:
            skipped[entry.rel] = reason
        else:
            files.append(source)
    files.sort(key=lambda f: f.path)
    return files, skipped


def read_file(root: Path, full: Path, rel: str, max_file_bytes: int,
              max_line_chars: int | None = None, walked: bool = False) -> tuple[str, SourceFile | None]:
    if not walked:
        if full.is_symlink() and not inside(root, full):
            return "symlink outside the root", None
        if not inside(root, full):
            return "outside the root", None
    try:
        st = full.lstat() if walked else full.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO, socket or device is never opened: reading may never return
            return "not a regular file", None
        if st.st_size > max_file_bytes:
            return f"larger than max_file_bytes ({st.st_size} > {max_file_bytes})", None
        data = _read_bounded(full, max_file_bytes + 1, nofollow=walked)
    except PermissionError:
        return "unreadable (permission denied)", None
    except OSError as err:
        return f"unreadable ({err.strerror or err})", None
    if data is None:
        return "not a regular file", None
    if len(data) > max_file_bytes:
        return f"larger than max_file_bytes ({len(data)} > {max_file_bytes})", None
    if b"\x00" in data[:8192]:
        return "binary", None
    text = data.decode("utf-8", errors="replace")
    # bytes split at \n alone are never shorter than the lines (in characters) split at \n, \r\n and \r: when none
    # is over the limit no line is, and the exact count runs only for a file that may have one
    if max_line_chars is not None and len(text) > max_line_chars and max(map(len, data.split(b"\n"))) > max_line_chars:
        longest = max(map(len, split_lines(text)), default=0)
        if longest > max_line_chars:
            return f"a line of {longest} characters (longer than index.max_line_chars={max_line_chars})", None
    return "", SourceFile(rel, data, hashlib.sha256(data).hexdigest(), text)


def read_small(root: Path, path: Path, limit: int) -> bytes | None:
    """At most ``limit`` bytes of a regular file inside ``root``; None for anything else (missing, a link out of
    the root, a FIFO or device, unreadable)."""
    if not inside(root, path):
        return None
    try:
        return _read_bounded(path, limit)
    except OSError:
        return None


def _read_bounded(full: Path, limit: int, nofollow: bool = False) -> bytes | None:
    """At most ``limit`` bytes; None when what was opened is not a regular file (swapped since the stat).
    Non-blocking open: a FIFO put in a file's place cannot hang the walk."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(full, flags | (getattr(os, "O_NOFOLLOW", 0) if nofollow else 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, min(1 << 20, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def ignored(name: str, rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)


def module_name(path: str, package_prefix: str | None) -> str | None:
    """Dotted module name of a Python file path (``a/b/__init__.py`` -> ``a.b``)."""
    if not path.endswith(".py"):
        return None
    parts = path[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if package_prefix:
        parts = [package_prefix, *parts]
    if not parts or not all(p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def is_test_path(path: str) -> bool:
    """A file of the program's tests: under tests/, test/ or testing/, or named test_*.py / *_test.py."""
    parts = path.split("/")
    name = parts[-1]
    return bool({"tests", "test", "testing"} & set(parts[:-1])) or name.startswith("test_") or name.endswith("_test.py")
