"""`python -m pipeline.summary <multirun folder> [--metric NAME]`: one row per job of a sweep (docs/behaviour.md §8).

Each job folder of a Hydra multirun holds `.hydra/overrides.yaml`, `trace.json` (any graph: status, node seconds)
and the result files its graph wrote, as listed in `conf/summary.yaml` (`telemetry.json`, `eval.json`, ...). The
overrides and their scalar results become a table, printed
(the overrides that vary and the key metrics) and saved whole as CSV, and `--metric` is plotted per job (PNG).
This reads files only; it knows no stage.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import fnmatch
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline import CONF_DIR

# which result files a job may hold and which values are shown: data in conf/summary.yaml (stages' names, not ours)
SETTINGS = yaml.safe_load((CONF_DIR / "summary.yaml").read_text(encoding="utf-8"))
SOURCES = {name: (spec["prefix"], spec["section"]) for name, spec in SETTINGS["sources"].items()}
KEY_COLUMNS: list[str] = SETTINGS["key_columns"]
PREFERRED_METRICS: list[str] = SETTINGS["preferred_metrics"]


class SummaryError(Exception):
    """A one-line, user-facing problem with the folder or the options."""


def flatten(data: dict, prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Scalar values of ``data`` with dotted keys; lists and long texts (prompt, answer) are left out."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1:
            out.update(flatten(value, f"{name}.", depth - 1))
        elif isinstance(value, (bool, int, float)) or value is None:
            out[name] = value
        elif isinstance(value, str) and len(value) <= 40:
            out[name] = value
    return out


def read_job(folder: Path) -> dict[str, Any]:
    overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict[str, Any] = {"job": folder.name, "overrides": [str(o) for o in overrides]}
    for name, (prefix, section) in SOURCES.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise SummaryError(f"{path}: not JSON ({err})") from err
        if section:
            data = data.get(section) or {}
        row.update(flatten(data, prefix))
    trace = folder / "trace.json"
    if trace.is_file():  # every graph writes one: status and node seconds even where no result file exists
        data = json.loads(trace.read_text())
        row.setdefault("status", "failed" if data.get("failure") else "ok")
        row["trace.seconds"] = round(sum(float(n.get("seconds") or 0.0) for n in data.get("nodes", [])), 4)
    return row


def find_jobs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise SummaryError(f"'{root}' is not a folder (pass a multirun folder, e.g. outputs/multirun/<date>/<time>)")
    jobs = [p.parent.parent for p in root.rglob(".hydra/overrides.yaml") if p.parent.parent != root]
    if not jobs:
        raise SummaryError(f"'{root}' has no job folders (none holds .hydra/overrides.yaml)")
    return sorted(jobs, key=lambda p: (len(p.relative_to(root).parts), int(p.name) if p.name.isdigit() else math.inf, str(p)))


def split_overrides(rows: list[dict]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose value differs between jobs (the sweep's axes), and the ones all jobs share."""
    values: dict[str, list[str | None]] = {}
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in row["overrides"]) for row in rows]
    for job in parsed:
        for key in job:
            values.setdefault(key, [])
    for key in values:
        values[key] = [job.get(key) for job in parsed]
    varying = [k for k, v in values.items() if len(set(v)) > 1]
    fixed = {k: str(v[0]) for k, v in values.items() if len(set(v)) == 1}
    for row, job in zip(rows, parsed):
        for key in varying:
            row[key] = job.get(key, "")
    return varying, fixed


def shown_columns(rows: list[dict], metric: str) -> list[str]:
    """The key metrics these jobs have (never-set ones and the @1 recalls stay in the CSV only), and ``metric``."""
    present = [k for k in dict.fromkeys(k for row in rows for k in row if k not in ("job", "overrides"))
               if any(row.get(k) is not None for row in rows)]
    shown = []
    for pattern in KEY_COLUMNS:
        shown += [c for c in present if fnmatch.fnmatch(c, pattern) and not c.endswith("@1") and c not in shown]
    return shown + ([metric] if metric not in shown else [])


def pick_metric(rows: list[dict], wanted: str | None) -> str:
    numeric = sorted({k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if wanted:
        if wanted not in numeric:
            close = difflib.get_close_matches(wanted, numeric, n=3, cutoff=0.5)
            close += [n for n in numeric if wanted.lower() in n.lower() and n not in close][:3 - len(close)]
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise SummaryError(f"--metric '{wanted}' is not a numeric result of these jobs{hint}; "
                               f"available: {', '.join(numeric)}")
        return wanted
    for name in PREFERRED_METRICS:
        if name in numeric:
            return name
    if not numeric:
        raise SummaryError(f"the jobs wrote no numeric results (no trace.json, {', '.join(SOURCES)})")
    return numeric[0]


def cell(value: Any) -> str:
    """A short rendering for the terminal (Optuna's overrides are floats with 17 digits)."""
    if isinstance(value, str) and len(value) > 8:
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def render(rows: list[dict], columns: list[str]) -> str:
    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [min(40, max(len(r[i]) for r in table)) for i in range(len(columns))]
    return "\n".join("  ".join(v[:w].ljust(w) for v, w in zip(r, widths)).rstrip() for r in table)


def write_csv(rows: list[dict], varying: list[str], path: Path) -> None:
    columns = list(dict.fromkeys(["job", *varying, *(k for row in rows for k in row if k != "overrides")])) + ["overrides"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([" ".join(row["overrides"]) if c == "overrides" else row.get(c) for c in columns])


def plot(rows: list[dict], varying: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(str(row[k]) for k in varying) or f"job {row['job']}" for row in rows]
    values = [row.get(metric) if isinstance(row.get(metric), (int, float)) else math.nan for row in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 5.0))
    ax.bar(range(len(rows)), values, color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_xlabel(", ".join(varying) or "job")
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    same = len(finite) == len(values) > 1 and len(set(finite)) == 1
    # a flat plot shows nothing: say so in the title (and the caller says so in the terminal)
    ax.set_title(f"{metric} per job" + (f": all {len(finite)} values are equal ({finite[0]:.4g})" if same else ""))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def summarize(root: Path, metric: str | None = None, csv_path: Path | None = None,
              png_path: Path | None = None) -> tuple[str, Path, Path]:
    """Read the jobs under ``root``; write the CSV and the plot; return (terminal table, csv path, png path)."""
    rows = [read_job(job) for job in find_jobs(root)]
    varying, fixed = split_overrides(rows)
    metric = pick_metric(rows, metric)
    csv_path = csv_path or root / "summary.csv"
    png_path = png_path or root / f"summary_{metric.replace('/', '_')}.png"
    write_csv(rows, varying, csv_path)
    plot(rows, varying, metric, png_path)
    header = f"{len(rows)} jobs in {root}" + (f"; all with {' '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else "")
    values = [row.get(metric) for row in rows]
    numeric = all(isinstance(v, (int, float)) for v in values)
    flat = f" (all {len(rows)} values are equal: {cell(values[0])})" if numeric and len(rows) > 1 and len(set(values)) == 1 else ""
    text = "\n".join([header, render(rows, ["job", *varying, *shown_columns(rows, metric)]),
                      f"csv: {csv_path}", f"plot ({metric}): {png_path}{flat}"])
    return text, csv_path, png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.summary", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a multirun folder (hydra.sweep.dir)")
    parser.add_argument("--metric", help="the numeric column to plot (default: the eval metric, else elapsed_sec)")
    parser.add_argument("--csv", type=Path, help="where the CSV goes (default: <folder>/summary.csv)")
    parser.add_argument("--png", type=Path, help="where the plot goes (default: <folder>/summary_<metric>.png)")
    args = parser.parse_args(argv)
    try:
        text, _, _ = summarize(args.folder, args.metric, args.csv, args.png)
    except (SummaryError, OSError, yaml.YAMLError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
