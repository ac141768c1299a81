"""Graphs reuse graphs (issue 16, item 5): the query -> select -> rerank -> capacity -> targets -> sub block is written once,
in conf/pipeline/region.yaml, and every graph that conditions the model on a region includes it via `defaults`."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, compose_config
from omegaconf import OmegaConf

from pipeline.engine.graph import build_graph

GRAPHS = Path(CONF_DIR) / "pipeline"
REGION = yaml.safe_load((GRAPHS / "region.yaml").read_text())
INCLUDERS = ["answer", "export", "perplexity", "closed_book", "retrieve_mixed"]
EXTRA = {"export": ["+out=/tmp/unused", "+export_which=mixed"]}


def own(name: str) -> dict:
    return yaml.safe_load((GRAPHS / f"{name}.yaml").read_text())


def test_region_block_is_the_select_to_sub_nodes():
    assert list(REGION["nodes"]) == ["query", "select", "rerank", "capacity", "targets", "sub"]
    assert "build" in REGION["defaults"]


@pytest.mark.parametrize("name", INCLUDERS)
def test_graph_includes_region_instead_of_a_copy(name):
    spec = own(name)
    assert "region" in spec["defaults"], f"conf/pipeline/{name}.yaml should include region through defaults"
    copied = sorted(set(spec.get("nodes") or {}) & set(REGION["nodes"]))
    assert not copied, f"conf/pipeline/{name}.yaml redefines region.yaml's nodes {copied}"
    cfg = compose_config(f"pipeline={name}", *EXTRA.get(name, []))
    composed = OmegaConf.to_container(cfg.pipeline.nodes, resolve=False)
    for node, node_spec in REGION["nodes"].items():
        assert composed[node] == node_spec, (name, node)
    build_graph(cfg)  # and the composed graph still validates


def test_no_graph_copies_the_region_block():
    """A new graph that needs the region includes region.yaml; one that writes all five nodes again fails here."""
    for path in sorted(GRAPHS.glob("*.yaml")):
        if path.stem == "region":
            continue
        nodes = (yaml.safe_load(path.read_text()) or {}).get("nodes") or {}
        same = [n for n, s in REGION["nodes"].items() if nodes.get(n) == s]
        assert len(same) < len(REGION["nodes"]), f"{path.name} copies region.yaml's nodes; include it via defaults"
