"""Hydra callbacks of our apps (conf/config.yaml `hydra.callbacks`).

Hydra creates the run folder itself, before our app runs; an unwritable `hydra.run.dir` would end in Hydra's
traceback. `CheckOutputDir` tries the folder first and turns the failure into our one-line error (exit 2), and
notes which folders the run makes, so that a run that fails before any node runs removes them (`remove_unused_run_folder`);
in a multirun such a job removes its job folder, and the last job the sweep folder when no job folder is left in it
(`remove_unused_job_folder`).
`SweepReport` writes a multirun's report when its last job has ended (each job's own is written by the app).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def output_dir_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be created and written (None when it can); creates nothing that stays."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"'{existing}' is not a folder"
    try:
        probe = tempfile.mkdtemp(prefix=".write-check-", dir=existing)
    except OSError as err:
        return err.strerror or type(err).__name__
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


# the folders a single run's `hydra.run.dir` makes (itself, then each parent that did not exist), deepest first
MADE: list[Path] = []
# the folders a multirun's `hydra.sweep.dir` makes, deepest first (empty: the sweep folder existed, nothing is removed)
SWEEP_MADE: list[Path] = []
# what Hydra itself writes into a run folder before our app runs: its saved config and the job's log
_HYDRAS = {".hydra": {"config.yaml", "hydra.yaml", "overrides.yaml"}}
_SWEEP_HYDRAS = {"multirun.yaml"}  # ... and into a sweep folder before its first job


def folders_to_make(folder: str) -> list[Path]:
    """``folder`` and each parent of it that does not exist yet, deepest first."""
    path, made = Path(folder).expanduser().absolute(), []
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    return made


def _only_hydras(run_dir: Path) -> bool:
    """Only Hydra wrote into the folder: its saved config and the job's log."""
    for entry in run_dir.iterdir():
        kept = _HYDRAS.get(entry.name)
        if kept is not None and entry.is_dir() and not entry.is_symlink() \
                and all(f.name in kept and f.is_file() for f in entry.iterdir()):
            continue
        if not (entry.suffix == ".log" and entry.is_file() and not entry.is_symlink()):
            return False
    return True


def _remove(folder: Path, made: list[Path]) -> None:
    shutil.rmtree(folder)
    for parent in made:
        with contextlib.suppress(OSError):  # not empty: another run wrote into it meanwhile, and it stays
            parent.rmdir()


def remove_unused_run_folder(run_dir: Path) -> bool:
    """Remove the run folder Hydra made for this run, and the parents it made, when only Hydra wrote into it (a run
    that failed before any node ran leaves nothing behind). A folder that existed before, or holds anything of ours,
    stays. True when it was removed."""
    run_dir = Path(run_dir).absolute()
    if not MADE or MADE[0] != run_dir or not run_dir.is_dir() or not _only_hydras(run_dir):
        return False
    _remove(run_dir, MADE[1:])
    MADE.clear()
    return True


def remove_unused_job_folder(job_dir: Path, last: bool = True) -> bool:
    """A multirun job that failed before any node ran: remove its folder when only Hydra wrote into it, and when it
    is the sweep's ``last`` job, the sweep folder if no job folder is left in it. Only inside a sweep folder this
    process made (`SWEEP_MADE`), so a folder that existed before stays. True when the job folder was removed."""
    job_dir = Path(job_dir).absolute()
    if not SWEEP_MADE or not job_dir.is_relative_to(SWEEP_MADE[0]) or job_dir == SWEEP_MADE[0] \
            or not job_dir.is_dir() or not _only_hydras(job_dir):
        return False
    shutil.rmtree(job_dir)
    for parent in job_dir.parents:  # a nested hydra.sweep.subdir's folders, up to the sweep folder
        if parent == SWEEP_MADE[0]:
            break
        with contextlib.suppress(OSError):
            parent.rmdir()
    if last:
        remove_unused_sweep_folder()
    return True


def remove_unused_sweep_folder() -> bool:
    """Remove the sweep folder this process made, and the parents it made, when it holds no job folder (every job
    failed before any node ran, or none began): only Hydra's multirun.yaml. True when it was removed."""
    if not SWEEP_MADE or not SWEEP_MADE[0].is_dir():
        return False
    if not all(e.name in _SWEEP_HYDRAS and e.is_file() and not e.is_symlink() for e in SWEEP_MADE[0].iterdir()):
        return False
    _remove(SWEEP_MADE[0], SWEEP_MADE[1:])
    SWEEP_MADE.clear()
    return True


class CheckOutputDir(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run")
        MADE[:] = folders_to_make(str(config.hydra.run.dir))
        SWEEP_MADE.clear()  # an earlier sweep of this process is not this run's

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep")
        SWEEP_MADE[:] = folders_to_make(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SWEEP_MADE.clear()  # every job ended: a later error of this process is not this sweep's

    @staticmethod
    def _check(config: DictConfig, which: str) -> None:
        folder = str(config.hydra[which].dir)
        problem = output_dir_problem(folder)
        if problem is None:
            return
        message = f"hydra.{which}.dir '{folder}' cannot be created or written ({problem}); choose another folder"
        if config.hydra.verbose:
            raise OSError(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class SweepReport(Callback):
    """After a multirun: print where its jobs went and write the sweep's report.html (unless report=none)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pipeline.report import write_after

        folder = Path(str(config.hydra.sweep.dir))
        print(f"sweep folder: {folder}", file=sys.stderr)
        where = write_after(config, folder)
        if where is not None:
            print(f"report: {where}", file=sys.stderr)
