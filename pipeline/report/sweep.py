"""A multirun's report.html: the summary table (sortable) with each job's answer, a plot per key metric and a link to each
job's report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.engine.cache import write_atomic
from pipeline.htmlkit import SORT_JS, bar_chart, esc, fmt, page
from pipeline.report.run import write_run_report
from pipeline.runfolder import CONFIG_ERRORS, ReportError, is_run_folder, read_json, settings_of
from pipeline.summary import KEY_COLUMNS, SummaryError, find_jobs, read_job, shown_columns, split_overrides


def render_sweep(folder: Path, settings: dict) -> str:
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
    answers = [_answer(job, settings) for job in jobs]
    shown = any(answers)  # the answer next to the status: the metrics' columns run off to the right
    header = ["job", *varying, "status", *(["answer"] if shown else []), *metrics]
    body = [[link, *[esc(row.get(k, "")) for k in varying],
             f'<span class="badge {esc(row.get("status", ""))}">{esc(row.get("status", "?"))}</span>',
             *([f'<td class="job-answer">{esc(answer)}</td>'] if shown else []),
             *[_num_cell(row.get(m)) for m in metrics]]
            for link, row, answer in zip(links, rows, answers)]
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


def _answer(job: Path, settings: dict, limit: int = 200) -> str:
    """The first ``limit`` characters of a job's answer ('' when its telemetry holds none)."""
    data, _ = read_json(job / str(settings["files"]["telemetry"]))
    answer = data.get("answer") if isinstance(data, dict) else None
    if not isinstance(answer, str):
        return ""
    answer = " ".join(answer.split())
    return answer if len(answer) <= limit else answer[:limit].rstrip() + "…"


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
