"""Run and multirun folders written by hand, shaped like the ones the answer graph writes (for report tests)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

PROGRAM = {
    "pkg/__init__.py": "",
    "pkg/core.py": (
        '"""Core arithmetic. <script>alert("pwned")</script> & </pre>"""\n'
        "\n"
        "\n"
        "def add(a, b):\n"
        '    """Add two numbers and return the sum."""\n'
        "    return a + b\n"
        "\n"
        "\n"
        "def parse_config(text):\n"
        '    """Parse a config file into a dict of key value pairs."""\n'
        "    out = {}\n"
        "    for line in text.splitlines():\n"
        '        if "=" in line:\n'
        '            key, value = line.split("=", 1)\n'
        "            out[key.strip()] = value.strip()\n"
        "    return out\n"
    ),
}

ANSWER = ("Numbers are added by `add` in pkg/core.py:4-6, and config text is parsed by parse_config "
          "[pkg/core.py:9-16]. It relies on frobnicate_all. [not in evidence: pkg/missing.py:1-3] <b>bold</b>")

NODES = ["index", "select", "pack", "decode", "cite", "telemetry"]


def telemetry(**changes) -> dict:
    record = {
        "status": "ok", "error": None, "prompt": "How is <config> parsed? ${x}", "answer": ANSWER,
        "overrides": ["model=tiny_random", "prompt='How is <config> parsed? \\${x}'"],
        "files_selected": ["pkg/core.py", "pkg/__init__.py"], "modules_selected": ["pkg.core", "pkg"],
        "windows_packed": [{"path": "pkg/core.py", "start": 1, "end": 7},
                           {"path": "pkg/core.py", "start": 9, "end": 16}],
        "window_scores": [None, 3.25], "file_scores": {"pkg/core.py": 7.125, "pkg/__init__.py": None},
        "citations": [
            {"path": "pkg/core.py", "start": 4, "end": 6, "valid": True, "source": "model", "removed": False, "reason": ""},
            {"path": "pkg/core.py", "start": 9, "end": 16, "valid": True, "source": "attributed", "removed": False,
             "reason": ""},
            {"path": "pkg/missing.py", "start": 1, "end": 3, "valid": False, "source": "model", "removed": True,
             "reason": "pkg/missing.py is not in the program"},
        ],
        "citations_total": 3, "citations_valid": 2, "citations_model": 2, "citations_attributed": 1,
        "unknown_identifiers": ["frobnicate_all"], "unknown_identifier_rate": 0.25, "grounded": True,
        "retries": 1, "fallback_used": False, "rank": 12, "gsub": 0.75, "alpha": 16,
        "delta_norms": {"q_proj": 0.06, "k_proj": 0.04, "v_proj": 0.05, "o_proj": 0.06},
        "timings": {n: 0.1 for n in NODES}, "elapsed_sec": 0.6, "tokens": {"prompt": 300, "generated": 40},
        "tokens_per_second": 12.5, "model": "tiny-random-llama-2x64", "device": "cpu",
    }
    record.update(changes)
    return record


def trace(failed: str | None = None, phases: bool = False) -> dict:
    nodes, failure = [], None
    for name in NODES:
        status = "ok"
        reason = ""
        if failed and name == failed:
            status, reason = "failed", "InputError: program root does not exist"
            failure = f"node '{name}': program root does not exist"
        elif failed and NODES.index(name) > NODES.index(failed) and name != "telemetry":
            status, reason = "skipped", f"after failure of '{failed}'"
        node = {"node": name, "stage": f"stages.{name}.Stage", "status": status, "seconds": 0.5 if name == "decode" else 0.1,
                "reason": reason, "outputs": {}, "peak_rss_mb": 400.0 + len(nodes)}
        if phases and name == "decode":
            node["prefill_seconds"], node["decode_seconds"] = 0.2, 0.3
        nodes.append(node)
    return {"pipeline": "answer", "overrides": ["model=tiny_random"], "failure": failure, "nodes": nodes}


def config(program: Path) -> dict:
    wires = {"index": {"in": {"program_root": "inputs.program_root"}}, "select": {"in": {"index": "index.index"}},
             "pack": {"in": {"index": "index.index", "selection": "select.selection"}},
             "decode": {"in": {"prompt": "pack.evidence"}}, "cite": {"in": {"draft": "decode.draft"}},
             "telemetry": {"always": True, "after": ["cite"]}}
    return {"program_root": str(program), "prompt": "How is <config> parsed? \\${x}",
            "pipeline": {"name": "answer", "nodes": wires}}


def write_program(root: Path) -> Path:
    for rel, text in PROGRAM.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def write_run(folder: Path, program: Path, tele: dict | None = None, trace_data: dict | None = None,
              overrides: list[str] | None = None) -> Path:
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config(program)))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or ["model=tiny_random"]))
    if tele is not None:
        (folder / "telemetry.json").write_text(json.dumps(tele, indent=2))
    (folder / "trace.json").write_text(json.dumps(trace_data or trace(), indent=2))
    return folder
