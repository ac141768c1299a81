"""What every bench row shares: the programs it measures, where results go, the row's fields, a fresh interpreter."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline import PROJECT_ROOT

# the site-packages that holds hydra (not sys.prefix's: a venv layered over another by a .pth file has its own)
SITE = Path(str(getattr(importlib.util.find_spec("hydra"), "origin", ""))).parent.parent
PROGRAM_80 = SITE / "hydra"  # ~80 Python files, a real program we did not write
TREE_2000 = SITE / "sympy"  # ~1,500 Python files (~3,000 files) for the indexing row
OUT = PROJECT_ROOT / "outputs" / "bench"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}


def row(name, value, peer, ratio, target, met, unit, detail=""):
    return {"name": name, "value": round(value, 4), "peer": round(peer, 4), "ratio": round(ratio, 4),
            "target": target, "met": bool(met), "unit": unit, "detail": detail}


def fresh_python(code: str, timeout: int = 900) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
