"""The one way this project reads an ``.npz``: user files (adapters, encoder adapters) and our caches (index, dense).

Every member's zip entry and npy header are checked before any array is read, so a member that declares gigabytes
(a zip bomb, a forged header) is refused for the cost of its header: it must be ``<key>.npy``, of npy format 1.0 or
2.0, hold no objects (nothing is ever unpickled), have at most ``max_ndim`` dimensions and ``max_array_bytes`` bytes,
all members together at most ``max_total_bytes``, hold exactly the bytes its header declares (the zip's size of it),
and pass the caller's ``check``. With ``stored_only`` (our caches, which are written uncompressed) every member must be
stored, so each byte allocated is a byte on disk. The arrays are then read from the same open file, and each member's
zip CRC is verified. Any problem is one ``NpzRefused`` naming the member (``NpzUnreadable`` for a file that is no
readable npz); a caller turns it into an InputError (a user's file) or a rebuild (a cache).
"""
from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAX_ARRAY_BYTES = 256 << 20  # any one array of a user's npz (adapters are checked tighter, against the model)
MAX_TOTAL_BYTES = 2 << 30  # all arrays of one npz together
CACHE_ARRAY_BYTES = MAX_TOTAL_BYTES  # one array of our own caches, read stored_only: its every byte is on disk too
MemberCheck = Callable[[str, tuple, np.dtype], "str | None"]
Header = tuple[tuple[int, ...], np.dtype]


class NpzRefused(ValueError):
    """An npz member whose header fails a limit (nothing of the file was read); the message names the member."""


class NpzUnreadable(NpzRefused):
    """A file that is not a readable zip of npy arrays (truncated, corrupt, CRC failed)."""


def npz_headers(path: Path) -> dict[str, Header]:
    """Declared shape and dtype of every member, from the zip directory and the npy headers only (no array data)."""
    with zipfile.ZipFile(path) as archive:
        return {key: (shape, dtype) for key, (_, shape, dtype, _) in _members(archive).items()}


def _members(archive: zipfile.ZipFile) -> dict[str, tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype, int]]:
    """key -> (zip entry, declared shape, dtype, header length in bytes) of every member."""
    members = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise NpzUnreadable(f"member '{info.filename}' is not an .npy array")
        key = info.filename[:-4]
        if key in members:
            raise NpzUnreadable(f"member '{key}' appears twice")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise NpzUnreadable(f"member '{key}' has npy format version {version}, not 1.0 or 2.0")
            members[key] = (info, tuple(shape), dtype, member.tell())
    return members


def plain_array(key: str, shape: tuple, dtype: np.dtype, max_ndim: int = 2,
                max_array_bytes: int = MAX_ARRAY_BYTES) -> str | None:
    """Why a member of this header is refused whatever the file: objects, too many dimensions, too many bytes."""
    if dtype.hasobject:
        return "is an object array; refusing to unpickle it"
    if len(shape) > max_ndim:
        return f"has {len(shape)} dimensions {shape}, expected at most {max_ndim}"
    size = math.prod(shape) * dtype.itemsize
    if size > max_array_bytes:
        return f"declares shape {shape} of {dtype} ({size:,} bytes), over the {max_array_bytes:,} an array may take"
    return None


def read_npz(path: Path, check: MemberCheck | None = None, *, max_ndim: int = 2,
             max_array_bytes: int = MAX_ARRAY_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES,
             stored_only: bool = False) -> dict[str, np.ndarray]:
    """Every array of the npz at ``path``, after every member's header passed the limits (module docstring).

    Raises NpzRefused (a ValueError) for a refused member, NpzUnreadable (one too) for a file that is no readable
    npz, OSError when it cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = _members(archive)
            total = 0
            for key, (info, shape, dtype, header_bytes) in members.items():
                problem = plain_array(key, shape, dtype, max_ndim, max_array_bytes)
                problem = problem or (check(key, shape, dtype) if check else None)
                if problem:
                    raise NpzRefused(f"array '{key}' {problem}; nothing was read")
                size = math.prod(shape) * dtype.itemsize
                if info.file_size != header_bytes + size:
                    raise NpzRefused(f"array '{key}' declares {size:,} bytes but its member holds "
                                     f"{info.file_size - header_bytes:,}; nothing was read")
                if stored_only and (info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size):
                    raise NpzRefused(f"array '{key}' is compressed, where this file is written uncompressed; "
                                     "nothing was read")
                total += size
            if total > max_total_bytes:
                raise NpzRefused(f"its arrays declare {total:,} bytes together, over the {max_total_bytes:,} a file "
                                 "may take; nothing was read")
            if stored_only and total > os.fstat(archive.fp.fileno()).st_size:  # type: ignore[union-attr]  # open
                raise NpzRefused(f"its arrays declare {total:,} bytes, more than the file holds; nothing was read")
            return {key: _read(archive, info) for key, (info, *_) in members.items()}
    except NpzRefused:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, KeyError, ValueError) as err:
        raise NpzUnreadable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'truncated'}") from err


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as member:
        array = np.lib.format.read_array(member, allow_pickle=False)
        if member.read(1):  # also reaches the member's end, where zipfile verifies its CRC
            raise NpzUnreadable(f"array '{info.filename[:-4]}' is followed by bytes its header does not declare")
    return array
