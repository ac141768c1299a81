"""`python -m pipeline.report <run folder | multirun folder>`: one self-contained `report.html`.

A run's report (pipeline/report/run.py) shows the question and the answer with its evidence, the graph as it ran,
the adapter and the result files; a multirun's (pipeline/report/sweep.py) the summary table, a plot per key metric
and a link to each job's report. It reads the files of a run folder (their names and the telemetry keys of the
headline come from `conf/report/html.yaml`) and the program's own files; it imports no stage.
Every run and every multirun writes one at its end through ``write_after`` (`report=html`, the default;
`report=none` writes none).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.report.run import write_run_report
from pipeline.report.sweep import write_sweep_report
from pipeline.runfolder import ReportError, RunFolder, is_sweep_folder, salvage_object, settings_of

__all__ = ["ReportError", "RunFolder", "main", "salvage_object", "write_after", "write_report", "write_run_report",
           "write_sweep_report"]

log = logging.getLogger(__name__)


def write_report(folder: str | Path, settings: dict | None = None) -> Path:
    """A run folder's or a multirun folder's report.html, whichever ``folder`` is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"'{folder}' is not a folder (pass a run or multirun folder)")
    if is_sweep_folder(folder) and not (folder / ".hydra").is_dir():
        return write_sweep_report(folder, settings)
    return write_run_report(folder, settings)


def write_after(config: DictConfig, folder: str | Path) -> Path | None:
    """The report of the run or the multirun that has just ended in ``folder``, when ``config`` says `report=html`:
    the apps call it after each run, the SweepReport callback after a multirun. A run whose graph never started
    (no trace) gets none; a failure to write it is a warning, never the run's error."""
    if str(OmegaConf.select(config, "report.format", default="none")) != "html":
        return None
    folder = Path(folder)
    settings = settings_of(config)
    sweep = is_sweep_folder(folder) and not (folder / ".hydra").is_dir()
    if not sweep and not (folder / settings["files"]["trace"]).is_file():
        return None
    try:
        return write_report(folder, None if sweep else settings)
    except (ReportError, OSError) as err:
        log.warning("no report: %s", str(err).splitlines()[0])
        return None


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
