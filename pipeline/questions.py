"""`python -m pipeline.questions program_root=<tree> [out=<folder>]` (`pca-questions`): a question set and the
stripped program."""
import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import hydra_main
from pipeline.cli import launch, usage


@hydra.main(config_path=str(CONF_DIR), config_name="questions", version_base="1.3")
def app(cfg: DictConfig):
    return hydra_main(cfg)


def main() -> None:
    launch(app, usage("python -m pipeline.questions", "Make a docs/behaviour.md §9 question set from a program's docstrings.",
                      ["python -m pipeline.questions program_root=~/src/myproj out=outputs/eval/myproj"], ["qgen"]),
           "questions")


if __name__ == "__main__":
    main()
