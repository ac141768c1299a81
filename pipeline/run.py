"""`python -m pipeline.run [overrides]` (`pca-run`): run the composed graph (default: the answer graph) once or
as a `-m` sweep."""
import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import hydra_main
from pipeline.cli import launch, usage

# the knobs of --help (pipeline/cli.py KNOBS) and the other groups it lists
GROUPS = ["prompt", "decode", "model", "select", "pack", "synth", "mix", "pipeline", "rerank", "report"]


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def app(cfg: DictConfig):
    return hydra_main(cfg)


def main() -> None:
    launch(app, usage("python -m pipeline.run", "Answer a question about a program (or run another graph: pipeline=...).",
                      ['python -m pipeline.run program_root=~/src/myproj prompt="Where are config files parsed?"',
                       "python -m pipeline.run -m rerank=heuristic,none mix.alpha=8,16   # a sweep, one process"],
                      GROUPS), "config")


if __name__ == "__main__":
    main()
