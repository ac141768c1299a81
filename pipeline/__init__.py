"""pca-pipeline's framework: the engine (`pipeline/engine/`: compose, validate, run and cache graphs of stages) and
the product on top of it (the apps and their entry points, the Python API, report, chat, summary, show, export).

It never imports `stages/` and never names a stage: the graph and its stages come from the Hydra config.
"""
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.answer import Answer as Answer  # what generate_answer returns (light: records only)
from pipeline.answer import Citation as Citation

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def generate_answer(*args, **kwargs):
    """See `pipeline.api.generate_answer` (imported lazily: importing the framework stays cheap)."""
    from pipeline.api import generate_answer as impl

    return impl(*args, **kwargs)


def retrieve(*args, **kwargs):
    """See `pipeline.api.retrieve`."""
    from pipeline.api import retrieve as impl

    return impl(*args, **kwargs)
