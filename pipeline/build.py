"""`python -m pipeline.build program_root=<tree> [overrides]`: write (or reuse) the program's build artifacts."""
import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import hydra_main


@hydra.main(config_path=str(CONF_DIR), config_name="build", version_base="1.3")
def main(cfg: DictConfig):
    return hydra_main(cfg)


if __name__ == "__main__":
    main()
