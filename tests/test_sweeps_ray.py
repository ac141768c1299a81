"""Issue 15 item 5: a 2-job multirun through Hydra's Ray launcher (`hydra/launcher=ray`, the `ray` extra) on a
local Ray cluster that the run starts and stops itself (no address given: ray.init starts one for the process).
Skipped, with the reason, where ray or the launcher is not installed (`pip install -e '.[ray]'`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from pipeline import PROJECT_ROOT

pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is not installed (pip install -e '.[ray]')")

PROGRAM = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'}


@pytest.mark.slow
def test_two_jobs_on_a_local_ray_cluster(tmp_path, make_tree):
    program = make_tree(tmp_path / "prog", PROGRAM)
    sweep = tmp_path / "sweep"
    # Ray's sockets live under its temp dir, whose path must stay short (a unix socket path has ~107 bytes)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("HYDRA_FULL_ERROR", None)
    args = ["-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
            "+hydra.launcher.ray.init.include_dashboard=false", f"+hydra.launcher.ray.init._temp_dir={ray_tmp}",
            "model=tiny_random", f"program_root={program}", "prompt=how does add work", "rerank=heuristic,none",
            "decode.max_new_tokens=4", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4",
            f"hydra.sweep.dir={sweep}", f"paths.outputs={tmp_path / 'out'}"]
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ray Launcher is launching 2 jobs" in proc.stdout + proc.stderr
    for number, rerank in ((0, "heuristic"), (1, "none")):
        tele = json.loads((sweep / str(number) / "telemetry.json").read_text())
        assert tele["status"] == "ok" and f"rerank={rerank}" in tele["overrides"]
        assert (sweep / str(number) / "report.html").is_file()
    # the jobs ran in Ray's worker processes, the sweep's report was written by the driver
    assert f"sweep folder: {sweep}" in proc.stderr and (sweep / "report.html").is_file()
