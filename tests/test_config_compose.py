"""Every config in conf/ composes, validates and instantiates (docs/behaviour.md §0; groups discovered from the folders)."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_config
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from pipeline.engine.errors import ConfigError
from pipeline.engine.graph import INPUTS, build_graph, resolve_stage

# Values for keys a config marks mandatory (`???`); any other mandatory key gets a string placeholder.
MANDATORY_VALUES = {
    "select.zoom_symbol": "build_graph",
    "model.id": "/nonexistent/checkpoint",
}


def discover_options() -> list[tuple[str, str]]:
    """(group, option) for every yaml file under a sub-folder of conf/ (nested groups as a/b)."""
    found = []
    for path in sorted(Path(CONF_DIR).rglob("*.yaml")):
        rel = path.relative_to(CONF_DIR)
        if len(rel.parts) < 2:
            continue  # a primary config
        group = "/".join(rel.parts[:-1])
        if group.split("/")[0] == "hydra":
            continue  # Hydra's own groups (launchers, loggers) do not declare stages
        found.append((group, path.stem))
    return found


OPTIONS = discover_options()
PRIMARIES = sorted(p.stem for p in Path(CONF_DIR).glob("*.yaml"))


@functools.cache
def choices_of(primary: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(primary, return_hydra_config=True)
    return dict(cfg.hydra.runtime.choices)


def primary_for(group: str, option: str) -> str:
    """The primary config that selects this option (an app's own config, e.g. export.yaml for pipeline=export),
    else the default `config`."""
    for primary in ["config", *PRIMARIES]:
        if choices_of(primary).get(group) == option:
            return primary
    return "config"


@functools.cache
def _composed(primary: str, overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(primary, overrides=list(overrides))


def compose_primary(primary: str, *overrides: str):
    """Composed once per parameter set (several tests compose the same option), a fresh copy for each caller."""
    return copy.deepcopy(_composed(primary, overrides))


def missing_keys(node, prefix: str) -> list[str]:
    """Dotted keys under ``node`` whose value is mandatory (`???`) and not supplied."""
    out = []
    if not isinstance(node, DictConfig):
        return out
    for key in node.keys():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            out.append(dotted)
        else:
            value = node._get_node(key)
            if isinstance(value, DictConfig):
                out.extend(missing_keys(value, dotted))
    return out


def supply(keys: list[str]) -> list[str]:
    return [f"{k}={MANDATORY_VALUES.get(k, 'placeholder')}" for k in keys]


def mandatory_overrides(group: str, option: str, primary: str = "config") -> list[str]:
    cfg = compose_primary(primary, f"{group}={option}" if group in choices_of(primary) else f"+{group}={option}")
    return supply(missing_keys(cfg, ""))


def test_groups_are_discovered():
    groups = {g for g, _ in OPTIONS}
    # the swappable steps of the answer graph that exist today must be among them
    assert {"pipeline", "model", "index", "select", "rerank", "pack", "scaffold", "decode", "cite",
            "repair", "telemetry"} <= groups
    assert ("select", "zoom") in OPTIONS and ("model", "tiny_random") in OPTIONS


def test_default_config_builds_and_instantiates():
    cfg = compose_config()
    graph = build_graph(cfg).instantiate()
    assert graph.nodes and all(node.stage is not None for node in graph.nodes.values())
    assert graph.order[0] == INPUTS
    # every wire and every condition points backwards in the execution order
    position = {name: i for i, name in enumerate(graph.order)}
    for node in graph.nodes.values():
        for src, _ in node.wires.values():
            assert position[src] < position[node.name], (src, node.name)
        if node.when:
            assert position[node.when[0]] < position[node.name]
    result_node, _ = graph.result
    assert result_node in graph.nodes


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(group, option):
    primary = primary_for(group, option)
    # a group outside the defaults list (e.g. experiment=..., a `@package _global_` preset) is appended with +
    choice = f"{group}={option}" if group in choices_of(primary) else f"+{group}={option}"
    cfg = compose_primary(primary, choice)
    missing = missing_keys(cfg, "")
    if missing:
        cfg = compose_primary(primary, choice, *supply(missing))
    graph = build_graph(cfg).instantiate()
    assert all(node.stage is not None for node in graph.nodes.values())

    # the option's stage is what the nodes that read this group's config actually run
    group_cfg = OmegaConf.select(cfg, group.replace("/", "."))
    if not isinstance(group_cfg, DictConfig) or "_target_" not in group_cfg:
        return
    expected = resolve_stage(str(group_cfg._target_), list(cfg.pipeline.get("stage_packages") or []), owner="test")
    users = [name for name, spec in cfg.pipeline.nodes.items()
             if str((spec or {}).get("config") or name) == group.replace("/", ".") and not (spec or {}).get("stage")]
    declared = {k: v for k, v in OmegaConf.to_container(group_cfg, resolve=True).items() if k != "_target_"}
    for name in users:
        assert graph.nodes[name].stage_cls is expected, (name, graph.nodes[name].stage_cls, expected)
        # the node's config is the group's config (minus _target_), with the node's `with:` merged over it
        merged = {**declared, **dict((cfg.pipeline.nodes[name] or {}).get("with") or {})}
        assert graph.nodes[name].config == merged, name


@pytest.mark.parametrize("primary", PRIMARIES)
def test_every_primary_config_composes_and_validates(primary):
    """conf/*.yaml: the apps' configs (config, build, export, ...); those that declare a pipeline build it."""
    cfg = compose_primary(primary)
    cfg = compose_primary(primary, *supply([k for k in missing_keys(cfg, "") if not k.startswith("hydra.")]))
    if "pipeline" not in cfg:
        return  # a data file such as api.yaml
    graph = build_graph(cfg).instantiate()
    assert graph.nodes and graph.name == cfg.pipeline.name


def test_mandatory_values_are_detected():
    """The helper above must find the `???` keys, else the parametrized test would not supply them."""
    assert "select.zoom_symbol=build_graph" in mandatory_overrides("select", "zoom")
    assert "model.id=/nonexistent/checkpoint" in mandatory_overrides("model", "hf")


@pytest.mark.parametrize("group,option,key", [("select", "zoom", "zoom_symbol"), ("model", "hf", "id")])
def test_missing_mandatory_value_is_a_config_error(group, option, key):
    cfg = compose_config(f"{group}={option}")
    with pytest.raises(ConfigError) as info:
        build_graph(cfg)
    message = str(info.value)
    assert key in message and group in message


def test_with_overrides_are_merged_and_checked():
    """`with:` of a node is merged over the config it reads (scaffold_retry = scaffold + strong, attempt 2)."""
    graph = build_graph(compose_config())
    assert graph.nodes["scaffold_retry"].config["scaffold"] == "strong"
    assert graph.nodes["scaffold_retry"].config["attempt"] == 2
    assert graph.nodes["scaffold"].config["scaffold"] == "standard"
    with pytest.raises(ConfigError, match=r"scaffold_retry.*scaffold.*'standard', 'strong'"):
        build_graph(compose_config("pipeline.nodes.scaffold_retry.with.scaffold=loud"))


def test_command_line_knobs_reach_the_stage():
    graph = build_graph(compose_config("select.top_k=3", "decode.max_new_tokens=17", "rerank=none")).instantiate()
    assert graph.nodes["select"].stage.config.top_k == 3
    assert graph.nodes["decode"].stage.config.max_new_tokens == 17
    assert graph.nodes["decode_retry"].stage.config.max_new_tokens == 17  # reads the same config
    assert graph.nodes["rerank"].stage_cls.__name__ == "NoRerank"


def test_min_citations_zero_is_accepted_everywhere_it_flows():
    """0 (no citation required) passes every Range check and reaches both checks and both prompts."""
    graph = build_graph(compose_config("cite.min_citations=0")).instantiate()
    flows = [n for n in ("cite", "cite_retry", "scaffold", "scaffold_retry") if n in graph.nodes]
    assert flows == ["cite", "cite_retry", "scaffold", "scaffold_retry"]
    assert [graph.nodes[n].stage.config.min_citations for n in flows] == [0, 0, 0, 0]
    with pytest.raises(ConfigError, match="min_citations"):
        build_graph(compose_config("cite.min_citations=-1")).instantiate()
