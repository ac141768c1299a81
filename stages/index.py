"""Stage `index` (SPEC §1): walk the program, parse Python with ast, build the typed graph and windows index.

Per-file facts are cached on disk by ``(path, sha256)`` in one JSON file per program root, and the whole
index is kept in-process for the next job of a multirun when no file changed (size and mtime).

The walk is bounded (``max_files``, ``max_total_bytes``: a root such as ``/`` is refused with a message, not
read for hours), never enters a pseudo filesystem (/proc, /sys, /dev), never opens what is not a regular file,
and leaves out our own outputs folder (``exclude``), this run's folder and any Hydra run folder inside the program.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import networkx as nx

from pipeline import resources
from pipeline.cache import fingerprint, write_atomic
from pipeline.errors import InputError
from pipeline.stage import Range, RunContext, Stage
from stages.common.program import (DEFAULT_IGNORE, Entry, Limits, is_test_path, module_name, read_entries,
                                   resolve_root, scan)
from stages.common.pyfacts import python_facts, text_facts
from stages.common.types import FileRecord, ProgramIndex, Symbol, Window

log = logging.getLogger(__name__)
FACTS_VERSION = 3  # 3: lines counted at \n, \r\n, \r only (stages/common/lines.py)


class IndexProgram(Stage):
    outputs = {"index": ProgramIndex}

    def __init__(
        self,
        ignore: list[str] = list(DEFAULT_IGNORE),
        max_file_bytes: Annotated[int, Range(ge=1)] = 1_000_000,
        window_lines: Annotated[int, Range(ge=1)] = 80,
        cache_dir: str | None = None,
        progress: bool = True,
        max_files: Annotated[int, Range(ge=1)] = 50_000,
        max_total_bytes: Annotated[int, Range(ge=1)] = 500_000_000,
        max_line_chars: Annotated[int, Range(ge=1)] = 10_000,
        exclude: list[str] = [],
    ):
        self.progress = progress
        self.ignore = list(ignore)
        self.max_file_bytes = max_file_bytes
        self.window_lines = window_lines
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.limits = Limits(max_file_bytes, max_files, max_total_bytes, max_line_chars,
                             tuple(str(p) for p in exclude if p))

    def precheck(self, program_root: str) -> None:
        resolve_root(program_root)  # a missing, non-folder or /proc root fails before any model loads

    def run(self, program_root: str, context: RunContext = None) -> dict:
        limits = self.limits
        if context is not None:  # this run's own folder (hydra.run.dir may lie inside the program) is never evidence
            limits = dataclasses.replace(limits, exclude=(*limits.exclude, str(context.run_dir)))
        return {"index": build_index(program_root, self.ignore, self.max_file_bytes, self.window_lines, self.cache_dir,
                                     self.progress, limits=limits)}


def build_index(program_root: str, ignore: list[str], max_file_bytes: int, window_lines: int,
                cache_dir: Path | None, progress: bool = False, *, limits: Limits | None = None) -> ProgramIndex:
    root = resolve_root(program_root)
    limits = dataclasses.replace(limits, max_file_bytes=max_file_bytes) if limits else Limits(max_file_bytes)
    # not keyed by the excluded folders (each job of a multirun has its own run folder): the stamp below is taken
    # after exclusion, so an index is reused exactly when the files it would read are unchanged
    settings = (str(root), tuple(ignore), window_lines, dataclasses.replace(limits, exclude=()))
    entries, skipped = scan(root, ignore, limits)
    stamp = tuple((e.rel, e.stat.st_size, e.stat.st_mtime_ns, e.stat.st_mode) for e in entries)
    cached = resources.get("program-index", settings)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    index = _build(root, entries, skipped, limits, window_lines, cache_dir, progress)
    resources.put("program-index", settings, (stamp, index), keep=4)
    return index


def _build(root: Path, entries: list[Entry], skipped: dict[str, str], limits: Limits, window_lines: int,
           cache_dir: Path | None, progress: bool) -> ProgramIndex:
    from tqdm.auto import tqdm

    sources, skipped = read_entries(root, entries, skipped, limits)
    if not sources:
        why = f" ({len(skipped)} skipped: {', '.join(sorted(set(skipped.values()))[:6])})" if skipped else ""
        raise InputError(f"program_root '{root}' has no indexable text files{why}")
    unreadable = sorted(p for p, why in skipped.items() if why.startswith("unreadable"))
    if unreadable:  # expected skips (binary, ignored, too large) stay quiet; a file the user cannot read does not
        shown = ", ".join(f"{p} ({skipped[p]})" for p in unreadable[:5])
        log.warning("skipped %d unreadable path(s) of %s: %s%s", len(unreadable), root, shown,
                    " ..." if len(unreadable) > 5 else "")
    cache_file = cache_dir / "index" / f"{fingerprint([str(root), window_lines, FACTS_VERSION], 24)}.json" if cache_dir else None
    old = _load_cache(cache_file)
    package_prefix = root.name if (root / "__init__.py").is_file() and root.name.isidentifier() else None

    facts_by_path, fresh = {}, 0
    # a bar only on a terminal (disable=None) and only when there is parsing to wait for
    bar_off = None if progress and len(sources) - len(old) > 200 else True
    for src in tqdm(sources, desc="indexing", unit="file", disable=bar_off, leave=False):
        key = f"{src.path}\0{src.sha256}"
        facts = old.get(key)
        if facts is None:
            fresh += 1
            facts = python_facts(src.text, window_lines) if src.path.endswith(".py") else text_facts(src.text, window_lines)
        facts_by_path[src.path] = (key, facts)
    if cache_file and (fresh or len(old) != len(facts_by_path)):
        write_atomic(cache_file, json.dumps({k: f for k, f in facts_by_path.values()}))
    log.info("indexed %d files (%d parsed now, %d from cache), %d skipped", len(sources), fresh, len(sources) - fresh, len(skipped))

    files, symbols, windows = {}, [], []
    for src in sources:
        facts = facts_by_path[src.path][1]
        module = module_name(src.path, package_prefix)
        files[src.path] = FileRecord(src.path, src.sha256, len(src.data), facts["lines"], module, facts["parsed"])
        for s in facts["symbols"]:
            symbols.append(Symbol(s["name"], s["qualname"], s["kind"], src.path, module or "", s["start"], s["end"],
                                  s["signature"], s["doc"], s["is_public"], tuple(s["annotations"])))
        for start, end, anchor, kind in facts["windows"]:
            windows.append(Window(src.path, start, end, anchor, kind))
    graph = _graph(files, symbols, {p: f for p, (_, f) in facts_by_path.items()})
    program_fp = fingerprint(sorted((f.path, f.sha256) for f in files.values()))
    return ProgramIndex(root, files, symbols, windows, graph, program_fp, skipped, {s.path: s.text for s in sources})


def _load_cache(cache_file: Path | None) -> dict:
    if not cache_file or not cache_file.is_file():
        return {}
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        log.warning("index cache %s is unreadable; rebuilding it", cache_file)
        return {}
    return data if isinstance(data, dict) else {}


def _graph(files: dict[str, FileRecord], symbols: list[Symbol], facts: dict[str, dict]) -> nx.MultiDiGraph:
    g = nx.MultiDiGraph()
    modules = {rec.module: rec.path for rec in files.values() if rec.module}
    by_suffix: dict[str, str] = {}
    for mod in modules:
        parts = mod.split(".")
        for i in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), mod)
    for rec in files.values():
        g.add_node(f"file:{rec.path}", kind="file", path=rec.path)
        if rec.module:
            g.add_node(f"mod:{rec.module}", kind="module", path=rec.path)
            g.add_edge(f"file:{rec.path}", f"mod:{rec.module}", type="defines")
    by_name: dict[str, list[Symbol]] = {}
    for sym in symbols:
        g.add_node(sym.node_id, kind="symbol", path=sym.path, qualname=sym.qualname)
        owner = f"mod:{sym.module}" if sym.module else f"file:{sym.path}"
        g.add_edge(owner, sym.node_id, type="defines")
        by_name.setdefault(sym.name, []).append(sym)

    def resolve(name: str) -> str | None:
        if name in modules:
            return name
        return by_suffix.get(name)

    imported: dict[str, set[str]] = {}
    for path, rec in files.items():
        if not rec.module:
            continue
        is_package = path.endswith("__init__.py")
        targets: set[str] = set()
        for imp in facts[path]["imports"]:
            if imp["level"]:
                base = rec.module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (imp["level"] - 1)] if imp["level"] > 1 else base
                full = ".".join(base + ([imp["module"]] if imp["module"] else []))
            else:
                full = imp["module"]
            resolved_names = [resolve(f"{full}.{n}") for n in imp["names"]]
            resolved = [r for r in resolved_names if r] or [resolve(full)]
            targets.update(r for r in resolved if r and r != rec.module)
            source_module = resolve(full)
            for name, as_module in zip(imp["names"], resolved_names):
                if as_module is None and source_module:  # `from m import f`: an import edge to the symbol itself
                    for sym in by_name.get(name, []):
                        if sym.module == source_module and "." not in sym.qualname:
                            g.add_edge(f"mod:{rec.module}", sym.node_id, type="imports")
            if is_test_path(path):
                for name in imp["names"]:
                    for sym in by_name.get(name, []):
                        if resolve(full) == sym.module:
                            g.add_edge(f"file:{path}", sym.node_id, type="tests")
        imported[path] = {modules[t] for t in targets}
        for target in sorted(targets):
            g.add_edge(f"mod:{rec.module}", f"mod:{target}", type="imports")

    g.add_edges_from(_call_edges(files, symbols, by_name, facts, imported))
    return g


def _call_edges(files: dict[str, FileRecord], symbols: list[Symbol], by_name: dict[str, list[Symbol]],
                facts: dict[str, dict], imported: dict[str, set[str]]) -> list[tuple[str, str, dict]]:
    """`calls`/`tests` edges: a callee name resolves to the same file's symbols, else the imported files',
    else (only when ambiguous at most twice) every symbol of that name. In call-site order (a multigraph:
    one edge per call site); resolutions are memoised per file, as a big program repeats its call names."""
    qual_index = {(s.path, s.qualname): s.node_id for s in symbols}
    calls_type, tests_type = {"type": "calls"}, {"type": "tests"}
    edges = []
    for path, rec in files.items():
        imports_of, test_file = imported.get(path, set()), is_test_path(path)
        chosen_for: dict[str, list[str]] = {}
        source_for: dict[str, tuple[str, dict]] = {}
        for caller, callee in facts[path]["calls"]:
            chosen = chosen_for.get(callee)
            if chosen is None:
                candidates = by_name.get(callee, [])
                chosen = [s.node_id for s in ([s for s in candidates if s.path == path]
                                              or [s for s in candidates if s.path in imports_of]
                                              or (candidates if len(candidates) <= 2 else []))]
                chosen_for[callee] = chosen
            if not chosen:
                continue
            if caller not in source_for:
                test_caller = test_file or caller.split(".")[-1].startswith("test")
                source_for[caller] = (_caller_node(path, rec, caller, qual_index), tests_type if test_caller else calls_type)
            source, kind = source_for[caller]
            edges.extend((source, target, kind) for target in chosen if target != source)
    return edges


def _caller_node(path: str, rec: FileRecord, caller: str, qual_index: dict) -> str:
    while caller:
        if (path, caller) in qual_index:
            return qual_index[(path, caller)]
        caller = caller.rpartition(".")[0]
    return f"mod:{rec.module}" if rec.module else f"file:{path}"
