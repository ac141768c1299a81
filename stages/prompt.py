"""Renamed to `stages.scaffold` (the node, its config group and its module share one name; conf/renamed.yaml).

This alias keeps `_target_: stages.prompt.…` and `import stages.prompt` working for one release, with a warning.
"""
import warnings

warnings.warn("stages.prompt is renamed stages.scaffold; this alias goes in the next release", FutureWarning, stacklevel=2)

from stages.scaffold import *  # noqa: E402, F403
