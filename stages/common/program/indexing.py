"""Indexing a program (docs/behaviour.md §1): walk it, read its facts, build the typed graph and the windows index.

``build_index`` is the whole path from ``program_root`` to a ``ProgramIndex``, top to bottom in this module:
the bounded walk (walk.py: a root such as ``/`` is refused with a message, pseudo filesystems, non-regular files,
our own outputs folder and run folders are never read), the facts of each file (pyfacts.py, parsed in worker
processes when there are many), the import and call edges between them (``program_graph`` below, kept as arrays in
callgraph.py) and the on-disk store (indexstore.py: one ``.npz`` per program root and window size, so an unchanged
program in a new process is loaded without parsing, a changed one re-parses only its changed files). The whole index
is also kept in-process for the next job of a multirun when no file changed (size and mtime).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path

from pipeline.engine import resources
from pipeline.engine.cache import fingerprint, source_fingerprint
from pipeline.engine.errors import InputError
from stages.common.program import indexstore
from stages.common.program.callgraph import EDGE_TYPES, CallGraph, GraphBuilder
from stages.common.program.pyfacts import available_cores, parse_many, python_facts, text_facts
from stages.common.program.walk import (
    Entry,
    Limits,
    is_test_path,
    module_name,
    read_entries,
    resolve_program,
    scan,
    scan_file,
)
from stages.common.types import FileRecord, ProgramIndex, Symbol, Window

log = logging.getLogger(__name__)


def indexing_code() -> str:
    """The source fingerprint of the code that indexes (this module and the stages.common modules it imports):
    a stored index made by other code is rebuilt, never reused (pipeline/engine/cache.py ``source_fingerprint``)."""
    return source_fingerprint(__name__)


@dataclasses.dataclass(frozen=True)
class Parsing:
    """Where Python files are parsed: ``workers`` processes (0 = one per available core, 1 = in this process)
    once at least ``parallel_min_files`` files need parsing (a pool costs ~0.1 s to start)."""

    workers: int = 0
    parallel_min_files: int = 64

    def processes(self, to_parse: int) -> int:
        workers = self.workers or available_cores()
        return min(workers, to_parse) if to_parse >= self.parallel_min_files and workers > 1 else 1


def build_index(program_root: str, ignore: list[str], max_file_bytes: int, window_lines: int,
                cache_dir: Path | None, progress: bool = False, *, limits: Limits | None = None,
                parsing: Parsing = Parsing()) -> ProgramIndex:
    """The index of ``program_root``: the one kept in this process when no walked file changed, else built by
    ``_build`` (from the on-disk store under ``cache_dir`` where it holds the same files). A program_root that
    names one file is a program of that file alone: the walk of its folder is skipped, not filtered."""
    root, only = resolve_program(program_root)
    where = root / only if only else root
    limits = dataclasses.replace(limits, max_file_bytes=max_file_bytes) if limits else Limits(max_file_bytes)
    # not keyed by the excluded folders (each job of a multirun has its own run folder): the stamp below is taken
    # after exclusion, so an index is reused exactly when the files it would read are unchanged
    settings = (str(where), tuple(ignore), window_lines, dataclasses.replace(limits, exclude=()))
    entries, skipped = scan_file(root, only) if only else scan(root, ignore, limits)
    stamp = tuple((e.rel, e.stat.st_size, e.stat.st_mtime_ns, e.stat.st_mode) for e in entries)
    cached = resources.get("program-index", settings)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    index = _build(root, entries, skipped, limits, window_lines, cache_dir, progress, parsing, only)
    resources.put("program-index", settings, (stamp, index), keep=4)
    return index


def _build(root: Path, entries: list[Entry], skipped: dict[str, str], limits: Limits, window_lines: int,
           cache_dir: Path | None, progress: bool, parsing: Parsing = Parsing(), only: str | None = None) -> ProgramIndex:
    started = time.perf_counter()
    where = root / only if only else root
    sources, skipped = read_entries(root, entries, skipped, limits)
    if not any(src.data for src in sources):  # none, or only empty files: no window to show, no line to cite
        empty = f"{len(sources)} empty: {_first(s.path for s in sources)}" if sources else ""
        left = f"{len(skipped)} skipped: {', '.join(sorted(set(skipped.values()))[:6])}" if skipped else ""
        why = "; ".join(part for part in (empty, left) if part)
        raise InputError(f"program_root '{where}' has no indexable text files{f' ({why})' if why else ''}")
    warn_skipped(root, skipped)
    # one file per (root, window size); the code that made it is recorded inside: an edit rebuilds and overwrites it
    cache_file = cache_dir / "index" / f"{fingerprint([str(where), window_lines], 24)}.npz" if cache_dir else None
    code = indexing_code()
    stored = indexstore.load(cache_file, window_lines, code)
    package_prefix = root.name if not only and (root / "__init__.py").is_file() and root.name.isidentifier() else None
    modules = [module_name(src.path, package_prefix) for src in sources]
    texts = {s.path: s.text for s in sources}
    # what the index was made from: the program's files and the indexing code (artifacts are keyed by it)
    program_fp = fingerprint([sorted((s.path, s.sha256) for s in sources), code])

    if stored is not None and stored.keys() == [(s.path, s.sha256) for s in sources] and stored.modules == [m or "" for m in modules]:
        try:  # unchanged: everything comes from the stored arrays
            index = ProgramIndex(root, stored.records(modules), stored.symbols(modules), stored.windows(),
                                 stored.graph(), program_fp, skipped, texts, only)
            log.info("indexed %d files (all from the cache, %.2f s), %d skipped", len(sources),
                     time.perf_counter() - started, len(skipped))
            return index
        except (ValueError, IndexError, KeyError) as err:
            log.warning("index cache %s does not hold together (%s); rebuilding it", cache_file, err)
            stored = None

    known = {key: i for i, key in enumerate(stored.keys())} if stored is not None else {}
    facts: list[dict | None] = []
    to_parse = []
    for n, src in enumerate(sources):
        at = known.get((src.path, src.sha256))
        facts.append(stored.facts(at) if stored is not None and at is not None else None)
        if at is None:
            if src.path.endswith(".py"):
                to_parse.append(n)
            else:
                facts[n] = text_facts(src.text, window_lines)
    fresh = sum(1 for src in sources if (src.path, src.sha256) not in known)
    processes = parsing.processes(len(to_parse))
    if processes > 1:
        for n, item in zip(to_parse, parse_many([sources[n].text for n in to_parse], window_lines, processes)):
            facts[n] = item
    else:
        from tqdm.auto import tqdm

        # a bar only on a terminal (disable=None) and only when there is parsing to wait for
        bar_off = None if progress and len(to_parse) > 200 else True
        for n in tqdm(to_parse, desc="indexing", unit="file", disable=bar_off, leave=False):
            facts[n] = python_facts(sources[n].text, window_lines)

    done = [f for f in facts if f is not None]
    assert len(done) == len(sources)  # every file's facts: from the store, of its text, or parsed now
    files, symbols, windows = {}, [], []
    for src, module, f in zip(sources, modules, done):
        files[src.path] = FileRecord(src.path, src.sha256, len(src.data), f["lines"], module, f["parsed"])
        for s in f["symbols"]:
            symbols.append(Symbol(s["name"], s["qualname"], s["kind"], src.path, module or "", s["start"], s["end"],
                                  s["signature"], s["doc"], s["is_public"], tuple(s["annotations"]), tuple(s["reads"])))
        for start, end, anchor, kind in f["windows"]:
            windows.append(Window(src.path, start, end, anchor, kind))
    graph = program_graph(files, symbols, {src.path: f for src, f in zip(sources, done)})
    if cache_file and (fresh or stored is None or len(known) != len(sources)):
        indexstore.save(cache_file, window_lines, list(files.values()), done, graph, code=code)
    log.info("indexed %d files (%d parsed now in %d process(es), %d from cache, %.2f s), %d skipped", len(sources), fresh,
             processes, len(sources) - fresh, time.perf_counter() - started, len(skipped))
    return ProgramIndex(root, files, symbols, windows, graph, program_fp, skipped, texts, only)


# folders left out on purpose (our outputs, run folders, a link to a folder that is indexed where it lies): no warning
_MEANT = ("the pipeline's own outputs folder", "a run folder", "symlinked folder")


def _first(paths, shown: int = 5) -> str:
    paths = list(paths)
    return ", ".join(paths[:shown]) + (" ..." if len(paths) > shown else "")


def _kind(reason: str) -> str:
    """The kind of a skip reason, without its numbers (`larger than max_file_bytes (2000 > 1000)` -> its first part)."""
    return "a line over index.max_line_chars" if reason.startswith("a line of ") else reason.split(" (", 1)[0]


def warn_skipped(root: Path, skipped: dict[str, str]) -> None:
    """One warning for the files and folders the index leaves out (binary, too large, unreadable, ...): how many, of
    which kinds, the first few with their reasons."""
    left = {p: why for p, why in sorted(skipped.items()) if not why.startswith(_MEANT)}
    if not left:
        return
    kinds = Counter(_kind(why) for why in left.values())
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda item: (-item[1], item[0])))
    log.warning("skipped %d path(s) of %s (%s): %s", len(left), root, counts,
                _first(f"{p} ({why})" for p, why in left.items()))


def program_graph(files: dict[str, FileRecord], symbols: list[Symbol], facts: dict[str, dict]) -> CallGraph:
    """Nodes file:/mod:/sym: and their edges: `defines`, `imports` (relative imports resolved, `from m import f` to
    the symbol itself), `tests` (a test file importing a name) and the call edges of ``_call_edges``."""
    g = GraphBuilder()
    modules = {rec.module: rec.path for rec in files.values() if rec.module}
    by_suffix: dict[str, str] = {}
    for mod in modules:
        parts = mod.split(".")
        for i in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), mod)
    for rec in files.values():
        g.node(f"file:{rec.path}", "file", rec.path)
        if rec.module:
            g.node(f"mod:{rec.module}", "module", rec.path)
            g.edge(f"file:{rec.path}", f"mod:{rec.module}", "defines")
    by_name: dict[str, list[Symbol]] = {}
    for sym in symbols:
        g.node(sym.node_id, "symbol", sym.path)
        owner = f"mod:{sym.module}" if sym.module else f"file:{sym.path}"
        g.edge(owner, sym.node_id, "defines")
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
            resolved: list[str | None] = [r for r in resolved_names if r] or [resolve(full)]
            targets.update(r for r in resolved if r and r != rec.module)
            source_module = resolve(full)
            for name, as_module in zip(imp["names"], resolved_names):
                if as_module is None and source_module:  # `from m import f`: an import edge to the symbol itself
                    for sym in by_name.get(name, []):
                        if sym.module == source_module and "." not in sym.qualname:
                            g.edge(f"mod:{rec.module}", sym.node_id, "imports")
            if is_test_path(path):
                for name in imp["names"]:
                    for sym in by_name.get(name, []):
                        if resolve(full) == sym.module:
                            g.edge(f"file:{path}", sym.node_id, "tests")
        imported[path] = {modules[t] for t in targets}
        for target in sorted(targets):
            g.edge(f"mod:{rec.module}", f"mod:{target}", "imports")

    callable_by_name = {name: [s for s in found if s.is_definition] for name, found in by_name.items()}
    _call_edges(g, files, symbols, callable_by_name, facts, imported)
    return g.build()


def _call_edges(g: GraphBuilder, files: dict[str, FileRecord], symbols: list[Symbol], by_name: dict[str, list[Symbol]],
                facts: dict[str, dict], imported: dict[str, set[str]]) -> None:
    """`calls`/`tests` edges: a callee name resolves to the same file's symbols, else the imported files',
    else (only when ambiguous at most twice) every symbol of that name. In call-site order (a multigraph:
    one edge per call site); resolutions are memoised per file, as a big program repeats its call names."""
    qual_index = {(s.path, s.qualname): s.node_id for s in symbols}
    ids = g.ids
    calls_type, tests_type = EDGE_TYPES.index("calls"), EDGE_TYPES.index("tests")
    src, dst, types = g.src, g.dst, g.types
    for path, rec in files.items():
        imports_of, test_file = imported.get(path, set()), is_test_path(path)
        chosen_for: dict[str, list[int]] = {}
        source_for: dict[str, tuple[int, int]] = {}
        for caller, callee in facts[path]["calls"]:
            chosen = chosen_for.get(callee)
            if chosen is None:
                candidates = by_name.get(callee, [])
                chosen = [ids[s.node_id] for s in ([s for s in candidates if s.path == path]
                                                   or [s for s in candidates if s.path in imports_of]
                                                   or (candidates if len(candidates) <= 2 else []))]
                chosen_for[callee] = chosen
            if not chosen:
                continue
            if caller not in source_for:
                test_caller = test_file or caller.split(".")[-1].startswith("test")
                source_for[caller] = (ids[_caller_node(path, rec, caller, qual_index)], tests_type if test_caller else calls_type)
            source, kind = source_for[caller]
            for target in chosen:
                if target != source:
                    src.append(source)
                    dst.append(target)
                    types.append(kind)


def _caller_node(path: str, rec: FileRecord, caller: str, qual_index: dict) -> str:
    while caller:
        if (path, caller) in qual_index:
            return qual_index[(path, caller)]
        caller = caller.rpartition(".")[0]
    return f"mod:{rec.module}" if rec.module else f"file:{path}"
