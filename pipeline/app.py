"""What every Hydra app shares: compose -> validate -> execute -> trace, and one-line errors."""
from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import PipelineError
from pipeline.engine.execute import RunResult, execute
from pipeline.engine.graph import Graph, build_graph
from pipeline.engine.stage import RunContext
from pipeline.question_text import check_config, check_prompt_given


def as_text(value: str) -> str:
    """A string to put in a config that stays text: OmegaConf would read ``${...}`` as an interpolation."""
    from pipeline.cli import escape_interpolation

    return escape_interpolation(value)


def run_config(cfg: DictConfig, run_dir: str | Path, overrides: list[str], sweep: bool = False) -> RunResult:
    """Build, validate and run the graph of ``cfg``; the trace is written to ``run_dir/trace.json``."""
    check_config(cfg)  # the question's bytes and length, on every way in, before anything loads
    graph = build_graph(cfg).instantiate()
    config = OmegaConf.to_container(cfg, resolve=False)
    context = RunContext(Path(run_dir), list(overrides), config,
                         run_graph=functools.partial(run_graph, config, list(overrides)), sweep=sweep)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    try:
        return execute(graph, context)
    finally:  # also after a failure: the run so far (every node's status, seconds, outputs and the reason)
        write_atomic(Path(run_dir) / "trace.json", json.dumps(trace_of(graph, overrides, context), indent=2,
                                                              default=str))


def trace_of(graph: Graph, overrides: list[str], context: RunContext) -> dict:
    """trace.json: the pipeline, the overrides, the first failure (node and one line) and one row per node."""
    result = context.result
    nodes = result.trace_dict() if result is not None else []
    visited = {row["node"] for row in nodes}
    nodes += [{"node": n, "status": "not run", "seconds": 0.0}
              for n in graph.order if n in graph.nodes and n not in visited]
    return {"pipeline": graph.name, "overrides": list(overrides),
            "failure": result.failure if result is not None else None,
            "failed_node": result.failed_node if result is not None else None, "nodes": nodes}


@functools.lru_cache(maxsize=16)
def _graph_section(name: str) -> DictConfig:
    from pipeline.api import compose

    return compose([f"pipeline={name}"]).pipeline


def run_graph(config: dict, overrides: list[str], graph: str, values: dict[str, str], run_dir: str | Path,
              drop: tuple[str, ...] = ()) -> RunResult:
    """``RunContext.run_graph``: the graph file ``graph`` run with this run's config, ``values`` set (as text, never
    interpolated) at their top-level keys; overrides of ``drop`` keys, of ``pipeline`` and of ``values`` are not
    repeated in the inner run's trace."""
    cfg = OmegaConf.create(config)
    cfg.pipeline = _graph_section(graph).copy()
    for key, value in values.items():
        cfg[key] = as_text(value)
    skipped = {"pipeline", *values, *drop}
    kept = [o for o in overrides if o.split("=")[0].lstrip("+~") not in skipped]
    return run_config(cfg, run_dir, [*kept, f"pipeline={graph}"])


def result_value(cfg: DictConfig, result: RunResult) -> Any:
    ref = cfg.pipeline.get("result")
    if not ref:
        return None
    node, port = str(ref).split(".")
    return result.output(node, port)


def hydra_main(cfg: DictConfig) -> Any:
    """Body of `python -m pipeline.run` (and the other apps): run, write the report, print the result and
    where everything went; on failure one line (with where its report is) and exit code 2."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.callbacks import remove_unused_job_folder, remove_unused_run_folder
    from pipeline.output import output_mode, progress, show_logs, show_result
    from pipeline.report import write_after

    hydra_cfg = HydraConfig.get()
    verbose = bool(hydra_cfg.verbose)
    single = hydra_cfg.mode != RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    show_logs(verbose)
    try:
        check_prompt_given(cfg, overrides)  # before anything loads: the default question is about this project
        mode = output_mode(cfg)  # json: stdout holds the JSON object alone, so no draft streams there
        with console(sys.stdout if single and sys.stdout.isatty() and mode == "text" else None) as terminal, \
                progress(terminal, verbose):
            result = run_config(cfg, run_dir, overrides, sweep=not single)
    except (PipelineError, OmegaConfBaseException) as err:
        if single:  # failed before any node ran (no trace): the folder Hydra made for it goes too
            remove_unused_run_folder(run_dir)
        else:  # a job of a sweep: raised (verbose), the sweep goes on to its next job; exit 2 ends it
            remove_unused_job_folder(run_dir, last=not verbose)
        if verbose:
            raise
        where = write_after(cfg, run_dir)
        print(f"error: {str(err).splitlines()[0]}" + (f" (report: {where})" if where else ""), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if remove_unused_run_folder(run_dir) if single else remove_unused_job_folder(run_dir):  # before any node ran
            print(("\n" if sys.stderr.isatty() else "") + "error: interrupted before any node ran", file=sys.stderr)
            sys.exit(130)
        if verbose:
            raise
        where = write_after(cfg, run_dir)  # the partial draft and the nodes that ran, as after any failure
        print(("\n" if sys.stderr.isatty() else "") + f"error: {interrupted(cfg, run_dir)}"  # after the ^C's line
              + (f" (report: {where})" if where else ""), file=sys.stderr)
        sys.exit(130)
    where = write_after(cfg, run_dir)
    value = result_value(cfg, result)
    show_result(value, mode, terminal, run_dir, result.timings, where)
    if single:  # on stderr: stdout ends with the result, for scripts (`... | tail -1`)
        print(f"run folder: {run_dir}" + (f"\nreport: {where}" if where else ""), file=sys.stderr)
    return value


def interrupted(cfg: DictConfig, run_dir: Path) -> str:
    """The words for a Ctrl-C: interrupted, and what the nodes that ran after it put right (conf/report/html.yaml)."""
    from pipeline.runfolder import interrupt_notes, read_json, settings_of

    settings = settings_of(cfg)
    notes = interrupt_notes(run_dir, settings)
    record, _ = read_json(run_dir / settings["files"]["telemetry"])
    if isinstance(record, dict) and record.get("interrupted") and record.get("answer"):
        notes.append("partial draft kept in telemetry")
    return "interrupted" + (f" ({', '.join(notes)})" if notes else "")


class Console:
    """A terminal lent to the stages for the length of a run (`resources.get("console", "stream")`): a stage
    may stream text to it (the answer as it decodes). Only an interactive single run or a chat lends one."""

    def __init__(self, stream: Any):
        self.stream, self.wrote = stream, False
        self.drafts: list[str] = []  # the text streamed since each `new_draft` (an attempt's answer as decoded)
        self.before_write: Any = None  # called before text goes out (a progress line steps aside)

    def new_draft(self) -> None:
        self.drafts.append("")

    def write(self, text: str) -> None:
        if text:
            if self.before_write is not None:
                self.before_write()
            self.wrote = True
            if self.drafts:
                self.drafts[-1] += text
            self.stream.write(text)
            self.stream.flush()


@contextlib.contextmanager
def console(stream: Any):
    from pipeline.engine import resources
    lent = Console(stream) if stream is not None else None
    previous = resources.get("console", "stream")
    resources.put("console", "stream", lent)
    try:
        yield lent
    finally:
        resources.put("console", "stream", previous)
