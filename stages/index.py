"""Stage `index` (SPEC §1): walk the program, parse Python with ast, build the typed graph and windows index.

Per-file facts are cached on disk by ``(path, sha256)`` in one JSON file per program root, and the whole
index is kept in-process for the next job of a multirun when no file changed (size and mtime).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import networkx as nx

from pipeline import resources
from pipeline.cache import fingerprint, write_atomic
from pipeline.errors import InputError
from pipeline.stage import Range, Stage
from stages.common.program import DEFAULT_IGNORE, ignored, is_test_path, module_name, resolve_root, walk
from stages.common.pyfacts import python_facts, text_facts
from stages.common.types import FileRecord, ProgramIndex, Symbol, Window

log = logging.getLogger(__name__)
FACTS_VERSION = 2


class IndexProgram(Stage):
    outputs = {"index": ProgramIndex}

    def __init__(
        self,
        ignore: list[str] = list(DEFAULT_IGNORE),
        max_file_bytes: Annotated[int, Range(ge=1)] = 1_000_000,
        window_lines: Annotated[int, Range(ge=1)] = 80,
        cache_dir: str | None = None,
        progress: bool = True,
    ):
        self.progress = progress
        self.ignore = list(ignore)
        self.max_file_bytes = max_file_bytes
        self.window_lines = window_lines
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def run(self, program_root: str) -> dict:
        return {"index": build_index(program_root, self.ignore, self.max_file_bytes, self.window_lines, self.cache_dir,
                                     self.progress)}


def build_index(program_root: str, ignore: list[str], max_file_bytes: int, window_lines: int,
                cache_dir: Path | None, progress: bool = False) -> ProgramIndex:
    root = resolve_root(program_root)
    settings = (str(root), tuple(ignore), max_file_bytes, window_lines)
    stamp = _stamp(root, ignore)
    cached = resources.get("program-index", settings)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    index = _build(root, ignore, max_file_bytes, window_lines, cache_dir, progress)
    resources.put("program-index", settings, (stamp, index), keep=4)
    return index


def _stamp(root: Path, ignore: list[str]) -> tuple:
    """(path, size, mtime) of every entry: cheap evidence that nothing changed since the last job."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not ignored(d, os.path.relpath(os.path.join(dirpath, d), root), ignore))
        files = [f for f in filenames if not ignored(f, os.path.relpath(os.path.join(dirpath, f), root), ignore)]
        for name in sorted(files) + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            entries.append((dirpath, name, st.st_size, st.st_mtime_ns, st.st_mode))
    return tuple(entries)


def _build(root: Path, ignore: list[str], max_file_bytes: int, window_lines: int, cache_dir: Path | None,
           progress: bool) -> ProgramIndex:
    from tqdm.auto import tqdm

    sources, skipped = walk(root, ignore, max_file_bytes)
    if not sources:
        why = f" ({len(skipped)} skipped: {', '.join(sorted(set(skipped.values())))})" if skipped else ""
        raise InputError(f"program_root '{root}' has no indexable text files{why}")
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
