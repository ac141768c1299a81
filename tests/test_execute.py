"""The executor: topological order, `when` conditions, skipped producers, `always` nodes, failures and the trace."""
from __future__ import annotations

import dataclasses
import json
import time
import weakref
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.app import run_config
from pipeline.engine.errors import StageFailed
from pipeline.engine.execute import execute, peak_rss_mb
from pipeline.engine.graph import build_graph
from pipeline.engine.stage import RunContext, Stage

EVENTS: list[str] = []


@pytest.fixture(autouse=True)
def clear_events():
    EVENTS.clear()
    yield
    EVENTS.clear()


class Brew(Stage):
    """Produce a number and a verdict (a toy coffee machine)."""

    outputs = {"cups": int, "passed": bool}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        tag: str = "brew"
        cups: int = 1
        passed: bool = True
        sleep: float = 0.0

    def run(self) -> dict:
        EVENTS.append(self.config.tag)
        if self.config.sleep:
            time.sleep(self.config.sleep)
        return {"cups": self.config.cups, "passed": self.config.passed}


class AddMilk(Stage):
    outputs = {"cups": int}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        tag: str = "milk"
        extra: int = 1

    def run(self, cups: int) -> dict:
        EVENTS.append(self.config.tag)
        return {"cups": cups + self.config.extra}


class Serve(Stage):
    """Optional inputs with defaults, and the run context."""

    outputs = {"served": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        tag: str = "serve"

    def run(self, context: RunContext, cups: int = -1, sugar: int = 100) -> dict:
        EVENTS.append(self.config.tag)
        return {"served": {"cups": cups, "sugar": sugar, "failure": context.failure,
                           "statuses": dict(context.statuses)}}


class Spill(Stage):
    outputs = {"cups": int}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        tag: str = "spill"
        kind: Literal["runtime", "interrupt", "bad_outputs", "not_dict"] = "runtime"

    def run(self, cups: int = 0) -> dict:
        EVENTS.append(self.config.tag)
        if self.config.kind == "interrupt":
            raise KeyboardInterrupt
        if self.config.kind == "bad_outputs":
            return {"mugs": 1}
        if self.config.kind == "not_dict":
            return [1]  # type: ignore[return-value]
        raise RuntimeError("the cup cracked\nsecond line of detail")


def ref(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def node(cls: type, tag: str | None = None, **spec) -> dict:
    out = {"stage": ref(cls), **spec}
    if tag:
        out.setdefault("with", {})["tag"] = tag
    return out


def graph_of(nodes: dict, **pipeline):
    cfg = OmegaConf.create({"pipeline": {"name": "cafe", "nodes": nodes, **pipeline}})
    return build_graph(cfg).instantiate()


def context(tmp_path, overrides=()) -> RunContext:
    return RunContext(tmp_path, list(overrides), {})


def status(result_or_trace) -> dict[str, str]:
    trace = result_or_trace.trace if hasattr(result_or_trace, "trace") else result_or_trace
    return {t.node: t.status for t in trace}


# ---------------------------------------------------------------- order


def test_runs_in_topological_order_not_declaration_order(tmp_path):
    nodes = {
        "serve": node(Serve, "serve", **{"in": {"cups": "milk2.cups"}}),
        "milk2": node(AddMilk, "milk2", **{"in": {"cups": "milk1.cups"}}),
        "milk1": node(AddMilk, "milk1", **{"in": {"cups": "brew.cups"}}),
        "brew": node(Brew, "brew"),
    }
    graph = graph_of(nodes)
    result = execute(graph, context(tmp_path))
    assert EVENTS == ["brew", "milk1", "milk2", "serve"]
    assert [t.node for t in result.trace] == EVENTS
    assert result.output("serve", "served")["cups"] == 3
    assert result.output("milk1", "cups") == 2


def test_independent_nodes_keep_declaration_order(tmp_path):
    nodes = {name: node(Brew, name) for name in ("zeta", "alpha", "mid")}
    execute(graph_of(nodes), context(tmp_path))
    assert EVENTS == ["zeta", "alpha", "mid"]


def test_graph_inputs_flow_to_ports(tmp_path):
    cfg = OmegaConf.create({"pipeline": {"name": "cafe", "inputs": {"cups": 5},
                                         "nodes": {"milk": node(AddMilk, **{"in": {"cups": "inputs.cups"}})}}})
    result = execute(build_graph(cfg), context(tmp_path))  # not instantiated: execute does it
    assert result.output("milk", "cups") == 6


# ---------------------------------------------------------------- conditions and skipped producers


def fallback_graph(first_passed: bool):
    return graph_of({
        "brew": {"stage": ref(Brew), "with": {"tag": "brew", "passed": first_passed, "cups": 2}},
        "rebrew": {"stage": ref(Brew), "with": {"tag": "rebrew", "cups": 7}, "when": "not brew.passed"},
        "milk": node(AddMilk, "milk", **{"in": {"cups": "rebrew.cups"}}),          # required input
        "serve": node(Serve, "serve", **{"in": {"cups": "rebrew.cups"}}),          # optional input
        "praise": node(Brew, "praise", when="brew.passed"),
    })


def test_when_not_runs_the_branch_when_the_condition_holds(tmp_path):
    result = execute(fallback_graph(first_passed=False), context(tmp_path))
    assert EVENTS == ["brew", "rebrew", "milk", "serve"]
    assert status(result) == {"brew": "ok", "rebrew": "ok", "milk": "ok", "serve": "ok", "praise": "skipped"}
    assert result.output("milk", "cups") == 8
    assert result.output("serve", "served")["cups"] == 7


def test_when_not_skips_the_branch_otherwise(tmp_path):
    result = execute(fallback_graph(first_passed=True), context(tmp_path))
    assert EVENTS == ["brew", "serve", "praise"]
    trace = {t.node: t for t in result.trace}
    assert trace["rebrew"].status == "skipped" and "brew.passed" in trace["rebrew"].reason
    # a consumer whose required input came from the skipped node is skipped too ...
    assert trace["milk"].status == "skipped" and "rebrew.cups" in trace["milk"].reason
    assert ("milk", "cups") not in result.values and ("rebrew", "cups") not in result.values
    # ... an optional input gets its default
    assert trace["serve"].status == "ok"
    assert result.output("serve", "served") == {"cups": -1, "sugar": 100, "failure": None,
                                                 "statuses": {"brew": "ok", "rebrew": "skipped", "milk": "skipped"}}


def test_when_on_a_skipped_condition_source_skips(tmp_path):
    graph = graph_of({
        "brew": {"stage": ref(Brew), "with": {"tag": "brew", "passed": True}},
        "rebrew": {"stage": ref(Brew), "with": {"tag": "rebrew", "passed": False}, "when": "not brew.passed"},
        "third": {"stage": ref(Brew), "with": {"tag": "third"}, "when": "not rebrew.passed"},
    })
    result = execute(graph, context(tmp_path))
    assert EVENTS == ["brew"]
    assert status(result) == {"brew": "ok", "rebrew": "skipped", "third": "skipped"}


# ---------------------------------------------------------------- failures, always-nodes, interrupts


def failing_graph(kind: str = "runtime", cleanup_fails: bool = False):
    nodes = {
        "brew": node(Brew, "brew"),
        "spill": {"stage": ref(Spill), "with": {"tag": "spill", "kind": kind}, "in": {"cups": "brew.cups"}},
        "milk": node(AddMilk, "milk", **{"in": {"cups": "spill.cups"}}),
        "late": node(Brew, "late"),
        "report": node(Serve, "report", always=True, **{"in": {"cups": "brew.cups"}}),
        "needs_spill": node(AddMilk, "needs_spill", always=True, **{"in": {"cups": "spill.cups"}}),
    }
    if cleanup_fails:
        nodes["cleanup"] = {"stage": ref(Spill), "with": {"tag": "cleanup"}, "always": True}
    return graph_of(nodes)


def test_always_nodes_run_after_a_failure_then_it_is_raised(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(StageFailed) as info:
        execute(failing_graph(), ctx)
    err = info.value
    assert err.node == "spill"
    assert "node 'spill'" in str(err) and "RuntimeError" in str(err) and "the cup cracked" in str(err)
    assert "\n" not in str(err)
    assert isinstance(err.error, RuntimeError) and err.__cause__ is err.error
    # non-always nodes after the failure did not run; the always node did, and saw the failure
    assert EVENTS == ["brew", "spill", "report"]
    assert ctx.statuses == {"brew": "ok", "spill": "failed", "milk": "skipped", "late": "skipped",
                            "report": "ok", "needs_spill": "skipped"}
    assert ctx.failure and "spill" in ctx.failure


def test_always_node_sees_the_failure(tmp_path):
    graph = failing_graph()
    seen = {}
    original = graph.nodes["report"].stage.run

    def spy(**kwargs):
        out = original(**kwargs)
        seen.update(out["served"])
        return out

    graph.nodes["report"].stage.run = spy
    with pytest.raises(StageFailed):
        execute(graph, context(tmp_path))
    assert seen["cups"] == 1 and "node 'spill'" in seen["failure"]
    assert seen["statuses"]["spill"] == "failed"


def test_first_failure_is_raised_when_a_cleanup_fails_too(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(StageFailed) as info:
        execute(failing_graph(cleanup_fails=True), ctx)
    assert info.value.node == "spill"
    assert ctx.statuses["cleanup"] == "failed" and ctx.statuses["report"] == "ok"


def test_keyboard_interrupt_propagates_after_always_nodes(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        execute(failing_graph(kind="interrupt"), ctx)
    assert EVENTS == ["brew", "spill", "report"]
    assert ctx.statuses["spill"] == "failed" and ctx.statuses["report"] == "ok"


@pytest.mark.parametrize("kind,fragment", [("bad_outputs", "mugs"), ("not_dict", "dict")])
def test_outputs_must_match_the_declaration(tmp_path, kind, fragment):
    with pytest.raises(StageFailed) as info:
        execute(failing_graph(kind=kind), context(tmp_path))
    assert info.value.node == "spill" and fragment in str(info.value)


# ---------------------------------------------------------------- trace


def test_trace_records_statuses_timings_and_outputs(tmp_path):
    graph = graph_of({
        "brew": {"stage": ref(Brew), "with": {"tag": "brew", "sleep": 0.05, "passed": False, "cups": 3}},
        "praise": node(Brew, "praise", when="brew.passed"),
        "milk": node(AddMilk, "milk", **{"in": {"cups": "brew.cups"}}),
    })
    ctx = context(tmp_path)
    result = execute(graph, ctx)
    rows = {row["node"]: row for row in result.trace_dict()}
    assert rows["brew"]["status"] == "ok" and rows["brew"]["seconds"] >= 0.05
    assert rows["brew"]["stage"].endswith("Brew")
    assert rows["brew"]["outputs"] == {"cups": 3, "passed": False}
    assert rows["praise"]["status"] == "skipped" and rows["praise"]["seconds"] == 0.0 and rows["praise"]["reason"]
    assert rows["milk"]["outputs"] == {"cups": 4}
    assert set(ctx.timings) == {"brew", "milk"} and ctx.timings["brew"] >= 0.05
    json.dumps(result.trace_dict())  # JSON-friendly


def test_run_config_writes_the_trace(tmp_path):
    cfg = OmegaConf.create({"pipeline": {"name": "cafe", "result": "milk.cups", "nodes": {
        "brew": node(Brew, "brew"), "milk": node(AddMilk, "milk", **{"in": {"cups": "brew.cups"}})}}})
    result = run_config(cfg, tmp_path / "run", ["brew.cups=1"])
    assert result.output("milk", "cups") == 2
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    assert trace["pipeline"] == "cafe" and trace["overrides"] == ["brew.cups=1"] and trace["failure"] is None
    assert [(n["node"], n["status"]) for n in trace["nodes"]] == [("brew", "ok"), ("milk", "ok")]


def test_run_config_writes_the_trace_on_failure(tmp_path):
    cfg = OmegaConf.create({"pipeline": {"name": "cafe", "nodes": {
        "brew": node(Brew, "brew"),
        "spill": node(Spill, "spill", **{"in": {"cups": "brew.cups"}}),
        "milk": node(AddMilk, "milk", **{"in": {"cups": "brew.cups"}}),
        "report": node(Serve, "report", always=True)}}})
    with pytest.raises(StageFailed):
        run_config(cfg, tmp_path / "run", [])
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    assert "spill" in trace["failure"] and "the cup cracked" in trace["failure"]
    assert {n["node"]: n["status"] for n in trace["nodes"]} == {"brew": "ok", "spill": "failed", "milk": "skipped",
                                                               "report": "ok"}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs procfs")
def test_peak_rss_is_the_process_own_not_its_parents():
    import subprocess
    import sys

    ballast = bytearray(800 * 2**20)  # make this (parent) process's peak clearly large
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    child = subprocess.run([sys.executable, "-c", "from pipeline.engine.execute import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    assert peak_rss_mb() > 800
    assert 0 < float(child.stdout) < 300  # ru_maxrss would report the parent's > 800 MB here
    del ballast


# ---------------------------------------------------------------- a failed run keeps its trace, not its values


class Ballast:
    """Stands for a model mix: its finaliser must run as soon as the run has failed (weights back, lock freed)."""

    released: list[str] = []

    def __init__(self, tag: str):
        weakref.finalize(self, Ballast.released.append, tag)


class Load(Stage):
    outputs = {"ballast": Ballast}

    def run(self) -> dict:
        return {"ballast": Ballast("loaded")}


class Crash(Stage):
    outputs = {"cups": int}

    def run(self, ballast: Ballast) -> dict:
        held = ballast  # noqa: F841 - a local of the failing frame, as a stage's own variables are
        raise ValueError("the ballast shifted")


def test_failure_keeps_the_result_but_releases_the_values_at_once(tmp_path):
    Ballast.released.clear()
    graph = graph_of({"load": node(Load), "crash": node(Crash, **{"in": {"ballast": "load.ballast"}}),
                      "report": node(Serve, "report", always=True)})
    ctx = context(tmp_path)
    with pytest.raises(StageFailed) as info:
        execute(graph, ctx)
    # the error is still alive here, and so is its result: the value it held is finalised all the same
    assert Ballast.released == ["loaded"]
    result = info.value.result
    assert result is ctx.result and result.values == {}
    assert (result.failed_node, result.failure) == ("crash", "node 'crash': ValueError: the ballast shifted")
    rows = {row["node"]: row for row in result.trace_dict()}
    assert rows["load"]["status"] == "ok" and rows["load"]["outputs"] == {"ballast": "Ballast"}
    assert rows["crash"]["status"] == "failed" and rows["crash"]["reason"] == "ValueError: the ballast shifted"
    assert rows["report"]["status"] == "ok"
    json.dumps(result.trace_dict())


def test_context_reads_the_one_record_of_the_run(tmp_path):
    ctx = context(tmp_path)
    with pytest.raises(StageFailed) as info:
        execute(failing_graph(), ctx)
    result = info.value.result
    assert ctx.result is result
    assert ctx.statuses == {t.node: t.status for t in result.trace}
    assert ctx.timings == {t.node: t.seconds for t in result.trace if t.status != "skipped"} != {}
    assert ctx.failure == result.failure == str(info.value)
    assert not {"timings", "statuses", "failure"} & {f.name for f in dataclasses.fields(RunContext)}


class Picky(Stage):
    outputs = {"cups": int}

    def precheck(self, cups: int) -> None:
        raise ValueError(f"{cups} cups is too many")

    def run(self, cups: int) -> dict:
        EVENTS.append("picky")
        return {"cups": cups}


def test_a_precheck_refusal_is_a_failed_node_that_did_not_run(tmp_path):
    graph = graph_of({"picky": node(Picky, **{"in": {"cups": "inputs.cups"}}),
                      "report": node(Serve, "report", always=True)}, inputs={"cups": 9})
    ctx = context(tmp_path)
    with pytest.raises(StageFailed) as info:
        execute(graph, ctx)
    assert EVENTS == ["report"] and info.value.node == "picky"
    rows = {t.node: t for t in info.value.result.trace}
    assert rows["picky"].status == "failed" and rows["picky"].reason == "precheck: ValueError: 9 cups is too many"
    assert ctx.statuses == {"picky": "failed", "report": "ok"} and set(ctx.timings) == {"report"}


def test_failed_run_trace_json_keeps_outputs_reason_and_node(tmp_path):
    cfg = OmegaConf.create({"pipeline": {"name": "cafe", "nodes": {
        "brew": {"stage": ref(Brew), "with": {"tag": "brew", "cups": 3}},
        "spill": node(Spill, "spill", **{"in": {"cups": "brew.cups"}}),
        "milk": node(AddMilk, "milk", **{"in": {"cups": "spill.cups"}}),
        "report": node(Serve, "report", always=True, **{"in": {"cups": "brew.cups"}})}}})
    with pytest.raises(StageFailed):
        run_config(cfg, tmp_path / "run", ["brew.cups=3"])
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    assert trace["failed_node"] == "spill" and trace["failure"] == "node 'spill': RuntimeError: the cup cracked"
    rows = {row["node"]: row for row in trace["nodes"]}
    assert rows["brew"]["outputs"] == {"cups": 3, "passed": True} and rows["brew"]["seconds"] >= 0
    assert rows["spill"]["status"] == "failed" and rows["spill"]["reason"] == "RuntimeError: the cup cracked"
    assert rows["milk"]["status"] == "skipped" and rows["milk"]["reason"] == "after failure of 'spill'"
    assert rows["report"]["status"] == "ok" and rows["report"]["outputs"] == {"served": "dict[4]"}


def test_an_optional_port_has_its_default_in_the_signature_only():
    ports = Serve.input_ports()
    assert {n: p.required for n, p in ports.items()} == {"cups": False, "sugar": False}
    assert {f.name for f in dataclasses.fields(type(ports["cups"]))} == {"name", "type", "required"}
