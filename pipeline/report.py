"""`python -m pipeline.report <run folder | multirun folder>`: one self-contained `report.html`.

A run's report shows the question and the answer (each citation a link to its evidence window, the code
highlighted with line numbers; invalid citations and unknown identifiers marked), the packed windows and the
selected files, the graph as it ran (nodes by status, a timing waterfall, peak RSS per node), the adapter (rank,
gsub, alpha, delta norms, the build's perplexities) and any other result file. A multirun's report is the
summary table (sortable), a plot per key metric and a link to each job's report.

This is a framework tool: it reads the files of a run folder (their names and the telemetry keys that get a
section of their own come from `conf/report/html.yaml`; every other key is shown in a generic table) and
the program's own files (for the code of the windows, never outside the program root). It imports no stage.
Every run writes one at its end (`report=html`, the default; `report=none` writes none).
"""
from __future__ import annotations

import argparse
import fnmatch
import math
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.engine.cache import write_atomic
from pipeline.htmlkit import SORT_JS, bar_chart, dag_svg, esc, fmt, heatmap, highlight, key_values, page, table
from pipeline.runfolder import (
    CONFIG_ERRORS,
    ReportError,
    RunFolder,
    artifact_manifests,
    is_run_folder,
    is_sweep_folder,
    read_lines,
    salvage_object,
    settings_of,
    source_hashes,
)

__all__ = ["ReportError", "RunFolder", "SweepReport", "main", "salvage_object", "write_report", "write_run_report",
           "write_sweep_report"]

# a citation as SPEC §5 writes it: path:START[-END]
CITATION = re.compile(r"([\w./-]+\.\w+):(\d+)(?:-(\d+))?")


def _flatten(data: Any, prefix: str = "", depth: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1:
            out.update(_flatten(value, f"{name}.", depth - 1))
        else:
            out[name] = value
    return out


def _pick(flat: dict[str, Any], patterns: list[str]) -> list[tuple[str, Any]]:
    picked = []
    for pattern in patterns:
        picked += [(k, v) for k, v in flat.items() if fnmatch.fnmatchcase(k, pattern) and (k, v) not in picked]
    return picked


def _spans(run: RunFolder) -> list[dict]:
    """The packed windows, each with its selection score when the run recorded one (`window_scores`)."""
    windows = [w for w in (run.key("windows") or []) if isinstance(w, dict) and {"path", "start", "end"} <= set(w)]
    scores = run.key("window_scores")
    if isinstance(scores, list) and len(scores) == len(windows):
        windows = [{**w, "score": s} if isinstance(s, (int, float)) else w for w, s in zip(windows, scores)]
    return windows


def _window_for(windows: list[dict], path: str, start: int, end: int) -> int | None:
    for i, w in enumerate(windows):
        if w["path"] == path and w["start"] <= end and start <= w["end"]:
            return i
    return None


def _citation_records(run: RunFolder) -> dict[tuple[str, int, int], dict]:
    records: dict[tuple[str, int, int], dict] = {}
    for c in run.key("citations") or []:
        if isinstance(c, dict) and {"path", "start"} <= set(c):
            records.setdefault((str(c["path"]), int(c["start"]), int(c.get("end") or c["start"])), c)
    return records


def render_answer(run: RunFolder) -> str:
    """The answer with each citation a link to its window and unknown identifiers marked; all text escaped."""
    text = run.key("answer")
    if not isinstance(text, str):
        return "<p class=\"muted\">(no answer recorded)</p>"
    windows, records = _spans(run), _citation_records(run)
    marks: list[tuple[int, int, str]] = []
    for match in CITATION.finditer(text):
        path, start = match.group(1), int(match.group(2))
        end = int(match.group(3) or start)
        record = records.get((path, start, end))
        if record is None:
            continue
        marked_invalid = text[max(0, match.start() - 17):match.start()].endswith("not in evidence: ")
        index = _window_for(windows, path, start, end)
        label = esc(match.group(0))
        if record.get("valid") and not marked_invalid and index is not None:
            source = esc(record.get("source", "model"))
            marks.append((match.start(), match.end(), f'<a class="cite {source}" href="#w{index}" '
                                                      f'title="{source} citation, window {index + 1}">{label}</a>'))
        else:
            why = record.get("reason") or ("removed: not in the evidence" if record.get("removed") else "invalid")
            marks.append((match.start(), match.end(), f'<span class="invalid" title="{esc(why)}">{label}</span>'))
    for word in sorted({str(w) for w in run.key("unknown_identifiers") or [] if str(w)}, key=len, reverse=True):
        for match in re.finditer(rf"(?<![\w.]){re.escape(word)}(?![\w])", text):
            if not any(a < match.end() and match.start() < b for a, b, _ in marks):
                marks.append((match.start(), match.end(), f'<mark class="unknown" title="not in the program nor '
                                                          f'the question">{esc(match.group(0))}</mark>'))
    out, pos = [], 0
    for start, end, markup in sorted(marks):
        out += [esc(text[pos:start]), markup]
        pos = end
    out.append(esc(text[pos:]))
    return f'<div class="answer" id="answer">{"".join(out)}</div>'


def section_question(run: RunFolder) -> str:
    tele = run.telemetry
    if not tele:
        return ""
    parts = ["<h2>Question and answer</h2>",
             f'<div class="question" id="question">{esc(run.key("question", ""))}</div>']
    grounded, reported = run.grounded(), isinstance(run.key("grounded"), bool)
    why = ("the answer passed its checks with at least one valid citation" if reported else
           "at least one citation is valid") if grounded else \
        ("the checks could not ground this answer in the program" if reported else
         "no citation is valid: nothing in this answer is backed by the evidence below")
    parts.append(f'<p><span class="badge {"ok" if grounded else "warn"}" id="grounded">'
                 f'{"grounded" if grounded else "not grounded"}</span> {esc(why)}</p>')
    parts.append(render_answer(run))
    parts.append('<p class="small muted">key: <a class="cite model">model citation</a> '
                 '<a class="cite attributed">attributed (added by citation repair)</a> '
                 '<span class="invalid">invalid</span> <mark class="unknown">unknown identifier</mark></p>')
    flat = _flatten(tele)
    head = [(k, v) for k, v in _pick(flat, run.settings["keys"].get("headline") or []) if v is not None]
    if head:
        parts.append('<p class="facts">' + " ".join(f'<span class="fact"><span class="muted">{esc(k)}</span> '
                                                   f"<b>{esc(fmt(v))}</b></span>" for k, v in head) + "</p>")
    unknown = run.key("unknown_identifiers")
    if unknown:
        parts.append("<p>Unknown identifiers (in neither the program nor the question): "
                     + ", ".join(f'<mark class="unknown">{esc(u)}</mark>' for u in unknown) + "</p>")
    citations = run.key("citations") or []
    if citations:
        windows = _spans(run)
        rows = []
        for c in citations:
            if not isinstance(c, dict):
                continue
            start, end = c.get("start"), c.get("end") or c.get("start")
            index = _window_for(windows, str(c.get("path")), int(start or 0), int(end or 0)) if start else None
            where = f'{esc(c.get("path"))}:{esc(start)}-{esc(end)}'
            link = f'<a class="cite" href="#w{index}">{where}</a>' if index is not None and c.get("valid") else \
                f'<span class="{"" if c.get("valid") else "invalid"}">{where}</span>'
            rows.append([link, esc(c.get("source", "")), "yes" if c.get("valid") else "<b>no</b>",
                         "yes" if c.get("removed") else "", esc(c.get("reason", ""))])
        parts.append("<h3>Citations</h3>" + table(["citation", "source", "valid", "removed", "why"], rows, raw=True))
    return "".join(parts)


def section_evidence(run: RunFolder) -> str:
    windows = _spans(run)
    files = run.key("files") or []
    if not windows and not files:
        return ""
    cited: dict[str, list[tuple[int, int]]] = {}
    for (path, start, end), record in _citation_records(run).items():
        if record.get("valid"):
            cited.setdefault(path, []).append((start, end))
    root = run.settings.get("program_root")
    parts = [f"<h2>Evidence: {len(windows)} packed windows</h2>",
             f'<p class="small muted">code read from {esc(root or "(unknown program root)")} when this report '
             f"was written</p>"]
    limit = int(run.settings.get("max_code_lines") or 400)
    hashes = source_hashes(run)
    for i, w in enumerate(windows):
        path, start, end = str(w["path"]), int(w["start"]), int(w["end"])
        spans = [(a, b) for a, b in cited.get(path, []) if a <= end and start <= b]
        marked = {n for a, b in spans for n in range(max(a, start), min(b, end) + 1)}
        extra = " ".join(f"{k} {fmt(v)}" for k, v in w.items() if k not in ("path", "start", "end"))
        badge = f' <span class="badge ok">cited ×{len(spans)}</span>' if spans else ""
        lines, why = read_lines(root, path, start, min(end, start + limit - 1), hashes.get(path))
        code = highlight(path, lines, start, marked) if lines is not None else \
            f'<p class="muted" style="padding:6px 10px">code not shown: {esc(why)}</p>'
        if lines is not None and why:
            code = f'<p class="banner warn small changed">{esc(why)}</p>{code}'
        if lines is not None and end - start + 1 > limit:
            code += f'<p class="small muted" style="padding:0 10px">… {end - start + 1 - limit} more lines</p>'
        parts.append(f'<div class="window" id="w{i}" data-path="{esc(path)}"><div class="head mono">'
                     f'{i + 1}. [ctx] path: {esc(path)}:{start}-{end}{badge} '
                     f'<span class="muted small">{esc(extra)}</span></div>{code}</div>')
    scores = run.key("file_scores") or {}
    if files:
        rows = [[i + 1, f, scores.get(f) if isinstance(scores, dict) else None, sum(w["path"] == f for w in windows)]
                for i, f in enumerate(files)]
        parts.append("<h3>Files selected</h3>" + table(["#", "file", "score", "windows packed"], rows))
        modules = run.key("modules") or []
        if modules:
            parts.append(f'<p class="small">modules: {esc(", ".join(map(str, modules)))}</p>')
    return "".join(parts)


def _graph_edges(config: DictConfig | None) -> list[tuple[str, str]]:
    """Edges of the graph the run declared (`in`, `when`, `after` of each node), read from its config."""
    nodes = OmegaConf.select(config, "pipeline.nodes") if config is not None else None
    if not isinstance(nodes, DictConfig):
        return []
    edges = []
    for name, spec in OmegaConf.to_container(nodes, resolve=False).items():
        spec = spec if isinstance(spec, dict) else {}
        refs = [str(ref) for ref in (spec.get("in") or {}).values()]
        refs += [f"{before}." for before in spec.get("after") or []]
        if spec.get("when"):
            refs.append(str(spec["when"]).removeprefix("not ").strip())
        edges += [(ref.split(".", 1)[0], str(name)) for ref in refs if ref.split(".", 1)[0] != "inputs"]
    return edges


def _phases(node: dict) -> dict[str, float]:
    """Sub-timings of a node when the trace has them: `phases: {name: s}` or `<name>_seconds` keys."""
    found: dict[str, float] = {}
    for source in [node, *[v for v in (node.get("outputs") or {}).values() if isinstance(v, dict)]]:
        phases = source.get("phases")
        if isinstance(phases, dict):
            found.update({str(k): float(v) for k, v in phases.items() if isinstance(v, (int, float))})
        for key, value in source.items():
            if key.endswith("_seconds") and isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key.removesuffix("_seconds")] = float(value)
    return found


def section_graph(run: RunFolder) -> str:
    nodes = [n for n in run.trace.get("nodes") or [] if isinstance(n, dict) and "node" in n]
    if not nodes:
        return ""
    names = [str(n["node"]) for n in nodes]
    status = {str(n["node"]): str(n.get("status", "not run")) for n in nodes}
    tips = {str(n["node"]): f"{n['node']}: {n.get('status')} {fmt(n.get('seconds'))} s {n.get('reason') or ''}"
            for n in nodes}
    parts = [f"<h2>Graph as it ran: {esc(run.trace.get('pipeline', ''))}</h2>",
             '<p class="small"><span class="badge ok">ok</span> <span class="badge skipped">skipped</span> '
             '<span class="badge failed">failed</span></p>',
             '<div class="side"><div class="dag">' + dag_svg(names, _graph_edges(run.config), status, tips) + "</div>"]
    total = sum(float(n.get("seconds") or 0.0) for n in nodes) or 1.0
    rows, clock = [], 0.0
    palette = ["#f2a541", "#5b8def", "#7bc47f", "#c77dff"]
    for n in nodes:
        seconds = float(n.get("seconds") or 0.0)
        left, width = clock / total * 100, max(seconds / total * 100, 0.25)
        phases = _phases(n)
        bars = f'<span style="left:{left:.2f}%;width:{width:.2f}%;background:#8aa6c8"></span>'
        if phases:
            offset = left
            bars = ""
            for j, (phase, s) in enumerate(phases.items()):
                w = max(s / total * 100, 0.25)
                bars += (f'<span style="left:{offset:.2f}%;width:{w:.2f}%;background:{palette[j % 4]}" '
                         f'title="{esc(phase)} {fmt(s)} s"></span>')
                offset += w
        clock += seconds
        state = str(n.get("status", ""))
        label = " ".join(f"{k} {fmt(v)} s" for k, v in phases.items())
        rows.append([f'<span class="badge {esc(state)}">{esc(n["node"])}</span>', esc(state),
                     esc(fmt(round(seconds, 3))), f'<div class="bar">{bars}</div>'
                     + (f'<div class="small muted">{esc(label)}</div>' if label else ""),
                     esc(fmt(n.get("peak_rss_mb"))), esc(n.get("reason") or ""),
                     f'<span title="{esc(n.get("stage", ""))}">{esc(str(n.get("stage", "")).rpartition(".")[2])}</span>'])
    parts.append(f'<div class="waterfall"><h3>Timing waterfall ({fmt(total)} s in nodes)</h3>'

                 + table(["node", "status", "seconds", "when", "peak RSS (MiB)", "reason", "stage"], rows, raw=True)
                 + "</div></div>")
    return "".join(parts)


def _norm_plot(norms: Any, title: str) -> str:
    if not isinstance(norms, dict) or not norms:
        return ""
    if all(isinstance(v, (int, float)) for v in norms.values()):
        return bar_chart(list(norms), [float(v) for v in norms.values()], title)
    per_layer = {k: v for k, v in norms.items() if isinstance(v, list)}
    if per_layer:
        width = max(len(v) for v in per_layer.values())
        rows = [[float(x) if isinstance(x, (int, float)) else math.nan for x in v] + [math.nan] * (width - len(v))
                for v in per_layer.values()]
        return heatmap(list(per_layer), width, rows, title)
    return ""


def section_adapter(run: RunFolder) -> str:
    flat = _flatten(run.telemetry)
    facts = [(k, v) for k, v in _pick(flat, run.settings["keys"].get("adapter") or []) if v is not None]
    plots = [_norm_plot(run.key("delta_norms"), "delta norm ‖Δ‖F per target (mean over layers)")]
    retry = run.key("retry_mix")
    if isinstance(retry, dict):
        plots.append(_norm_plot(retry.get(run.settings["keys"].get("delta_norms", "delta_norms")),
                                "delta norms of the stage-2 retry mix"))
    manifests = artifact_manifests(run)
    if not facts and not any(plots) and not manifests:
        return ""
    parts = ["<h2>Adapter</h2>", f'<div class="grid"><div>{key_values(facts)}</div>{"".join(plots)}</div>']
    for path, manifest in manifests:
        picked = _pick(_flatten(manifest), run.settings.get("manifest_keys") or [])
        parts.append(f'<h3>Build artifacts <span class="mono small">{esc(path)}</span></h3>'
                     + key_values((k, v) for k, v in picked if not isinstance(v, (dict, list)) or len(v) <= 12))
    return "".join(parts)


def _matrix(data: dict) -> str:
    """A mapping of mappings (eval metrics per system) as one table with a column per system."""
    systems = [k for k, v in data.items() if isinstance(v, dict)]
    keys = list(dict.fromkeys(k for s in systems for k in data[s]))
    return table(["metric", *systems], [[k, *[data[s].get(k) for s in systems]] for k in keys])


def section_results(run: RunFolder) -> str:
    parts = []
    for role in ("eval", "perplexity"):
        data = run.data.get(role)
        if not data:
            continue
        name = run.settings["files"].get(role, role)
        metrics = data.get("metrics")
        body = _matrix(metrics) if isinstance(metrics, dict) and any(isinstance(v, dict) for v in metrics.values()) \
            else key_values((k, v) for k, v in _flatten(data).items() if not isinstance(v, (dict, list)))
        parts.append(f"<h2>{esc(name)}</h2>{body}")
    return "".join(parts)


def section_everything(run: RunFolder) -> str:
    shown = {v for k, v in run.settings["keys"].items() if isinstance(v, str)}
    rest = [(k, v) for k, v in _flatten(run.telemetry).items()
            if k.split(".")[0] not in shown and not (isinstance(v, list) and len(v) > 20)]
    if not rest:
        return ""
    name = run.settings["files"].get("telemetry", "telemetry")
    return f"<h2>All of {esc(name)}</h2><details><summary>{len(rest)} more entries</summary>{key_values(rest)}</details>"


def render_run(run: RunFolder) -> str:
    tele, trace = run.telemetry, run.trace
    failure = trace.get("failure") or (tele.get(run.settings["keys"].get("error", "error")) if tele else None)
    status = "failed" if failure else ("ok" if trace or tele else "unknown")
    title = f"{trace.get('pipeline') or 'run'} report"
    parts = [f'<h1>{esc(title)} <span class="badge {status}" id="status">{status}</span></h1>',
             f'<p class="mono small muted">{esc(run.folder)}</p>']
    overrides = trace.get("overrides") or tele.get("overrides") or []
    if overrides:
        parts.append("<p class=\"small\">overrides: " + " ".join(f"<code>{esc(o)}</code>" for o in overrides) + "</p>")
    if failure:
        failed = [n for n in trace.get("nodes") or [] if isinstance(n, dict) and n.get("status") == "failed"]
        node = f" at node <b>{esc(failed[0]['node'])}</b>" if failed else ""
        parts.append(f'<div class="banner failed" id="failure">Failed{node}: {esc(failure)}</div>')
    results = [n for r, n in run.settings["files"].items() if r != "trace"]
    if not any(r in run.data for r in run.settings["files"] if r != "trace"):
        missing = [n for n in results if run.problems.get(n) == "missing"]
        if missing:
            parts.append(f'<div class="banner warn" id="missing">missing: {esc(", ".join(missing))} (this graph '
                         "writes none of them, or the run stopped before it did): no question, answer or result to "
                         "show</div>")
    for name, problem in run.problems.items():
        if problem != "missing" or name == run.settings["files"].get("trace"):
            parts.append(f'<div class="banner warn">{esc(name)}: {esc(problem)}</div>')
    parts += [section_question(run), section_evidence(run), section_graph(run), section_adapter(run),
              section_results(run), section_everything(run)]
    return page(title, "".join(parts))


def write_run_report(folder: str | Path, settings: dict | None = None) -> Path:
    run = RunFolder.load(Path(folder), settings)
    out = run.folder / str(run.settings.get("filename") or "report.html")
    write_atomic(out, render_run(run))
    return out


# ----------------------------------------------------------------------------------------------- a sweep


def render_sweep(folder: Path, settings: dict) -> str:
    from pipeline.summary import KEY_COLUMNS, find_jobs, read_job, shown_columns, split_overrides

    jobs = find_jobs(folder)
    rows = [read_job(job) for job in jobs]
    varying, fixed = split_overrides(rows)
    metrics = [c for c in shown_columns(rows, KEY_COLUMNS[0]) if c != "status"]
    name = str(settings.get("filename") or "report.html")
    links = []
    for job in jobs:
        target = job / name
        rel = target.relative_to(folder).as_posix()
        links.append(f'<a href="{esc(rel)}">{esc(job.relative_to(folder).as_posix())}</a>' if target.is_file()
                     else esc(job.name))
    header = ["job", *varying, "status", *metrics]
    body = [[link, *[esc(row.get(k, "")) for k in varying],
             f'<span class="badge {esc(row.get("status", ""))}">{esc(row.get("status", "?"))}</span>',
             *[_num_cell(row.get(m)) for m in metrics]] for link, row in zip(links, rows)]
    parts = [f"<h1>Sweep report: {len(rows)} jobs</h1>", f'<p class="mono small muted">{esc(folder)}</p>']
    if fixed:
        parts.append("<p class=\"small\">all jobs: " + " ".join(f"<code>{esc(k)}={esc(v)}</code>"
                                                              for k, v in fixed.items()) + "</p>")
    failed = [row["job"] for row in rows if row.get("status") == "failed"]
    if failed:
        parts.append(f'<div class="banner failed">failed jobs: {esc(", ".join(failed))}</div>')
    parts.append('<h2>Jobs (click a column to sort)</h2><div style="overflow-x:auto">'
                 + _raw_table(header, body) + "</div>")
    labels = [", ".join(str(row.get(k, "")) for k in varying) or f"job {row['job']}" for row in rows]
    numeric = [m for m in metrics if any(isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool)
                                         for r in rows)]
    plots = [bar_chart(labels, [r.get(m) if isinstance(r.get(m), (int, float)) else None for r in rows], m)
             for m in numeric[:int(settings.get("sweep_columns") or 8)]]
    parts.append(f'<h2>Metrics per job</h2><div class="grid">{"".join(plots)}</div>')
    return page(f"sweep report ({len(rows)} jobs)", "".join(parts), SORT_JS)


def _num_cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num" data-v="{esc(value)}">{esc(fmt(value))}</td>'
    return f"<td>{esc(fmt(value))}</td>"


def _raw_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="sortable" id="jobs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def write_sweep_report(folder: str | Path, settings: dict | None = None) -> Path:
    """The sweep's report.html; a job without a report gets one first (so every row links to one)."""
    from pipeline.summary import SummaryError, find_jobs

    folder = Path(folder)
    try:
        jobs = find_jobs(folder)
    except SummaryError as err:
        raise ReportError(str(err)) from err
    for job in jobs:
        job_settings = settings_of(_load_config(job))
        if not (job / str(job_settings.get("filename") or "report.html")).is_file() and is_run_folder(job, job_settings):
            write_run_report(job, job_settings)
    settings = settings or settings_of(_load_config(jobs[0]))
    out = folder / str(settings.get("filename") or "report.html")
    write_atomic(out, render_sweep(folder, settings))
    return out


def _load_config(folder: Path) -> DictConfig | None:
    try:
        return OmegaConf.load(folder / ".hydra" / "config.yaml")
    except CONFIG_ERRORS:  # no or a broken config: the defaults are used
        return None


def write_report(folder: str | Path) -> Path:
    """A run folder's or a multirun folder's report.html, whichever ``folder`` is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"'{folder}' is not a folder (pass a run or multirun folder)")
    if is_sweep_folder(folder) and not (folder / ".hydra").is_dir():
        return write_sweep_report(folder)
    return write_run_report(folder)


try:  # Hydra calls this after a multirun (conf/config.yaml: hydra.callbacks.report)
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core < 1.1
    Callback = object


class SweepReport(Callback):
    """After a multirun: print where its jobs went and write the sweep's report.html (unless report=none)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        print(f"sweep folder: {folder}", file=sys.stderr)
        if str(OmegaConf.select(config, "report.format", default="none")) != "html":
            return
        try:
            print(f"report: {write_sweep_report(folder)}", file=sys.stderr)
        except (ReportError, OSError) as err:
            print(f"warning: no sweep report: {str(err).splitlines()[0]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a run folder (outputs/runs/...) or a multirun folder")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.folder)
    except (ReportError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
