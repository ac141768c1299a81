"""A run's report.html: a status banner, the answer and its evidence (pipeline/report/answer.py), the graph as it ran
(nodes by status, a timing waterfall, peak RSS per node), the adapter (rank, gsub, alpha, delta norms, the build's
perplexities), the result files and every other telemetry key."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.engine.cache import write_atomic
from pipeline.htmlkit import bar_chart, dag_svg, esc, fmt, heatmap, key_values, page, table
from pipeline.report.answer import flatten, pick, section_evidence, section_question
from pipeline.runfolder import RunFolder, artifact_manifests

# telemetry keys drawn in a section of their own, left out of the generic table
DRAWN = ("status", "error", "prompt", "answer", "citations", "windows_packed", "files_selected", "file_scores",
         "window_scores", "modules_selected", "unknown_identifiers", "grounded", "not_grounded", "claims", "delta_norms",
         "fallback_mix")


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


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _phases(node: dict, decoding: Any = None) -> dict[str, float]:
    """Sub-timings of a node when the trace has them: `phases: {name: s}` or `<name>_seconds` keys. A draft's
    summary records `seconds` and `prefill_seconds` only: the rest of its seconds is its decode phase. A `decode`
    node without them takes telemetry's `decoding` (``decoding``) when that counts one attempt only."""
    found: dict[str, float] = {}
    for source in [node, *[v for v in (node.get("outputs") or {}).values() if isinstance(v, dict)]]:
        phases = source.get("phases")
        if isinstance(phases, dict):
            found.update({str(k): float(v) for k, v in phases.items() if _number(v) is not None})
        for key, value in source.items():
            if key.endswith("_seconds") and _number(value) is not None:
                found[key.removesuffix("_seconds")] = float(value)
        seconds, prefill = _number(source.get("seconds")), _number(source.get("prefill_seconds"))
        if source is not node and seconds is not None and prefill is not None and "decode" not in found:
            found["decode"] = max(seconds - prefill, 0.0)
    if not found and node.get("node") == "decode" and isinstance(decoding, dict) and decoding.get("attempts") in (1, None):
        found = {k: v for k in ("prefill", "decode") if (v := _number(decoding.get(f"{k}_seconds"))) is not None}
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
        phases = _phases(n, run.telemetry.get("decoding"))
        bars = f'<span style="left:{left:.2f}%;width:{width:.2f}%;background:#8aa6c8"></span>'
        if phases:
            offset = left
            bars = ""
            for j, (phase, s) in enumerate(phases.items()):
                w = max(s / total * 100, 0.25)
                bars += (f'<span data-phase="{esc(phase)}" style="left:{offset:.2f}%;width:{w:.2f}%;'
                         f'background:{palette[j % 4]}" title="{esc(phase)} {fmt(s)} s"></span>')
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
                 + table(["node", "status", "seconds", "when", "peak RSS (MiB)", "reason", "stage"], rows, "timing",
                         raw=True)
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
    facts = [(k, v) for k, v in pick(flatten(run.telemetry), run.settings.get("adapter") or []) if v is not None]
    record = run.record
    plots = [_norm_plot(record.delta_norms if record else None, "delta norm ‖Δ‖F per target (mean over layers)")]
    if record is not None and record.fallback_mix is not None:
        plots.append(_norm_plot(record.fallback_mix.get("delta_norms"), "delta norms of the stage-2 retry mix"))
    manifests = artifact_manifests(run)
    if not facts and not any(plots) and not manifests:
        return ""
    parts = ["<h2>Adapter</h2>", f'<div class="grid"><div>{key_values(facts)}</div>{"".join(plots)}</div>']
    for path, manifest in manifests:
        picked = pick(flatten(manifest), run.settings.get("manifest_keys") or [])
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
            else key_values((k, v) for k, v in flatten(data).items() if not isinstance(v, (dict, list)))
        parts.append(f"<h2>{esc(name)}</h2>{body}")
    return "".join(parts)


def section_outline(run: RunFolder) -> str:
    """The map of the program (outline.json): the most central files, each with its symbols, spans and summaries."""
    data = run.data.get("outline")
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(files, list) or not files:
        return ""
    rows = []
    for rank, f in enumerate(x for x in files if isinstance(x, dict)):
        entries = [e for e in f.get("entries") or [] if isinstance(e, dict)]
        symbols = "<br>".join(f'<span class="mono">{esc(e.get("kind"))} {esc(e.get("name"))} '
                              f'{esc(e.get("start"))}-{esc(e.get("end"))}</span> {esc(e.get("summary"))}'
                              for e in entries) + (f'<br><span class="muted">… {esc(f.get("more"))} more</span>'
                                                   if f.get("more") else "")
        rows.append([str(rank + 1), f'<span class="mono">{esc(f.get("path"))}</span><br><span class="small muted">'
                     f'{esc(f.get("summary"))}</span>', esc(fmt(f.get("score"))), symbols])
    total = f"{esc(data.get('files_total'))} files, {esc(data.get('symbols_total'))} symbols"
    return (f'<h2 id="outline">Map of the program</h2><p class="small">the {len(rows)} most central of {total} '
            "(PageRank over calls and imports; python -m pipeline.outline prints all)</p>"
            + table(["#", "file", "rank", "symbols, most central first"], rows, "outline", raw=True))


def section_everything(run: RunFolder) -> str:
    rest = [(k, v) for k, v in flatten(run.telemetry).items()
            if k.split(".")[0] not in DRAWN and not (isinstance(v, list) and len(v) > 20)]
    if not rest:
        return ""
    name = run.settings["files"].get("telemetry", "telemetry")
    return f"<h2>All of {esc(name)}</h2><details><summary>{len(rest)} more entries</summary>{key_values(rest)}</details>"


def render_run(run: RunFolder) -> str:
    record, trace = run.record, run.trace
    failure = trace.get("failure") or (record.error if record else None)
    status = "failed" if failure else ("ok" if trace or record else "unknown")
    title = f"{trace.get('pipeline') or 'run'} report"
    parts = [f'<h1>{esc(title)} <span class="badge {status}" id="status">{status}</span></h1>',
             f'<p class="mono small muted">{esc(run.folder)}</p>']
    overrides = trace.get("overrides") or (record.overrides if record else ())
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
              section_results(run), section_outline(run), section_everything(run)]
    return page(title, "".join(parts))


def write_run_report(folder: str | Path, settings: dict | None = None) -> Path:
    run = RunFolder.load(Path(folder), settings)
    out = run.folder / str(run.settings.get("filename") or "report.html")
    write_atomic(out, render_run(run))
    return out
