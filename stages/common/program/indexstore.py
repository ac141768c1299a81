"""The index of a program on disk: per-file facts and the built index, as plain arrays in one ``.npz``.

Written after every build that parsed something, read by stages.common.npzsafe (headers checked first, never
unpickled): strings are UTF-8 columns (``callgraph.pack_strings``), numbers are int arrays, every table's rows are
grouped by file (``*_offsets``).
Two uses:
- an unchanged program (same paths, same sha256) in a new process loads files, symbols, windows and the call
  graph straight from the columns: nothing is parsed, no graph is rebuilt, no JSON is decoded;
- a changed program re-parses only the changed files; the facts of the others come from the columns (``facts``).
A file that is missing, truncated, inconsistent, or written by other code (``code``: the source fingerprint of the
indexing code, pipeline/engine/cache.py) or for another window size is ignored, and rewritten by the caller.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engine.cache import write_atomic
from stages.common.npzsafe import CACHE_ARRAY_BYTES, read_npz
from stages.common.program.callgraph import CallGraph, pack_strings, unpack_strings
from stages.common.types import FileRecord, Symbol, Window

log = logging.getLogger(__name__)
SYMBOL_KINDS = ("function", "class", "method", "constant", "attribute")
WINDOW_KINDS = ("head", "function", "class", "method", "constant")
TABLES = ("sym", "win", "imp", "call")


class Outdated(ValueError):
    """The stored index was written by other code or for another window size (a miss, not damage)."""


def save(path: Path, window_lines: int, files: list[FileRecord], facts: list[dict[str, Any]], graph: CallGraph, *,
         code: str) -> None:
    """Write the facts of ``files`` (same order) and the built graph, made by ``code``; atomically (a reader never
    sees half)."""
    cols: dict[str, list] = {name: [] for name in (
        "sym_name", "sym_qualname", "sym_kind", "sym_start", "sym_end", "sym_signature", "sym_doc", "sym_public",
        "sym_annotations", "sym_reads", "win_start", "win_end", "win_anchor", "win_kind", "imp_module", "imp_names", "imp_level",
        "call_caller", "call_callee")}
    offsets = {t: [0] for t in TABLES}
    strings: dict[str, int] = {}
    for f in facts:
        for s in f["symbols"]:
            cols["sym_name"].append(s["name"])
            cols["sym_qualname"].append(s["qualname"])
            cols["sym_kind"].append(SYMBOL_KINDS.index(s["kind"]))
            cols["sym_start"].append(s["start"])
            cols["sym_end"].append(s["end"])
            cols["sym_signature"].append(s["signature"])
            cols["sym_doc"].append(s["doc"])
            cols["sym_public"].append(s["is_public"])
            cols["sym_annotations"].append(" ".join(s["annotations"]))
            cols["sym_reads"].append(" ".join(s["reads"]))
        for start, end, anchor, kind in f["windows"]:
            cols["win_start"].append(start)
            cols["win_end"].append(end)
            cols["win_anchor"].append(anchor)
            cols["win_kind"].append(WINDOW_KINDS.index(kind))
        for imp in f["imports"]:
            cols["imp_module"].append(imp["module"])
            cols["imp_names"].append(" ".join(imp["names"]))
            cols["imp_level"].append(imp["level"])
        for caller, callee in f["calls"]:
            cols["call_caller"].append(strings.setdefault(caller, len(strings)))
            cols["call_callee"].append(strings.setdefault(callee, len(strings)))
        for table, key in zip(TABLES, ("symbols", "windows", "imports", "calls")):
            offsets[table].append(offsets[table][-1] + len(f[key]))
    arrays: dict[str, np.ndarray] = {
        "window_lines": np.array(window_lines, np.int64), "code": np.array(code),
        "file_paths": pack_strings([r.path for r in files]), "file_sha": pack_strings([r.sha256 for r in files]),
        "file_modules": pack_strings([r.module or "" for r in files]),
        "file_bytes": np.array([r.bytes for r in files], np.int64),
        "file_lines": np.array([f["lines"] for f in facts], np.int64),
        "file_parsed": np.array([f["parsed"] for f in facts], bool),
        "call_strings": pack_strings(list(strings)),
        **{f"{t}_offsets": np.array(offsets[t], np.int64) for t in TABLES},
        **graph.arrays(),
    }
    for name, values in cols.items():
        if name in ("sym_kind", "win_kind"):
            arrays[name] = np.array(values, np.int8)
        elif name == "sym_public":
            arrays[name] = np.array(values, bool)
        elif name in ("sym_start", "sym_end", "win_start", "win_end", "imp_level", "call_caller", "call_callee"):
            arrays[name] = np.array(values, np.int64)
        else:
            arrays[name] = pack_strings(values)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as its allow_pickle keyword
    write_atomic(path, buffer.getvalue())


class Stored:
    """One stored index, checked for consistency on load; columns decoded on first use."""

    def __init__(self, data: dict[str, np.ndarray], window_lines: int, code: str):
        made_by, lines = data.get("code"), data.get("window_lines")
        if made_by is None or made_by.shape != () or made_by.dtype.kind != "U" or str(made_by) != code:
            raise Outdated("written by other code")
        if lines is None or lines.shape != () or int(lines) != window_lines:
            raise Outdated(f"written for another window size ({lines})")
        self.data = data
        self.paths = unpack_strings(data["file_paths"])
        self.sha = unpack_strings(data["file_sha"])
        self.modules = unpack_strings(data["file_modules"])
        n = len(self.paths)
        self.offsets = {t: data[f"{t}_offsets"].astype(np.int64) for t in TABLES}
        for name in ("file_bytes", "file_lines", "file_parsed"):
            if data[name].shape != (n,):
                raise ValueError(f"{name} has the wrong length")
        if len(self.sha) != n or len(self.modules) != n:
            raise ValueError("file columns of different lengths")
        for t, off in self.offsets.items():
            rows = len(data[f"{t}_start" if t in ("sym", "win") else "imp_level" if t == "imp" else "call_caller"])
            if off.shape != (n + 1,) or off[0] != 0 or off[-1] != rows or np.any(np.diff(off) < 0):
                raise ValueError(f"{t}_offsets do not match the {t} rows")
        self._cols: dict[str, list] = {}

    def keys(self) -> list[tuple[str, str]]:
        return list(zip(self.paths, self.sha))

    def col(self, name: str) -> list:
        """A column as a Python list (strings decoded), checked to have as many rows as its table."""
        if name not in self._cols:
            raw = self.data[name]
            values = unpack_strings(raw) if raw.dtype == np.uint8 and name not in ("sym_public",) else raw.tolist()
            table = name.split("_", 1)[0]
            if name != "call_strings" and table in self.offsets and len(values) != int(self.offsets[table][-1]):
                raise ValueError(f"column {name} has {len(values)} rows, its table {int(self.offsets[table][-1])}")
            self._cols[name] = values
        return self._cols[name]

    def records(self, package_modules: list[str | None]) -> dict[str, FileRecord]:
        bytes_, lines, parsed = (self.data[k].tolist() for k in ("file_bytes", "file_lines", "file_parsed"))
        return {p: FileRecord(p, s, b, n, m, bool(ok)) for p, s, b, n, m, ok in
                zip(self.paths, self.sha, bytes_, lines, package_modules, parsed)}

    def symbols(self, modules: list[str | None]) -> list[Symbol]:
        names, quals, kinds, starts, ends, sigs, docs, public, annotations, reads = (self.col(f"sym_{c}") for c in (
            "name", "qualname", "kind", "start", "end", "signature", "doc", "public", "annotations", "reads"))
        out, off = [], self.offsets["sym"].tolist()
        for i, (path, module) in enumerate(zip(self.paths, modules)):
            module = module or ""
            for r in range(off[i], off[i + 1]):
                out.append(Symbol(names[r], quals[r], SYMBOL_KINDS[kinds[r]], path, module, starts[r], ends[r],
                                  sigs[r], docs[r], bool(public[r]), tuple(annotations[r].split()) if annotations[r] else (),
                                  tuple(reads[r].split())))
        return out

    def windows(self) -> list[Window]:
        starts, ends, anchors, kinds = (self.col(f"win_{c}") for c in ("start", "end", "anchor", "kind"))
        out: list[Window] = []
        off = self.offsets["win"].tolist()
        for i, path in enumerate(self.paths):
            out.extend(Window(path, starts[r], ends[r], anchors[r], WINDOW_KINDS[kinds[r]]) for r in range(off[i], off[i + 1]))
        return out

    def graph(self) -> CallGraph:
        return CallGraph.from_arrays(self.data)

    def facts(self, i: int) -> dict[str, Any]:
        """The facts of the i-th stored file, as ``python_facts`` made them."""
        def rows(t: str) -> range:
            return range(int(self.offsets[t][i]), int(self.offsets[t][i + 1]))

        c = self.col
        strings = c("call_strings")
        return {
            "lines": int(self.data["file_lines"][i]), "parsed": bool(self.data["file_parsed"][i]),
            "symbols": [{"name": c("sym_name")[r], "qualname": c("sym_qualname")[r],
                         "kind": SYMBOL_KINDS[c("sym_kind")[r]], "start": c("sym_start")[r], "end": c("sym_end")[r],
                         "signature": c("sym_signature")[r], "doc": c("sym_doc")[r],
                         "is_public": bool(c("sym_public")[r]),
                         "annotations": c("sym_annotations")[r].split() if c("sym_annotations")[r] else [],
                         "reads": c("sym_reads")[r].split()}
                        for r in rows("sym")],
            "imports": [{"module": c("imp_module")[r], "names": c("imp_names")[r].split() if c("imp_names")[r] else [],
                         "level": c("imp_level")[r]} for r in rows("imp")],
            "calls": [[strings[c("call_caller")[r]], strings[c("call_callee")[r]]] for r in rows("call")],
            "windows": [[c("win_start")[r], c("win_end")[r], c("win_anchor")[r], WINDOW_KINDS[c("win_kind")[r]]]
                        for r in rows("win")],
        }


def load(path: Path | None, window_lines: int, code: str) -> Stored | None:
    """The stored index at ``path``, or None when there is none, it was made by other code (``code``) or for another
    window size, or it does not hold together (logged)."""
    if path is None or not path.is_file():
        return None
    try:
        data = read_npz(path, max_array_bytes=CACHE_ARRAY_BYTES, stored_only=True)  # a forged header costs nothing
        stored = Stored(data, window_lines, code)
        strings = stored.col("call_strings")
        for name in ("call_caller", "call_callee"):
            values = data[name]
            if values.size and (int(values.min()) < 0 or int(values.max()) >= len(strings)):
                raise ValueError(f"{name} refers to no string")
        for name, kinds in (("sym_kind", SYMBOL_KINDS), ("win_kind", WINDOW_KINDS)):
            if data[name].size and (int(data[name].min()) < 0 or int(data[name].max()) >= len(kinds)):
                raise ValueError(f"{name} out of range")
        return stored
    except Outdated as why:  # an edit to the indexing code: expected, rebuilt and overwritten
        log.info("index cache %s was %s; rebuilding it", path, why)
        return None
    except (OSError, ValueError, KeyError) as err:  # npzsafe.NpzRefused is a ValueError
        log.warning("index cache %s is unreadable (%s); rebuilding it", path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
