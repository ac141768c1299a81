"""Hydra callbacks of our apps (conf/config.yaml `hydra.callbacks`).

Hydra creates the run folder itself, before our app runs; an unwritable `hydra.run.dir` would end in Hydra's
traceback. `CheckOutputDir` tries the folder first and turns the failure into our one-line error (exit 2), and
notes which folders the run makes, so that a run that fails before any node runs removes them (`remove_unused_run_folder`).
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
# what Hydra itself writes into a run folder before our app runs: its saved config and the job's log
_HYDRAS = {".hydra": {"config.yaml", "hydra.yaml", "overrides.yaml"}}


def folders_to_make(folder: str) -> list[Path]:
    """``folder`` and each parent of it that does not exist yet, deepest first."""
    path, made = Path(folder).expanduser().absolute(), []
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    return made


def remove_unused_run_folder(run_dir: Path) -> bool:
    """Remove the run folder Hydra made for this run, and the parents it made, when only Hydra wrote into it (a run
    that failed before any node ran leaves nothing behind). A folder that existed before, or holds anything of ours,
    stays. True when it was removed."""
    run_dir = Path(run_dir).absolute()
    if not MADE or MADE[0] != run_dir or not run_dir.is_dir():
        return False
    for entry in run_dir.iterdir():
        kept = _HYDRAS.get(entry.name)
        if kept is not None and entry.is_dir() and not entry.is_symlink() \
                and all(f.name in kept and f.is_file() for f in entry.iterdir()):
            continue
        if not (entry.suffix == ".log" and entry.is_file() and not entry.is_symlink()):
            return False
    shutil.rmtree(run_dir)
    for parent in MADE[1:]:
        with contextlib.suppress(OSError):  # not empty: another run wrote into it meanwhile, and it stays
            parent.rmdir()
    MADE.clear()
    return True


class CheckOutputDir(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run")
        MADE[:] = folders_to_make(str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep")

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
