"""Run a validated graph in topological order, with conditions, cleanup nodes and a trace.

The run is recorded in one place, its ``RunResult``: the values the nodes produced and one ``NodeTrace`` per
node (status, seconds, reason, summaries of its outputs). Stages read it through their ``RunContext``
(``statuses``, ``timings``, ``failure``); on a failure it stays on the raised ``StageFailed`` (``.result``) and in
the run's ``trace.json``, with its values dropped (only summaries are kept).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import resource
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from pipeline.engine.errors import StageFailed
from pipeline.engine.graph import INPUTS, Graph, Node
from pipeline.engine.stage import RunContext, Stage

log = logging.getLogger(__name__)

# called with (node, None) when a node's stage starts and (node, seconds) when it ends: how an app shows progress
NodeListener = Callable[[str, "float | None"], None]
_listeners: list[NodeListener] = []


@contextlib.contextmanager
def listening(listener: NodeListener) -> Iterator[None]:
    """``listener`` hears of every node's start and end while the block runs (in this process, nested runs too)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def _notify(node: str, seconds: float | None) -> None:
    for listener in list(_listeners):
        listener(node, seconds)


@dataclasses.dataclass
class NodeTrace:
    node: str
    stage: str
    status: str  # ok | skipped | failed
    seconds: float = 0.0
    reason: str = ""
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    peak_rss_mb: float = 0.0  # the process's peak resident memory when the node finished (where memory goes)

    @property
    def ran(self) -> bool:
        """Whether the node's stage was called (a node refused by its precheck was not)."""
        return self.status == "ok" or (self.status == "failed" and not self.reason.startswith("precheck:"))


@dataclasses.dataclass
class RunResult:
    """A run so far: what the nodes produced and how each went. After a failure ``values`` is empty."""

    values: dict[tuple[str, str], Any]
    trace: list[NodeTrace]
    failure: str | None = None  # one line naming the first node that failed and why
    failed_node: str | None = None
    # the first failure itself, for the always-nodes (a Ctrl-C during decode carries the draft decoded so far)
    error: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)

    def output(self, node: str, port: str, default: Any = None) -> Any:
        return self.values.get((node, port), default)

    def trace_dict(self) -> list[dict]:
        return [dataclasses.asdict(t) for t in self.trace]

    @property
    def statuses(self) -> dict[str, str]:
        return {t.node: t.status for t in self.trace}

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of every node whose stage ran (ok or failed)."""
        return {t.node: t.seconds for t in self.trace if t.ran}

    def fail(self, node: str, error: BaseException) -> None:
        """Record the first failure (later ones, e.g. of a cleanup node, stay in their node's trace only)."""
        if self.failure is None:
            self.failure, self.failed_node, self.error = str(StageFailed(node, error)), node, error


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
    """Run every node once, in topological order. After a failure only ``always`` nodes still run; then the
    first failure is raised as ``StageFailed`` carrying the run's ``RunResult`` (values dropped)."""
    if any(node.stage is None for node in graph.nodes.values()):
        graph.instantiate()
    run = RunResult({(INPUTS, k): v for k, v in graph.inputs.items()}, [])
    context.result = run
    # a graph input refused up front fails its node before anything runs (no model loads); the always-nodes
    # (cleanup, telemetry) still run, as after any failure
    refused = precheck(graph)
    error = refused[1] if refused else None
    if refused:
        run.fail(*refused)
    for name in graph.order:
        if name == INPUTS:
            continue
        node = graph.nodes[name]
        if refused and name == refused[0]:
            record, raised = NodeTrace(name, node.target, "failed", reason=f"precheck: {_first_line(refused[1])}"), None
        else:
            record, raised = _visit(node, run, context)
        run.trace.append(record)  # after the node: a stage sees the statuses of the nodes before it
        if raised is not None and error is None:
            error = raised
            run.fail(name, raised)
    if error is not None:
        _raise_failure(run, error)
    return run


def _visit(node: Node, run: RunResult, context: RunContext) -> tuple[NodeTrace, BaseException | None]:
    """Skip the node (with the reason) or run it; never raises: the error of a failed stage is returned."""
    reason = _skip_reason(node, run)
    if reason:
        return NodeTrace(node.name, node.target, "skipped", reason=reason), None
    return _run_stage(node, run, context)


def _skip_reason(node: Node, run: RunResult) -> str | None:
    """Why the node does not run: a failure before it (unless it is ``always``), a required input that was
    not produced, or a ``when`` condition that is false."""
    if run.failure and not node.always:
        return f"after failure of '{run.failed_node}'"
    ports = node.stage_cls.input_ports()
    for port, (src, src_port) in node.wires.items():
        if (src, src_port) not in run.values and ports[port].required:
            return f"input {src}.{src_port} was not produced"
    if node.when:
        src, port, expect = node.when
        actual = run.values.get((src, port))
        if actual is None or bool(actual) != expect:
            return f"condition {'' if expect else 'not '}{src}.{port} is false"
    return None


def _run_stage(node: Node, run: RunResult, context: RunContext) -> tuple[NodeTrace, BaseException | None]:
    """Call the node's stage with its inputs, check and store its outputs, and time it.

    The inputs are gathered here, in the frame the error's traceback starts from: ``_raise_failure`` clears
    that frame, so a failed run holds no reference to them (see there)."""
    record = NodeTrace(node.name, node.target, "failed")
    kwargs = _inputs(node, run.values)
    for param in node.stage_cls.context_params():
        kwargs[param] = context
    _notify(node.name, None)
    started = time.perf_counter()
    try:
        produced = node.instance.run(**kwargs)
        _check_outputs(node.name, node.stage_cls, produced)
    except BaseException as err:  # noqa: BLE001 - re-raised by execute, after the always-nodes ran
        record.seconds, record.peak_rss_mb = time.perf_counter() - started, peak_rss_mb()
        record.reason = _first_line(err)
        # for the run's log only: the app reports a failure (or "interrupted") in one line on stderr
        log.info("node %s failed: %s", node.name, record.reason)
        _notify(node.name, record.seconds)
        return record, err
    record.seconds, record.peak_rss_mb, record.status = time.perf_counter() - started, peak_rss_mb(), "ok"
    for port, value in produced.items():
        run.values[(node.name, port)] = value
        record.outputs[port] = summarize(value)
    log.info("node %-14s %6.2fs", node.name, record.seconds)
    _notify(node.name, record.seconds)
    return record, None


def _inputs(node: Node, values: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """The node's wired inputs that were produced. An optional port whose producer was skipped is left out of the
    call, so it gets the default written in the stage's ``run`` signature (the one place a port default lives)."""
    return {port: values[wire] for port, wire in node.wires.items() if wire in values}


def _raise_failure(run: RunResult, error: BaseException) -> NoReturn:
    """Raise the run's first failure. A failed run returns no values: drop them, and the locals of the failed
    stage's frames (its traceback keeps them alive as long as the error lives), so whatever they hold (a mix
    still in the model when its cleanup node failed) is finalised now; the traceback keeps its file and line
    numbers, the result keeps its trace (summaries only)."""
    traceback.clear_frames(error.__traceback__)
    run.values.clear()
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        raise error
    failed = StageFailed(run.failed_node or "?", error)
    failed.result = run
    raise failed from error


def precheck(graph: Graph) -> tuple[str, BaseException] | None:
    """Each stage's ``precheck`` of the graph inputs wired to it, in graph order: the first (node, error). A precheck
    that needs no input (its settings alone) runs also when no graph input is wired to the node."""
    for name in graph.order:
        node = graph.nodes.get(name)
        if node is None or type(node.instance).precheck is Stage.precheck:
            continue
        given = {port: graph.inputs[src_port] for port, (src, src_port) in node.wires.items() if src == INPUTS}
        if not given and _needs_inputs(type(node.instance).precheck):
            continue
        try:
            node.instance.precheck(**given)
        except Exception as err:  # noqa: BLE001 - reported like a failure of the node itself, then raised
            return name, err
    return None


def _needs_inputs(check: Callable[..., Any]) -> bool:
    """Whether a precheck has a parameter without a default (beyond ``self``)."""
    params = list(inspect.signature(check).parameters.values())[1:]
    return any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _check_outputs(name: str, stage_cls: type[Stage], produced: Any) -> None:
    if not isinstance(produced, dict):
        raise TypeError(f"{stage_cls.__name__}.run returned {type(produced).__name__}, expected a dict of outputs")
    declared = stage_cls.outputs
    missing = [p for p in declared if p not in produced]
    extra = [p for p in produced if p not in declared]
    if missing or extra:
        raise TypeError(
            f"{stage_cls.__name__}.run returned outputs {sorted(produced)}, declared {sorted(declared)}"
        )
