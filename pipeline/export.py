"""`python -m pipeline.export [adapters=<artifact dir>] out=<dir>` (`pca-export`): an artifact's adapter in PEFT's
LoRA format. It prints which program, question and adapter it exported, and where."""
import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.app import hydra_main
from pipeline.cli import launch, usage


@hydra.main(config_path=str(CONF_DIR), config_name="export", version_base="1.3")
def app(cfg: DictConfig):
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from pipeline.runfolder import RunFolder, artifact_manifests

    path = hydra_main(cfg)
    if path is not None:
        run = RunFolder.load(Path(HydraConfig.get().runtime.output_dir))
        artifacts = [str(p) for p, _ in artifact_manifests(run)] or [str(cfg.get("adapters"))]
        what = {"mixed": "mixed (base and subgraph, as an answer mixes them)"}.get(str(cfg.export_which),
                                                                                 str(cfg.export_which))
        print(f"exported the {what} adapter\n  program:   {cfg.program_root}\n  question:  {cfg.prompt}\n"
              f"  artifacts: {', '.join(artifacts)}\n  to:        {path} (adapter_config.json + "
              "adapter_model.safetensors: peft.PeftModel.from_pretrained loads it, see docs/howto/export-peft.md)")
    return path


def main() -> None:
    launch(app, usage("python -m pipeline.export", "Write the adapter an answer would mix, in PEFT's LoRA format.",
                      ['python -m pipeline.export program_root=~/src/myproj prompt="How is X parsed?" out=/tmp/lora',
                       "python -m pipeline.export adapters=outputs/adapters/myproj-1234abcd export_which=base out=/tmp/lora"],
                      ["prompt", "model", "synth", "sub", "mix"]), "export")


if __name__ == "__main__":
    main()
