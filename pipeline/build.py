"""`python -m pipeline.build program_root=<tree> [overrides]` (`pca-build`): write (or reuse) the program's build
artifacts."""
import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import hydra_main
from pipeline.cli import launch, usage


@hydra.main(config_path=str(CONF_DIR), config_name="build", version_base="1.3")
def app(cfg: DictConfig):
    return hydra_main(cfg)


def main() -> None:
    launch(app, usage("python -m pipeline.build", "Index a program and write its adapter artifacts (a cache hit when unchanged).",
                      ["python -m pipeline.build program_root=~/src/myproj",
                       "python -m pipeline.build program_root=~/src/myproj synth=fitted synth.time_budget_s=120"],
                      ["model", "synth", "report"]), "build")


if __name__ == "__main__":
    main()
