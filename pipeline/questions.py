"""`python -m pipeline.questions program_root=<tree> [out=<folder>]`: a question set and the stripped program."""
import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import hydra_main


@hydra.main(config_path=str(CONF_DIR), config_name="questions", version_base="1.3")
def main(cfg: DictConfig):
    return hydra_main(cfg)


if __name__ == "__main__":
    main()
