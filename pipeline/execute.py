"""Run a validated graph in topological order, with conditions, cleanup nodes and a trace."""
from __future__ import annotations

import dataclasses
import logging
import resource
import time
import traceback
from typing import Any

from .errors import StageFailed
from .graph import INPUTS, Graph
from .stage import RunContext, Stage

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NodeTrace:
    node: str
    stage: str
    status: str  # ok | skipped | failed
    seconds: float = 0.0
    reason: str = ""
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    peak_rss_mb: float = 0.0  # the process's peak resident memory when the node finished (where memory goes)


@dataclasses.dataclass
class RunResult:
    values: dict[tuple[str, str], Any]
    trace: list[NodeTrace]

    def output(self, node: str, port: str, default: Any = None) -> Any:
        return self.values.get((node, port), default)

    def trace_dict(self) -> list[dict]:
        return [dataclasses.asdict(t) for t in self.trace]


def summarize(value: Any) -> Any:
    """A short, JSON-friendly description of an output for the trace."""
    if hasattr(value, "summary") and callable(value.summary):
        return value.summary()
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return value if len(value) <= 120 else value[:117] + "..."
    if isinstance(value, (list, tuple, set, dict)):
        return f"{type(value).__name__}[{len(value)}]"
    return type(value).__name__


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec,
    so a job started by a big process (a multirun, a benchmark) would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:  # no procfs (macOS): the portable, less exact figure
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def execute(graph: Graph, context: RunContext) -> RunResult:
    """Run every node once. After a failure only ``always`` nodes still run; then the failure is raised."""
    if any(node.stage is None for node in graph.nodes.values()):
        graph.instantiate()
    values: dict[tuple[str, str], Any] = {(INPUTS, k): v for k, v in graph.inputs.items()}
    trace: list[NodeTrace] = []
    # a graph input refused up front fails its node before anything runs (no model loads); the always-nodes
    # (cleanup, telemetry) still run, as after any failure
    failure: tuple[str, BaseException] | None = precheck(graph)
    if failure:
        context.failure = str(StageFailed(*failure))

    for name in graph.order:
        if name == INPUTS:
            continue
        node = graph.nodes[name]
        record = NodeTrace(name, node.target, "skipped")
        trace.append(record)
        if failure and name == failure[0]:
            record.status, record.reason = "failed", f"precheck: {_first_line(failure[1])}"
            context.statuses[name] = "failed"
            continue
        if failure and not node.always:
            record.reason = f"after failure of '{failure[0]}'"
            context.statuses[name] = "skipped"
            continue
        kwargs, missing = {}, None
        ports = node.stage_cls.input_ports()
        for port, (src, src_port) in node.wires.items():
            if (src, src_port) in values:
                kwargs[port] = values[(src, src_port)]
            elif ports[port].required:
                missing = f"{src}.{src_port}"
                break
        if missing:
            record.reason = f"input {missing} was not produced"
            context.statuses[name] = "skipped"
            continue
        if node.when:
            src, port, expect = node.when
            actual = values.get((src, port))
            if actual is None or bool(actual) != expect:
                record.reason = f"condition {'' if expect else 'not '}{src}.{port} is false"
                context.statuses[name] = "skipped"
                continue
        for param in node.stage_cls.context_params():
            kwargs[param] = context
        started = time.perf_counter()
        try:
            produced = node.stage.run(**kwargs)
            _check_outputs(name, node.stage_cls, produced)
        except BaseException as err:  # re-raised below, after the always-nodes ran
            record.seconds = time.perf_counter() - started
            record.peak_rss_mb = peak_rss_mb()
            record.status = "failed"
            record.reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            context.timings[name] = record.seconds
            context.statuses[name] = "failed"
            if failure is None:
                failure = (name, err)
                context.failure = str(StageFailed(name, err))
            log.error("node %s failed: %s", name, record.reason)
            continue
        record.seconds = time.perf_counter() - started
        record.peak_rss_mb = peak_rss_mb()
        record.status = "ok"
        context.timings[name] = record.seconds
        context.statuses[name] = "ok"
        for port, value in produced.items():
            values[(name, port)] = value
            record.outputs[port] = summarize(value)
        log.info("node %-14s %6.2fs", name, record.seconds)

    if failure:
        # a failed run returns no values: drop them, and the locals of the failed stage's frames (its traceback
        # keeps them alive as long as the error lives), so whatever they hold (a mix still in the model when its
        # cleanup node failed) is finalised now; the traceback keeps its file and line numbers
        node_name, err = failure
        traceback.clear_frames(err.__traceback__)
        values.clear()
        kwargs = produced = None  # noqa: F841
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise err
        raise StageFailed(node_name, err) from err
    return RunResult(values, trace)


def precheck(graph: Graph) -> tuple[str, BaseException] | None:
    """Each stage's ``precheck`` of the graph inputs wired to it, in graph order: the first (node, error)."""
    for name in graph.order:
        node = graph.nodes.get(name)
        if node is None or type(node.stage).precheck is Stage.precheck:
            continue
        given = {port: graph.inputs[src_port] for port, (src, src_port) in node.wires.items() if src == INPUTS}
        if not given:
            continue
        try:
            node.stage.precheck(**given)
        except Exception as err:  # reported like a failure of the node itself
            return name, err
    return None


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _check_outputs(name: str, stage_cls: type, produced: Any) -> None:
    if not isinstance(produced, dict):
        raise TypeError(f"{stage_cls.__name__}.run returned {type(produced).__name__}, expected a dict of outputs")
    declared = stage_cls.outputs
    missing = [p for p in declared if p not in produced]
    extra = [p for p in produced if p not in declared]
    if missing or extra:
        raise TypeError(
            f"{stage_cls.__name__}.run returned outputs {sorted(produced)}, declared {sorted(declared)}"
        )
