"""`python -m pipeline.show [overrides]`: print the composed, validated DAG as text and draw it to PNG/SVG.

Nothing is executed and no model loads. The drawing goes to `dag_out=<file.png|file.svg>` or the run folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
import networkx as nx
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.engine.errors import PipelineError
from pipeline.engine.graph import INPUTS, Graph, build_graph


def describe(graph: Graph) -> str:
    lines = [f"pipeline '{graph.name}': {len(graph.nodes)} nodes"]
    for name in graph.order:
        if name == INPUTS:
            continue
        node = graph.nodes[name]
        flags = [f"when {'' if node.when[2] else 'not '}{node.when[0]}.{node.when[1]}"] if node.when else []
        flags += ["always"] if node.always else []
        flags += [f"after {', '.join(node.after)}"] if node.after else []
        wires = ", ".join(f"{port}<-{src}.{out}" for port, (src, out) in node.wires.items())
        outputs = ", ".join(node.stage_cls.outputs)
        lines.append(f"  {name:<15} {node.stage_cls.__name__:<20} in: {wires or '-'}  out: {outputs}"
                     + (f"  [{'; '.join(flags)}]" if flags else ""))
    return "\n".join(lines)


def draw(graph: Graph, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dag = graph.dag.copy()
    if not any(True for _ in dag.successors(INPUTS)):
        dag.remove_node(INPUTS)
    pos = {}
    generations = list(nx.topological_generations(dag))
    for layer, names in enumerate(generations):
        order = sorted(names, key=lambda n: list(graph.nodes).index(n) if n in graph.nodes else -1)
        for j, name in enumerate(order):
            pos[name] = ((j - (len(order) - 1) / 2) * 1.6, -layer)
    width = max(len(g) for g in generations)
    layers = len(generations)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * width), max(6, 1.25 * layers)))
    colors = ["#f6c28b" if graph.nodes.get(n) and graph.nodes[n].when else
              "#b8d8be" if graph.nodes.get(n) and graph.nodes[n].always else "#c9d7f0" for n in dag.nodes]
    labels = {n: n if n not in graph.nodes else f"{n}\n{graph.nodes[n].stage_cls.__name__}" for n in dag.nodes}
    data_edges = [(u, v) for u, v, d in dag.edges(data=True) if not d.get("order") and not d.get("condition")]
    other_edges = [(u, v) for u, v, d in dag.edges(data=True) if d.get("order") or d.get("condition")]
    nx.draw_networkx_nodes(dag, pos, node_color=colors, node_size=2200, node_shape="s", ax=ax)
    nx.draw_networkx_labels(dag, pos, labels, font_size=7, ax=ax)
    nx.draw_networkx_edges(dag, pos, edgelist=data_edges, arrows=True, arrowsize=10, node_size=2200, ax=ax,
                           edge_color="#555555", width=0.7)
    nx.draw_networkx_edges(dag, pos, edgelist=other_edges, arrows=True, arrowsize=10, node_size=2200, ax=ax,
                           style="dashed", edge_color="#c0392b", width=0.9)
    ax.set_title(f"pipeline '{graph.name}' (orange: conditional, green: always; dashed: condition/order)")
    ax.axis("off")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return out


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def app(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    try:
        graph = build_graph(cfg).instantiate()
    except PipelineError as err:
        if HydraConfig.get().verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(describe(graph))
    out = Path(cfg.dag_out) if cfg.get("dag_out") else Path(HydraConfig.get().runtime.output_dir) / "dag.png"
    print(f"drawing: {draw(graph, out)}")


def main() -> None:
    from pipeline.cli import launch, usage

    launch(app, usage("python -m pipeline.show", "Print and draw the composed, validated DAG; nothing runs.",
                      ["python -m pipeline.show select=zoom rerank=none dag_out=dag.png"], ["pipeline", "select"]),
           "config")


if __name__ == "__main__":
    main()
