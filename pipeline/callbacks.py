"""Hydra callbacks of our apps (conf/config.yaml `hydra.callbacks`).

Hydra creates the run folder itself, before our app runs; an unwritable `hydra.run.dir` would end in Hydra's
traceback. `CheckOutputDir` tries the folder first and turns the failure into our one-line error (exit 2).
`SweepReport` writes a multirun's report when its last job has ended (each job's own is written by the app).
"""
from __future__ import annotations

import contextlib
import os
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


class CheckOutputDir(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run")

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
