"""`python -m pipeline.run [overrides]`: run the composed graph (default: the answer graph) once or as -m sweep."""
import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import hydra_main


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    return hydra_main(cfg)


if __name__ == "__main__":
    main()
