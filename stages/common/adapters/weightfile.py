"""The safetensors checkpoint a model's weights were loaded from, kept as a private copy taken at load: the model
never reads the file again, and a weight written in place (merge mode, stages/common/adapters/mixing.py) is read back
bit for bit from the copy, whatever happens to the file afterwards (changed in place, truncated, deleted, replaced).

Why a copy on disk: transformers maps a safetensors checkpoint privately, and a private mapping still shows later
writes to the file: the loaded weights would follow a file changed in place, and a truncated file kills the process
(SIGBUS) at the next read of a weight. So at load each file is copied into an unnamed temporary file (in the kernel,
0.08 s for SmolLM2's 257 MB, no resident memory) and every weight that is still the mapped file is read from that copy
into memory of its own. Keeping the weights written in place in memory instead would cost what merged copies cost
(+196 MiB of peak RSS on SmolLM2 in bfloat16), and checking the file's digest before reading back could only refuse:
docs/decisions.md. Each parameter is compared bit for bit with its bytes in the copy once, before it is first written;
a parameter that differs (cast or moved at load, renamed) or has no entry is mixed by a copy. Reads go straight into
the weight (``preadv``).
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


class HeaderError(ValueError):
    """A safetensors file whose 8-byte length prefix cannot be the length of its JSON header."""


def read_header(handle: Any, size: int) -> tuple[int, dict]:
    """The JSON header of the safetensors file open as ``handle`` (``size`` bytes long) and its length in bytes."""
    head = handle.read(8)
    if len(head) < 8:
        raise HeaderError("shorter than its header")
    length = int.from_bytes(head, "little")
    if length > min(size - 8, 100 << 20):
        raise HeaderError(f"header of {length} bytes in a file of {size}")
    return length, json.loads(handle.read(length))


class _Entry(NamedTuple):
    handle: Any  # the private copy, open
    offset: int
    nbytes: int
    dtype: str  # a torch dtype's name
    shape: tuple[int, ...]
    path: str  # the checkpoint file it is a copy of


class WeightFile:
    """Parameter name -> where its bytes lie in the private copies of the checkpoint's safetensors files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.entries: dict[str, _Entry] = {}
        self.copies: dict[str, Any] = {}  # real path of a checkpoint file -> its private copy (open)
        self._files: list[Any] = []
        self._checked: dict[str, bool] = {}  # name -> the loaded parameter is bit for bit its bytes in the copy
        self.written: set[str] = set()  # parameters written in place and not read back yet
        self.lost = ""  # what could not be read back: the model is not exact any more
        weakref.finalize(self, _close, self._files)
        try:
            for path in sorted(folder.glob("*.safetensors")):
                real = os.path.realpath(path)
                handle = private_copy(Path(real))
                self._files.append(handle)
                self.copies[real] = handle
                length, header = read_header(handle, os.fstat(handle.fileno()).st_size)
                for name, entry in header.items():
                    dtype = _DTYPES.get(str(entry.get("dtype"))) if isinstance(entry, dict) else None
                    if name == "__metadata__" or dtype is None:
                        continue
                    begin, end = entry["data_offsets"]
                    self.entries[name] = _Entry(handle, 8 + length + begin, end - begin, dtype,
                                                tuple(entry["shape"]), str(path))
        except BaseException:
            _close(self._files)
            raise

    def claim(self, name: str, weight: Any) -> bool:
        """Take ``weight`` (the parameter ``name``) for writing in place if it can be read back from the copy: its
        bytes are the copy's (compared once) and no other mix has it written now. Claimed until ``read_back``."""
        if name in self.written:
            return False
        if name not in self._checked:
            self._checked[name] = self._same(name, weight)
        if self._checked[name]:
            self.written.add(name)
        return self._checked[name]

    def _same(self, name: str, weight: Any) -> bool:
        import torch

        entry = self.entries.get(name)
        if entry is None or entry.dtype != str(weight.dtype).removeprefix("torch.") or entry.shape != tuple(weight.shape):
            return False
        if weight.device.type == "meta":  # offloaded by a device_map: no bytes here to compare or write
            return False
        saved = torch.empty(entry.shape, dtype=weight.dtype)
        _read(entry, saved)
        return torch.equal(_bytes(saved), _bytes(weight.detach().cpu().contiguous()))  # bits: -0.0 is not 0.0

    def read_back(self, name: str, weight: Any) -> None:
        """Put the copy's bytes of ``name`` back into ``weight``."""
        import torch

        entry = self.entries[name]
        if weight.device.type == "cpu" and weight.is_contiguous():
            _read(entry, weight)
        else:
            saved = torch.empty(entry.shape, dtype=weight.dtype)
            _read(entry, saved)
            weight.copy_(saved)
        self.written.discard(name)


def private_copy(path: Path) -> Any:
    """An unnamed temporary file holding the bytes ``path`` holds now, beside it (else in the temporary folder)."""
    with open(path, "rb") as original:
        size = os.fstat(original.fileno()).st_size
        try:
            copy = tempfile.TemporaryFile(prefix=".", dir=path.parent)  # unnamed; hidden where names are needed
        except OSError:  # a read-only checkpoint folder
            copy = tempfile.TemporaryFile(prefix=".")
        try:
            _copy_bytes(original.fileno(), copy.fileno(), size, path)
        except BaseException:
            copy.close()
            raise
    return copy


def _copy_bytes(src: int, dst: int, size: int, path: Path) -> None:
    done, in_kernel = 0, hasattr(os, "copy_file_range")
    while done < size:
        if in_kernel:
            try:
                got = os.copy_file_range(src, dst, size - done, done, done)
            except OSError:  # not between these filesystems: through a buffer instead
                in_kernel = False
                continue
        else:
            chunk = os.pread(src, min(size - done, 8 << 20), done)
            got = os.pwrite(dst, chunk, done) if chunk else 0
        if got <= 0:
            raise OSError(f"{path}: shorter than when it was opened")
        done += got


def own_memory(model: Any, source: WeightFile | None) -> int:
    """Give every CPU weight of ``model`` that lies in a mapped file memory of its own: read from ``source``'s
    private copy where it is a checkpoint file's bytes (its mapped pages are never touched), else copied. Afterwards
    no change to a file reaches the model. Returns how many tensors moved."""
    import torch

    maps = _file_mappings()
    moved = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type != "cpu" or not tensor.numel():
                continue
            where = _mapped_at(maps, tensor) if maps is not None else ("", 0)  # unknown: as if mapped
            if where is None:
                continue
            own = torch.empty(tensor.shape, dtype=tensor.dtype)
            copy = source.copies.get(where[0]) if source is not None else None
            if copy is not None and tensor.is_contiguous():
                _read(_Entry(copy, where[1], own.numel() * own.element_size(), "", (), where[0]), own)
            else:
                own.copy_(tensor)
            tensor.data = own
            moved += 1
    return moved


def _file_mappings() -> tuple[list[int], list[tuple[int, int, str]]] | None:
    """This process's file-backed mappings: their starts, and (end, file offset, path) of each, by address; None
    where /proc/self/maps cannot be read."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    starts, spans = [], []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0":  # inode 0: anonymous memory
            start, end = (int(x, 16) for x in fields[0].split("-"))
            starts.append(start)
            spans.append((end, int(fields[2], 16), fields[5]))
    return starts, spans


def _mapped_at(maps: tuple[list[int], list[tuple[int, int, str]]], tensor: Any) -> tuple[str, int] | None:
    """(path, file offset) of ``tensor``'s bytes when a file mapping holds them; ("", 0) when one holds only a part."""
    starts, spans = maps
    pointer = tensor.data_ptr()
    at = bisect.bisect_right(starts, pointer) - 1
    if at < 0 or pointer >= spans[at][0]:
        return None
    end, offset, path = spans[at]
    if pointer + tensor.numel() * tensor.element_size() > end:
        return "", 0
    return path, offset + pointer - starts[at]


def _read(entry: _Entry, out: Any) -> None:
    view = memoryview(_bytes(out).numpy())
    done = 0
    while done < entry.nbytes:
        got = os.preadv(entry.handle.fileno(), [view[done:]], entry.offset + done)
        if got <= 0:
            raise OSError(f"the copy of {entry.path} ends before the bytes of a weight")
        done += got


def _bytes(tensor: Any) -> Any:
    import torch

    return tensor.view(-1).view(torch.uint8)


def _close(files: list[Any]) -> None:
    for handle in files:
        handle.close()
    files.clear()


_FILES: weakref.WeakKeyDictionary[Any, WeightFile] = weakref.WeakKeyDictionary()


def remember(model: Any, folder: Path) -> None:
    """Note that ``model`` was just loaded from the safetensors checkpoint ``folder``: its files are copied privately,
    the model's weights stop reading them, and merge mode reads the weights it writes in place back from the copy."""
    source = None
    try:
        source = WeightFile(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:  # the model loaded: only in-place merging is lost
        log.warning("the weights of '%s' cannot be read back (%s: %s); merge mode keeps copies", folder,
                    type(err).__name__, err)
    own_memory(model, source)
    if source is not None:
        _FILES[model] = source


def weight_file(model: Any) -> WeightFile | None:
    """The private copy of the checkpoint ``model`` was loaded from, if one was taken."""
    return _FILES.get(model)
