"""Walking and reading a program tree safely: nothing outside the root is read, symlinks included."""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
from pathlib import Path

from pipeline.errors import InputError

DEFAULT_IGNORE = (".git", "__pycache__", "*.egg-info", "build", "dist", ".venv", "node_modules")


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str  # POSIX, relative to the root
    data: bytes
    sha256: str
    text: str


def resolve_root(program_root: str) -> Path:
    if not program_root:
        raise InputError("program_root is empty; pass program_root=<folder>")
    root = Path(program_root).expanduser()
    if not root.exists():
        raise InputError(f"program_root '{program_root}' does not exist")
    if not root.is_dir():
        raise InputError(f"program_root '{program_root}' is a file, not a folder")
    return root.resolve()


def inside(root: Path, candidate: Path) -> bool:
    """Whether the real location of ``candidate`` lies within ``root`` (``root`` already resolved)."""
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target or a symlink loop
        return False
    return real == root or root in real.parents


def walk(root: Path, ignore: list[str], max_file_bytes: int) -> tuple[list[SourceFile], dict[str, str]]:
    """All indexable text files under ``root`` in sorted order, and ``{path: reason}`` for what was skipped."""
    files: list[SourceFile] = []
    skipped: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            rel = (here / name).relative_to(root).as_posix()
            if ignored(name, rel, ignore):
                continue
            if (here / name).is_symlink():
                # never descend through a link: it may leave the root or loop back into it
                skipped[rel] = "symlinked folder" if inside(root, here / name) else "symlink outside the root"
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            full = here / name
            rel = full.relative_to(root).as_posix()
            if ignored(name, rel, ignore):
                continue
            reason, source = read_file(root, full, rel, max_file_bytes)
            if source is None:
                skipped[rel] = reason
            else:
                files.append(source)
    files.sort(key=lambda f: f.path)
    return files, skipped


def read_file(root: Path, full: Path, rel: str, max_file_bytes: int) -> tuple[str, SourceFile | None]:
    if full.is_symlink() and not inside(root, full):
        return "symlink outside the root", None
    if not inside(root, full):
        return "outside the root", None
    try:
        if not full.is_file():
            return "not a regular file", None
        size = full.stat().st_size
        if size > max_file_bytes:
            return f"larger than max_file_bytes ({size} > {max_file_bytes})", None
        with open(full, "rb") as handle:
            data = handle.read(max_file_bytes + 1)
    except PermissionError:
        return "unreadable (permission denied)", None
    except OSError as err:
        return f"unreadable ({err.strerror or err})", None
    if len(data) > max_file_bytes:
        return f"larger than max_file_bytes ({len(data)} > {max_file_bytes})", None
    if b"\x00" in data[:8192]:
        return "binary", None
    text = data.decode("utf-8", errors="replace")
    return "", SourceFile(rel, data, hashlib.sha256(data).hexdigest(), text)


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
