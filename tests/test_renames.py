"""Names line up (issue 16): a node, its config group and its stage's module share a name; the old names of
conf/renamed.yaml keep working for one release, each with a FutureWarning."""
from __future__ import annotations

import importlib
import importlib.util

import pytest
from conftest import compose_config

from pipeline.api import compose
from pipeline.graph import build_graph

GRAPHS = ["answer", "build", "eval", "perplexity", "export", "closed_book", "retrieve", "retrieve_mixed", "questions"]
# a node whose stage lives in a sibling step's module, on purpose
OTHER_MODULE = {
    "baseline": "bm25",   # the eval's baseline is BM25 (stages/bm25.py), the algorithm it names
    "qgen": "questions",  # the questions app's generator: stages/questions.py
    "remix": "mix",       # the stage-2 re-mix is a second mix: stages/mix.py holds both
    "rescore": "rerank",  # re-ranking the windows with the mixed model: stages/rerank.py holds every reranker
}


@pytest.mark.parametrize("graph", GRAPHS)
def test_node_group_and_module_share_a_name(graph):
    cfg = compose([f"pipeline={graph}"])
    for name, node in cfg.pipeline.nodes.items():
        if node.get("stage") or node.get("config") or name not in cfg:
            continue  # a node that names its stage or reads another node's config (decode_retry: decode)
        module = str(cfg[name]["_target_"]).rsplit(".", 2)[-2]
        assert module == OTHER_MODULE.get(name, name), f"pipeline={graph}: node '{name}' runs stages/{module}.py"


@pytest.mark.parametrize("old, new", [("stages.attribute", "stages.repair"), ("stages.subgraph", "stages.sub"),
                                      ("stages.prompt", "stages.scaffold")])
def test_an_old_module_name_in_a_target_still_works_with_a_warning(old, new):
    """`_target_: stages.attribute.X` (a user's YAML) resolves to the new module; no alias module exists, so no stage
    imports another."""
    target = {"stages.repair": "AttributeByOverlap", "stages.sub": "SubgraphAdapter", "stages.scaffold": "BuildPrompt"}[new]
    group = {"stages.repair": "repair", "stages.sub": "sub", "stages.scaffold": "scaffold"}[new]
    with pytest.warns(FutureWarning, match=f"the module '{old}' is renamed '{new}'"):
        graph = build_graph(compose_config(f"{group}._target_={old}.{target}")).instantiate()
    assert graph.nodes[group].stage_cls is getattr(importlib.import_module(new), target)
    assert importlib.util.find_spec(old) is None


def test_an_old_node_name_in_an_override_still_works_with_a_warning():
    with pytest.warns(FutureWarning, match="node 'prompt_retry' is renamed 'scaffold_retry'"):
        cfg = compose(["pipeline.nodes.prompt_retry.with.attempt=3"])
    assert build_graph(cfg).nodes["scaffold_retry"].config["attempt"] == 3


def test_an_old_port_name_in_a_graph_still_works_with_a_warning():
    """A user's graph written before the rename: `in: {handle: mix.handle}`."""
    cfg = compose_config(*(o for node in ("unmix", "remix") for o in (
        f"~pipeline.nodes.{node}.in.adapter_mix", f"+pipeline.nodes.{node}.in.handle=mix.handle")))
    with pytest.warns(FutureWarning, match="port 'handle' is renamed 'adapter_mix'"):
        graph = build_graph(cfg)
    assert graph.nodes["unmix"].wires == {"adapter_mix": ("mix", "adapter_mix")}
    assert graph.nodes["remix"].wires == {"adapter_mix": ("mix", "adapter_mix")}
