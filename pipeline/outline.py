"""`python -m pipeline.outline program_root=<tree> [symbol=<name>] [--json]` (`pca-outline`): a map of the program.

The program's files, classes, functions and values with their spans and one-line summaries, most central in the
call graph first (docs/howto/outline.md). stdout holds the map alone (`--json`: one JSON object); the run folder
gets `outline.json` and a report whose "Map of the program" shows the most central files. Bad input (a missing
root, an unknown symbol with the closest names) is one line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline import CONF_DIR
from pipeline.cli import launch, usage
from pipeline.engine.errors import PipelineError


@hydra.main(config_path=str(CONF_DIR), config_name="outline", version_base="1.3")
def app(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.app import result_value, run_config
    from pipeline.callbacks import remove_unused_run_folder
    from pipeline.output import output_mode, show_logs
    from pipeline.report import write_after

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    show_logs(bool(hydra_cfg.verbose))
    try:
        mode = output_mode(cfg)
        result = run_config(cfg, run_dir, [str(o) for o in hydra_cfg.overrides.task])
    except (PipelineError, OmegaConfBaseException) as err:
        if hydra_cfg.verbose:
            raise
        if not (run_dir / "trace.json").is_file():
            remove_unused_run_folder(run_dir)
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    where = write_after(cfg, run_dir)
    value = result_value(cfg, result)
    if mode == "json":
        print(json.dumps({k: v for k, v in value.items() if k != "text"}, ensure_ascii=False))
    else:
        print(value["text"])
    print(f"run folder: {run_dir}" + (f"\nreport: {where}" if where else ""), file=sys.stderr)


def main() -> None:
    launch(app, usage("python -m pipeline.outline", "Print a map of the program: files, classes, functions and values "
                      "with spans and summaries, most central in the call graph first.\n  symbol=<name>               "
                      "that symbol's callers, callees and file instead\n  --json                      stdout: one "
                      "JSON object (the map's data)",
                      ["python -m pipeline.outline program_root=~/src/myproj",
                       "python -m pipeline.outline program_root=~/src/myproj symbol=Signer.sign",
                       "python -m pipeline.outline program_root=~/src/myproj outline.files=20 --json"],
                      ["outline"]), "outline")


if __name__ == "__main__":
    main()
