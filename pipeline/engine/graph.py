"""Composed config -> validated ``networkx.DiGraph`` of stage nodes.

The pipeline config (``cfg.pipeline``) declares:

    name: answer
    inputs: {program_root: ${program_root}, prompt: ${prompt}}   # graph inputs, port 'inputs.<name>'
    result: finish.text                                          # what the app prints
    nodes:
      select:                      # node name; its stage config lives at cfg.<config or name>
        config: select             # optional; defaults to the node name unless `stage` is given
        stage: stages.x.Y          # optional, replaces the config's _target_ (alone: a stage without config)
        with: {key: value}         # optional, merged over the config
        in: {index: index.index, prompt: inputs.prompt}
        when: not cite.passed      # optional: run only when that boolean output holds
        always: false              # run even after an earlier node failed (cleanup, telemetry)
        after: [decode]            # order-only dependencies (no data flows)

Everything is checked here, before any stage is instantiated or any model loads.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import pkgutil
from typing import Any

import networkx as nx
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.engine.errors import ConfigError
from pipeline.engine.stage import Stage, check_config, type_fits, type_name

INPUTS = "inputs"
NODE_KEYS = {"config", "stage", "with", "in", "when", "always", "after"}


log = logging.getLogger(__name__)

@dataclasses.dataclass
class Node:
    name: str
    stage_cls: type[Stage]
    config: dict[str, Any]
    wires: dict[str, tuple[str, str]]
    when: tuple[str, str, bool] | None = None  # (node, port, expected truth value)
    always: bool = False
    after: list[str] = dataclasses.field(default_factory=list)
    stage: Stage | None = None

    @property
    def target(self) -> str:
        return f"{self.stage_cls.__module__}.{self.stage_cls.__qualname__}"

    @property
    def instance(self) -> Stage:
        """The stage object (``Graph.instantiate`` made it)."""
        if self.stage is None:
            raise RuntimeError(f"node '{self.name}': the graph was not instantiated")
        return self.stage


@dataclasses.dataclass
class Graph:
    name: str
    nodes: dict[str, Node]
    inputs: dict[str, Any]
    dag: nx.DiGraph
    result: tuple[str, str] | None

    @property
    def order(self) -> list[str]:
        position = {name: i for i, name in enumerate(self.nodes)}
        return list(nx.lexicographical_topological_sort(self.dag, key=lambda n: position.get(n, -1)))

    def instantiate(self) -> Graph:
        """Construct every stage (cheap by contract: stages load heavy things lazily in ``run``)."""
        for node in self.nodes.values():
            try:
                node.stage = node.stage_cls(**node.config)
            except ConfigError as err:
                raise ConfigError(f"node '{node.name}': {err}") from err
        return self


def build_graph(cfg: DictConfig) -> Graph:
    """Compose the graph declared at ``cfg.pipeline`` and validate it completely."""
    if "pipeline" not in cfg or not isinstance(cfg.pipeline, DictConfig):
        raise ConfigError("config has no 'pipeline' mapping; choose one with pipeline=<name>")
    spec = cfg.pipeline
    name = str(spec.get("name", "pipeline"))
    raw_nodes = spec.get("nodes")
    if not isinstance(raw_nodes, DictConfig) or not raw_nodes:
        raise ConfigError(f"pipeline '{name}': 'nodes' must be a non-empty mapping")
    inputs = _resolve(spec.get("inputs") or {}, f"pipeline '{name}' inputs")
    packages = list(spec.get("stage_packages") or [])

    nodes: dict[str, Node] = {}
    for node_name, node_spec in raw_nodes.items():
        nodes[node_name] = _make_node(cfg, str(node_name), node_spec, packages)

    dag = nx.DiGraph()
    dag.add_node(INPUTS)
    dag.add_nodes_from(nodes)
    for node in nodes.values():
        _check_wiring(node, nodes, inputs)
        for port, (src, src_port) in node.wires.items():
            dag.add_edge(src, node.name, ports=[*dag.get_edge_data(src, node.name, {}).get("ports", []), (src_port, port)])
        if node.when:
            dag.add_edge(node.when[0], node.name, **{"condition": True})
        for before in node.after:
            if before not in nodes:
                raise ConfigError(f"node '{node.name}' after: unknown node '{before}'; nodes: {', '.join(nodes)}")
            dag.add_edge(before, node.name, order=True)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
        raise ConfigError(f"pipeline '{name}': cycle {path}")

    result = None
    if spec.get("result"):
        result = _parse_ref(str(spec.result), "pipeline result")
        _check_source(result, nodes, inputs, f"pipeline '{name}' result")
    return Graph(name, nodes, inputs, dag, result)


def _resolve(value: Any, owner: str) -> Any:
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        try:
            return OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{owner}: {str(err).splitlines()[0]}") from err
    return value


def _make_node(cfg: DictConfig, name: str, spec: Any, packages: list[str]) -> Node:
    if spec is None:
        spec = OmegaConf.create({})
    if not isinstance(spec, DictConfig):
        raise ConfigError(f"node '{name}': must be a mapping with keys {', '.join(sorted(NODE_KEYS))}")
    extra = sorted(set(spec) - NODE_KEYS)
    if extra:
        raise ConfigError(f"node '{name}': unknown key '{extra[0]}'; node keys: {', '.join(sorted(NODE_KEYS))}")
    config_key = str(spec.get("config") or ("" if spec.get("stage") else name))
    config = {}
    if config_key and config_key in cfg and cfg[config_key] is not None:
        config = _resolve(cfg[config_key], f"node '{name}' config '{config_key}'")
        if not isinstance(config, dict):
            raise ConfigError(f"node '{name}': config '{config_key}' must be a mapping, got {config!r}")
    elif not spec.get("stage"):
        raise ConfigError(f"node '{name}': no config '{config_key}' and no 'stage' to run")
    config = dict(config)
    target = spec.get("stage") or config.get("_target_")
    config.pop("_target_", None)
    if not target:
        raise ConfigError(f"node '{name}': config '{config_key}' has no _target_ naming its stage")
    config.update(_resolve(spec.get("with") or {}, f"node '{name}' with"))
    stage_cls = resolve_stage(str(target), packages, owner=f"node '{name}'")
    check_config(f"node '{name}'", stage_cls, config)

    wires = {}
    for port, ref in (_resolve(spec.get("in") or {}, f"node '{name}' in")).items():
        wires[str(port)] = _parse_ref(str(ref), f"node '{name}' input '{port}'")
    when = None
    if spec.get("when"):
        text = str(spec.when).strip()
        expect = True
        if text.startswith("not "):
            expect, text = False, text[4:].strip()
        src, port = _parse_ref(text, f"node '{name}' when")
        when = (src, port, expect)
    after = [str(n) for n in (_resolve(spec.get("after") or [], f"node '{name}' after"))]
    return Node(name, stage_cls, config, wires, when, bool(spec.get("always", False)), after)


def _parse_ref(ref: str, owner: str) -> tuple[str, str]:
    if ref.count(".") != 1 or not all(ref.split(".")):
        raise ConfigError(f"{owner}: '{ref}' must look like <node>.<output>")
    node, port = ref.split(".")
    return node, port


def _check_source(ref: tuple[str, str], nodes: dict[str, Node], inputs: dict[str, Any], owner: str) -> Any:
    """Return the declared type of the referenced output, or raise naming what exists."""
    src, port = ref
    if src == INPUTS:
        if port not in inputs:
            raise ConfigError(f"{owner}: graph input '{port}' does not exist; inputs: {', '.join(inputs) or '(none)'}")
        return type(inputs[port])  # null is NoneType: only a port that accepts None takes it
    if src not in nodes:
        close = difflib.get_close_matches(src, list(nodes), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{owner}: unknown node '{src}'{hint}; nodes: {', '.join(nodes)}")
    outputs = nodes[src].stage_cls.outputs
    if port not in outputs:
        raise ConfigError(
            f"{owner}: node '{src}' has no output '{port}'; outputs of {nodes[src].stage_cls.__name__}: "
            f"{', '.join(outputs) or '(none)'}"
        )
    return outputs[port]


def _check_wiring(node: Node, nodes: dict[str, Node], inputs: dict[str, Any]) -> None:
    ports = node.stage_cls.input_ports()
    for port, ref in node.wires.items():
        owner = f"node '{node.name}' input '{port}'"
        if port not in ports:
            raise ConfigError(
                f"node '{node.name}': {node.stage_cls.__name__} has no input '{port}'; inputs: {', '.join(ports) or '(none)'}"
            )
        produced = _check_source(ref, nodes, inputs, owner)
        accepted = ports[port].type
        if ref[0] == INPUTS and inputs[ref[1]] is None and not type_fits(produced, accepted):
            raise ConfigError(f"{ref[1]} is null, but node '{node.name}' needs a {type_name(accepted)}: "
                              f"set {ref[1]}=<value>")
        if not type_fits(produced, accepted):
            raise ConfigError(
                f"{owner}: type mismatch, {ref[0]}.{ref[1]} produces {type_name(produced)} "
                f"but {node.stage_cls.__name__}.run accepts {type_name(accepted)}"
            )
    for spec in ports.values():
        if spec.required and spec.name not in node.wires:
            raise ConfigError(
                f"node '{node.name}': required input '{spec.name}' ({type_name(spec.type)}) is not wired; "
                f"add it under in: {{{spec.name}: <node>.<output>}}"
            )
    if node.when:
        produced = _check_source(node.when[:2], nodes, inputs, f"node '{node.name}' when")
        if produced is not bool:
            raise ConfigError(
                f"node '{node.name}' when: {node.when[0]}.{node.when[1]} is {type_name(produced)}, a condition needs bool"
            )


def resolve_stage(target: str, packages: list[str], owner: str) -> type[Stage]:
    """Import a ``_target_`` path, or look a bare class name up among the stage packages."""
    if "." not in target:
        known = discover_stages(packages)
        if target in known:
            return known[target]
        raise ConfigError(f"{owner}: unknown stage '{target}'{_suggest(target, list(known))}")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        known = discover_stages(packages)
        raise ConfigError(
            f"{owner}: unknown stage '{target}' (no module '{err.name}'){_suggest(attr, list(known))}"
        ) from err
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        here = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Stage) and v is not Stage)
        raise ConfigError(
            f"{owner}: unknown stage '{target}'; stages in {module_name}: {', '.join(here) or '(none)'}"
        )
    return cls


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        return f"; did you mean {', '.join(close)}?"
    return f"; registered stages: {', '.join(sorted(known))}" if known else ""



def discover_stages(packages: list[str]) -> dict[str, type[Stage]]:
    """Every Stage subclass defined in the given packages, by class name (the 'registered names')."""
    found: dict[str, type[Stage]] = {}
    for package_name in packages:
        package = importlib.import_module(package_name)
        modules = [package]
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            modules.append(importlib.import_module(info.name))
        for module in modules:
            for value in vars(module).values():
                if isinstance(value, type) and issubclass(value, Stage) and value is not Stage and value.__module__ == module.__name__:
                    found[value.__name__] = value
    return found
