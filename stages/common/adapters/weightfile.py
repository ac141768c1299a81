"""The safetensors file a model's weights were loaded from, kept open so that a weight written in place can be read
back bit for bit (merge mode, stages/common/adapters/mixing.py).

Why: transformers maps a safetensors checkpoint privately (copy-on-write), so a weight written in place costs no
more memory than the mapped weight itself, whereas a merged *copy* of every targeted weight costs as much again
(212 MB on SmolLM2 in bfloat16, measured at the mix node). Restoring from the file is exact only if the file holds
what the model holds: each parameter is compared bit for bit with its bytes in the file once, before it is first
written; a parameter that differs (cast or moved at load, renamed) or has no entry is mixed by a copy as before.
The files stay open, so a checkpoint replaced on disk (healed, converted again: published by rename) keeps its old
bytes readable through this handle. Nothing here maps the file: reads go straight into the weight (``preadv``).
"""
from __future__ import annotations

import json
import logging
import os
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
    handle: Any  # the open file
    offset: int
    nbytes: int
    dtype: str  # a torch dtype's name
    shape: tuple[int, ...]


class WeightFile:
    """Parameter name -> where its bytes lie in the checkpoint's safetensors files (open for reading)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.entries: dict[str, _Entry] = {}
        self._files: list[Any] = []
        self._checked: dict[str, bool] = {}  # name -> the loaded parameter is bit for bit its bytes in the file
        self.written: set[str] = set()  # parameters written in place and not read back yet
        self.lost = ""  # what could not be read back: the model is not exact any more
        weakref.finalize(self, _close, self._files)
        try:
            for path in sorted(folder.glob("*.safetensors")):
                handle = open(path, "rb")  # noqa: SIM115 - kept open for the model's lifetime, closed by finalize
                self._files.append(handle)
                length, header = read_header(handle, os.fstat(handle.fileno()).st_size)
                for name, entry in header.items():
                    dtype = _DTYPES.get(str(entry.get("dtype"))) if isinstance(entry, dict) else None
                    if name == "__metadata__" or dtype is None:
                        continue
                    begin, end = entry["data_offsets"]
                    self.entries[name] = _Entry(handle, 8 + length + begin, end - begin, dtype, tuple(entry["shape"]))
        except BaseException:
            _close(self._files)
            raise

    def claim(self, name: str, weight: Any) -> bool:
        """Take ``weight`` (the parameter ``name``) for writing in place if it can be read back from the file: its
        bytes are the file's (compared once) and no other mix has it written now. Claimed until ``read_back``."""
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
        self._read(entry, saved)
        return torch.equal(_bytes(saved), _bytes(weight.detach().cpu().contiguous()))  # bits: -0.0 is not 0.0

    def read_back(self, name: str, weight: Any) -> None:
        """Put the file's bytes of ``name`` back into ``weight``."""
        import torch

        entry = self.entries[name]
        if weight.device.type == "cpu" and weight.is_contiguous():
            self._read(entry, weight)
        else:
            saved = torch.empty(entry.shape, dtype=weight.dtype)
            self._read(entry, saved)
            weight.copy_(saved)
        self.written.discard(name)

    @staticmethod
    def _read(entry: _Entry, out: Any) -> None:
        view = memoryview(_bytes(out).numpy())
        done = 0
        while done < entry.nbytes:
            got = os.preadv(entry.handle.fileno(), [view[done:]], entry.offset + done)
            if got <= 0:
                raise OSError(f"{entry.handle.name}: ends before the bytes of a weight")
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
    """Note that ``model`` was loaded from the safetensors checkpoint ``folder`` (its weights can be read back)."""
    try:
        _FILES[model] = WeightFile(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:  # the model loaded: only in-place merging is lost
        log.warning("the weights of '%s' cannot be read back (%s: %s); merge mode keeps copies", folder,
                    type(err).__name__, err)


def weight_file(model: Any) -> WeightFile | None:
    """The checkpoint ``model`` was loaded from, if one was remembered."""
    return _FILES.get(model)
