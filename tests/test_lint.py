"""Lint and types are part of the suite (the README's test command runs them): ruff and mypy, configured in
pyproject.toml, must report nothing."""
from __future__ import annotations

import subprocess
import sys

from pipeline import PROJECT_ROOT


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m <module>``; not installed is a failure, not a skip (it is in the test extra that setup.sh installs)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


def test_ruff_is_clean():
    proc = _run("ruff", "check", "--no-cache", "--output-format", "concise")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_mypy_is_clean(tmp_path):
    # its own cache folder: a stale cache of another checkout cannot hide an error
    proc = _run("mypy", "--cache-dir", str(tmp_path / "mypy_cache"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
