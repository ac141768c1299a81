"""`python -m pipeline.export [adapters=<artifact dir>] out=<dir>`: an artifact's adapter in PEFT's LoRA format."""
import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import hydra_main


@hydra.main(config_path=str(CONF_DIR), config_name="export", version_base="1.3")
def main(cfg: DictConfig):
    return hydra_main(cfg)


if __name__ == "__main__":
    main()
