"""What every Hydra app shares: compose -> validate -> execute -> trace, and one-line errors."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .cache import write_atomic
from .errors import PipelineError
from .execute import RunResult, execute
from .graph import build_graph
from .stage import RunContext

log = logging.getLogger(__name__)


def as_text(value: str) -> str:
    """A string to put in a config that stays text: OmegaConf would read ``${...}`` as an interpolation."""
    return value.replace("${", "\\${")


def run_config(cfg: DictConfig, run_dir: str | Path, overrides: list[str]) -> RunResult:
    """Build, validate and run the graph of ``cfg``; the trace is written to ``run_dir/trace.json``."""
    graph = build_graph(cfg).instantiate()
    config = OmegaConf.to_container(cfg, resolve=False)
    context = RunContext(Path(run_dir), list(overrides), config)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    result = None
    try:
        result = execute(graph, context)
        return result
    finally:
        trace = {"pipeline": graph.name, "overrides": list(overrides), "failure": context.failure,
                 "nodes": [{"node": n, "status": context.statuses.get(n, "not run"),
                            "seconds": round(context.timings.get(n, 0.0), 4)} for n in graph.order if n in graph.nodes]}
        if result is not None:
            trace["nodes"] = result.trace_dict()
        write_atomic(Path(run_dir) / "trace.json", json.dumps(trace, indent=2, default=str))


def result_value(cfg: DictConfig, result: RunResult) -> Any:
    ref = cfg.pipeline.get("result")
    if not ref:
        return None
    node, port = str(ref).split(".")
    return result.output(node, port)


def hydra_main(cfg: DictConfig) -> Any:
    """Body of `python -m pipeline.run` (and the other apps): print the result, or one line on failure."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    verbose = bool(hydra_cfg.verbose)
    try:
        result = run_config(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))
    except PipelineError as err:
        if verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if verbose:
            raise
        print("error: interrupted (model weights restored)", file=sys.stderr)
        sys.exit(130)
    value = result_value(cfg, result)
    if value is not None:
        print(value)
    return value
