"""Every validation failure of `build_graph` names the culprit (node, port or key) and the available choices.

Two kinds of configs: the project's own, composed with Hydra overrides (what a user types), and small
hand-written graphs of toy stages from another domain (the framework is domain-free).
"""
from __future__ import annotations

import dataclasses
import re
import textwrap
from typing import Annotated, Literal

import pytest
from omegaconf import OmegaConf

from pipeline.engine.errors import ConfigError
from pipeline.engine.graph import build_graph
from pipeline.engine.stage import Range, Stage

# ---------------------------------------------------------------- toy stages (a weather station, not code QA)

INSTANTIATED: list[str] = []


class Thermometer(Stage):
    outputs = {"readings": list[float], "calibrated": bool, "station": str}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        samples: Annotated[int, Range(ge=1, le=1000)] = 3
        station: str = "north"
        unit: Literal["C", "F"] = "C"
        offset: float = 0.0

    def __init__(self, **settings):
        INSTANTIATED.append("Thermometer")
        super().__init__(**settings)

    def run(self, start: float = 10.0) -> dict:
        c = self.config
        return {"readings": [start + i + c.offset for i in range(c.samples)], "calibrated": True,
                "station": c.station}


class Average(Stage):
    outputs = {"mean": float, "count": int}

    def run(self, readings: list[float]) -> dict:
        return {"mean": sum(readings) / len(readings), "count": len(readings)}


class Alert(Stage):
    outputs = {"message": str, "raised": bool}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        threshold: float = 30.0

    def run(self, mean: float, station: str = "?", note: str | None = None) -> dict:
        return {"message": f"{station}: {mean:.1f}", "raised": mean > self.config.threshold}


class Counter(Stage):
    outputs = {"labels": list[str]}

    def run(self, count: int) -> dict:
        return {"labels": [str(i) for i in range(count)]}


class Tally(Stage):
    outputs = {"total": int}

    def run(self, labels: list[int]) -> dict:  # wants ints, Counter makes strings
        return {"total": sum(labels)}


class NotAStage:
    outputs: dict = {}


def ref(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def toy(nodes: dict, inputs: dict | None = None, configs: dict | None = None, **pipeline) -> OmegaConf:
    return OmegaConf.create({"pipeline": {"name": "weather", "inputs": inputs or {}, "nodes": nodes, **pipeline},
                             **(configs or {})})


def station_nodes() -> dict:
    return {
        "thermo": {"stage": ref(Thermometer), "in": {"start": "inputs.start"}},
        "average": {"stage": ref(Average), "in": {"readings": "thermo.readings"}},
        "alert": {"stage": ref(Alert), "in": {"mean": "average.mean", "station": "thermo.station"}},
    }


def raises_config_error(cfg, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        build_graph(cfg)
    message = str(info.value)
    assert "\n" not in message, "validation errors are one line"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- toy graphs


def test_toy_graph_validates_and_orders():
    graph = build_graph(toy(station_nodes(), inputs={"start": 12.5}))
    assert graph.order == ["inputs", "thermo", "average", "alert"]
    assert graph.nodes["alert"].wires == {"mean": ("average", "mean"), "station": ("thermo", "station")}


def test_validation_instantiates_nothing():
    """Everything is checked before any stage is constructed (stages may load heavy things)."""
    INSTANTIATED.clear()
    nodes = station_nodes()
    nodes["alert"]["in"]["mean"] = "average.median"
    with pytest.raises(ConfigError):
        build_graph(toy(nodes, inputs={"start": 1.0}))
    build_graph(toy(station_nodes(), inputs={"start": 1.0}))
    assert INSTANTIATED == []


def test_stage_config_from_top_level_key_and_with():
    nodes = station_nodes()
    nodes["thermo"] = {"config": "sensor", "with": {"samples": 5}, "in": {"start": "inputs.start"}}
    cfg = toy(nodes, inputs={"start": 0.0}, configs={"sensor": {"_target_": ref(Thermometer), "station": "south"}})
    graph = build_graph(cfg)
    assert graph.nodes["thermo"].stage_cls is Thermometer
    assert graph.nodes["thermo"].config == {"station": "south", "samples": 5}


def test_unknown_stage_module():
    nodes = station_nodes()
    nodes["average"]["stage"] = "weather_nowhere.stations.Average"
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'average'", "weather_nowhere.stations.Average",
                        "no module 'weather_nowhere'")


def test_unknown_stage_class_lists_the_stages_of_its_module():
    nodes = station_nodes()
    nodes["average"]["stage"] = f"{Average.__module__}.Averag"
    message = raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'average'", "Averag", "stages in")
    for choice in ("Average", "Thermometer", "Alert", "Counter", "Tally"):
        assert choice in message
    assert "NotAStage" not in message


def test_target_that_is_not_a_stage():
    nodes = station_nodes()
    nodes["average"]["stage"] = ref(NotAStage)
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'average'", "NotAStage")


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """A stage package `weatherstages` importable from tmp_path, for bare registered names."""
    package = tmp_path / "weatherstages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sensors.py").write_text(textwrap.dedent("""
        from pipeline.engine.stage import Stage

        class Barometer(Stage):
            outputs = {"pressure": float}
            def run(self) -> dict:
                return {"pressure": 1013.25}

        class Hygrometer(Stage):
            outputs = {"humidity": float}
            def run(self) -> dict:
                return {"humidity": 0.4}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "weatherstages"
    import sys

    for name in [n for n in sys.modules if n == "weatherstages" or n.startswith("weatherstages.")]:
        del sys.modules[name]


def test_bare_registered_name_resolves(toy_package):
    cfg = toy({"baro": {"stage": "Barometer"}}, stage_packages=[toy_package])
    assert build_graph(cfg).nodes["baro"].stage_cls.__name__ == "Barometer"


def test_misspelled_registered_name_gets_close_matches(toy_package):
    cfg = toy({"baro": {"stage": "Barometr"}}, stage_packages=[toy_package])
    message = raises_config_error(cfg, "node 'baro'", "unknown stage 'Barometr'", "did you mean")
    assert "Barometer" in message


def test_unrelated_registered_name_lists_all_registered(toy_package):
    cfg = toy({"baro": {"stage": "Zqxjk"}}, stage_packages=[toy_package])
    raises_config_error(cfg, "node 'baro'", "'Zqxjk'", "Barometer", "Hygrometer")


def test_unknown_input_port_lists_the_inputs():
    nodes = station_nodes()
    nodes["alert"]["in"]["meen"] = "average.mean"
    message = raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert'", "'meen'", "inputs:")
    for port in ("mean", "station", "note"):
        assert port in message.split("inputs:")[1]


def test_missing_required_input():
    nodes = station_nodes()
    del nodes["alert"]["in"]["mean"]
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert'", "required input 'mean'", "float")


def test_optional_inputs_need_no_wire():
    nodes = station_nodes()
    del nodes["alert"]["in"]["station"]
    del nodes["thermo"]["in"]
    build_graph(toy(nodes))


def test_reference_to_an_output_the_node_does_not_produce_lists_its_outputs():
    nodes = station_nodes()
    nodes["alert"]["in"]["mean"] = "average.median"
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert' input 'mean'", "no output 'median'",
                        "mean", "count")


def test_reference_to_an_unknown_node_lists_the_nodes_and_close_matches():
    nodes = station_nodes()
    nodes["alert"]["in"]["mean"] = "averag.mean"
    message = raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert' input 'mean'",
                                  "unknown node 'averag'", "did you mean average")
    assert "thermo" in message and "alert" in message


def test_reference_to_an_unknown_graph_input_lists_the_inputs():
    raises_config_error(toy(station_nodes(), inputs={"begin": 1.0}), "node 'thermo' input 'start'",
                        "graph input 'start'", "begin")


def test_malformed_reference():
    nodes = station_nodes()
    nodes["alert"]["in"]["mean"] = "average"
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert' input 'mean'", "<node>.<output>")


def test_type_mismatch_names_both_types():
    nodes = station_nodes()
    nodes["alert"]["in"]["mean"] = "thermo.station"  # str into float
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert' input 'mean'", "type mismatch",
                        "thermo.station", "str", "float")


def test_type_mismatch_inside_a_generic():
    nodes = {
        "thermo": {"stage": ref(Thermometer)},
        "average": {"stage": ref(Average), "in": {"readings": "thermo.readings"}},
        "counter": {"stage": ref(Counter), "in": {"count": "average.count"}},
        "tally": {"stage": ref(Tally), "in": {"labels": "counter.labels"}},
    }
    raises_config_error(toy(nodes), "node 'tally' input 'labels'", "list[str]", "list[int]")


def test_compatible_types_pass():
    """int feeds float (numeric tower), X feeds `X | None`, a graph input's Python type is its type."""
    nodes = station_nodes()
    nodes["alert"]["in"]["mean"] = "average.count"  # int -> float
    nodes["alert"]["in"]["note"] = "thermo.station"  # str -> str | None
    build_graph(toy(nodes, inputs={"start": 3}))  # int input -> float port


def test_graph_input_type_mismatch():
    raises_config_error(toy(station_nodes(), inputs={"start": "warm"}), "node 'thermo' input 'start'", "str",
                        "float")


def test_cycle_is_reported_with_its_path():
    nodes = {
        "thermo": {"stage": ref(Thermometer), "in": {"start": "average.mean"}},
        "average": {"stage": ref(Average), "in": {"readings": "thermo.readings"}},
        "alert": {"stage": ref(Alert), "in": {"mean": "average.mean"}},
    }
    message = raises_config_error(toy(nodes), "cycle")
    hops = [h.strip() for h in message.split("cycle", 1)[1].split("->")]
    assert hops[0] == hops[-1] and set(hops) == {"thermo", "average"}


def test_self_loop_is_a_cycle():
    nodes = {"average": {"stage": ref(Average), "in": {"readings": "thermo.readings"}},
             "thermo": {"stage": ref(Thermometer), "in": {"start": "thermo.offset_unused"}}}
    # a reference to its own missing output is caught first ...
    raises_config_error(toy(nodes), "node 'thermo'", "no output 'offset_unused'")
    # ... and a real self-loop is a cycle
    nodes["thermo"] = {"stage": ref(Thermometer), "when": "thermo.calibrated"}
    raises_config_error(toy(nodes), "cycle", "thermo")


def test_condition_cycle_is_a_cycle():
    nodes = station_nodes()
    nodes["thermo"]["when"] = "not alert.raised"
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "cycle")


def test_config_key_not_accepted_lists_accepted_keys():
    nodes = station_nodes()
    nodes["thermo"]["with"] = {"samplez": 4}
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'thermo'", "'samplez'",
                        "accepted: offset, samples, station, unit")


def test_config_key_on_a_stage_without_config():
    nodes = station_nodes()
    nodes["average"]["with"] = {"window": 3}
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'average'", "'window'", "accepted: (none)")


@pytest.mark.parametrize("key,value,fragments", [
    ("samples", "many", ["'samples'", "integer", "'many'"]),
    ("samples", 2.5, ["'samples'", "integer", "2.5"]),
    ("samples", True, ["'samples'", "integer"]),
    ("offset", "hot", ["'offset'", "number", "'hot'"]),
    ("station", 7, ["'station'", "string", "7"]),
    ("unit", "K", ["'unit'", "'C'", "'F'", "'K'"]),
    ("samples", 0, ["'samples'", ">= 1", "0"]),
    ("samples", 5000, ["'samples'", "<= 1000", "5000"]),
])
def test_config_value_type_and_range(key, value, fragments):
    nodes = station_nodes()
    nodes["thermo"]["with"] = {key: value}
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'thermo'", *fragments)


def test_when_on_a_non_bool_output():
    nodes = station_nodes()
    nodes["alert"]["when"] = "average.count"
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert'", "when", "average.count", "int", "bool")


def test_when_on_a_bool_output_passes():
    nodes = station_nodes()
    nodes["alert"]["when"] = "not thermo.calibrated"
    graph = build_graph(toy(nodes, inputs={"start": 1.0}))
    assert graph.nodes["alert"].when == ("thermo", "calibrated", False)


def test_when_on_an_unknown_output():
    nodes = station_nodes()
    nodes["alert"]["when"] = "thermo.calibrate"
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert' when", "no output 'calibrate'",
                        "calibrated")


def test_unknown_node_key_lists_node_keys():
    nodes = station_nodes()
    nodes["alert"]["wen"] = "thermo.calibrated"
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'alert'", "'wen'", "always", "config", "in",
                        "stage", "when", "with")


def test_node_without_config_or_stage():
    nodes = station_nodes()
    nodes["average"] = {"in": {"readings": "thermo.readings"}}
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'average'", "stage")


def test_config_without_target():
    nodes = station_nodes()
    nodes["average"] = {"config": "avg", "in": {"readings": "thermo.readings"}}
    raises_config_error(toy(nodes, inputs={"start": 1.0}, configs={"avg": {"window": 3}}), "node 'average'",
                        "_target_")


def test_result_must_exist():
    raises_config_error(toy(station_nodes(), inputs={"start": 1.0}, result="alert.text"), "result",
                        "no output 'text'", "message", "raised")


def test_empty_pipeline():
    raises_config_error(OmegaConf.create({"pipeline": {"name": "weather", "nodes": {}}}), "nodes")
    raises_config_error(OmegaConf.create({"other": 1}), "pipeline")


def test_order_only_dependency():
    nodes = station_nodes()
    nodes["late"] = {"stage": ref(Thermometer)}
    nodes["early"] = {"stage": ref(Thermometer), "after": ["late"]}
    graph = build_graph(toy(nodes, inputs={"start": 1.0}))
    assert graph.order.index("late") < graph.order.index("early")
    nodes["early"]["after"] = ["latte"]
    raises_config_error(toy(nodes, inputs={"start": 1.0}), "node 'early'", "after", "'latte'", "late")


# ---------------------------------------------------------------- the project's config, through Hydra overrides


def test_composed_unknown_stage_module(compose):
    message = raises_config_error(compose("select._target_=stages.nope.QuestionSelect"), "node 'select'",
                                  "stages.nope.QuestionSelect", "no module 'stages.nope'")
    assert "QuestionSelect" in message.split("no module")[1]  # suggests the registered one


def test_composed_unknown_stage_class(compose):
    raises_config_error(compose("select._target_=stages.select.Nope"), "node 'select'", "stages.select.Nope",
                        "QuestionSelect", "ZoomSelect")


def test_composed_misspelled_bare_name(compose):
    raises_config_error(compose("select._target_=QuestionSelec"), "node 'select'", "'QuestionSelec'",
                        "did you mean", "QuestionSelect")


def test_composed_unknown_input_port(compose):
    raises_config_error(compose("++pipeline.nodes.rerank.in.selectio=select.selection"), "node 'rerank'",
                        "'selectio'", "selection", "prompt", "index")


def test_composed_missing_required_input(compose):
    raises_config_error(compose("~pipeline.nodes.rerank.in.prompt"), "node 'rerank'", "required input 'prompt'")


def test_composed_output_not_produced(compose):
    message = raises_config_error(compose("++pipeline.nodes.rerank.in.selection=select.selectio"),
                                  "node 'rerank' input 'selection'", "node 'select'", "no output 'selectio'")
    assert re.search(r"outputs of \w+: .*selection", message)


def test_composed_unknown_node(compose):
    message = raises_config_error(compose("++pipeline.nodes.rerank.in.selection=nope.selection"),
                                  "node 'rerank' input 'selection'", "unknown node 'nope'", "nodes:")
    for name in ("index", "select", "rerank"):
        assert name in message.split("nodes:")[1]


def test_composed_type_mismatch(compose):
    raises_config_error(compose("++pipeline.nodes.rerank.in.selection=index.index"),
                        "node 'rerank' input 'selection'", "type mismatch", "ProgramIndex", "Selection")


def test_composed_cycle(compose):
    # select runs only when the citation check passed, but the check depends on select: a cycle
    message = raises_config_error(compose("++pipeline.nodes.select.when=cite.passed"), "cycle")
    assert "select" in message and "cite" in message


def test_composed_unaccepted_key(compose):
    message = raises_config_error(compose("+select.foo=1"), "node 'select'", "'foo'", "accepted:")
    assert "top_k" in message


@pytest.mark.parametrize("override,fragments", [
    ("select.top_k=abc", ["node 'select'", "'top_k'", "integer", "'abc'"]),
    ("select.top_k=1.5", ["node 'select'", "'top_k'", "integer"]),
    ("decode.do_sample=1", ["node 'decode'", "'do_sample'", "true or false"]),
    ("model.dtype=float64", ["node 'model'", "'dtype'", "'float32'", "'float16'", "'bfloat16'"]),
    ("repair.code=delete", ["node 'repair'", "'code'", "'drop'", "'mark'", "'keep'"]),
    ("repair.labels=fix", ["node 'repair'", "'labels'", "'mark'", "'keep'"]),
    ("index.ignore=.git", ["node 'index'", "'ignore'", "list"]),
])
def test_composed_wrong_value_type(compose, override, fragments):
    raises_config_error(compose(override), *fragments)


@pytest.mark.parametrize("override,fragments", [
    ("select.top_k=0", ["node 'select'", "'top_k'", ">= 1", "0"]),
    ("pack.context_tokens=0", ["node 'pack'", "'context_tokens'", ">= 1", "0"]),
    ("decode.max_new_tokens=0", ["node 'decode'", "'max_new_tokens'", ">= 1"]),
    ("decode.top_p=1.5", ["node 'decode'", "'top_p'", "<= 1"]),
    ("repair.threshold=-0.1", ["node 'repair'", "'threshold'", ">= 0"]),
])
def test_composed_out_of_range(compose, override, fragments):
    raises_config_error(compose(override), *fragments)


def test_composed_when_on_non_bool(compose):
    raises_config_error(compose("++pipeline.nodes.rerank.when=select.selection"), "node 'rerank'", "when",
                        "select.selection", "Selection", "bool")
