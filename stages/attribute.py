"""Renamed to `stages.repair` (the node, its config group and its module share one name; conf/renamed.yaml).

This alias keeps `_target_: stages.attribute.…` and `import stages.attribute` working for one release, with a warning.
"""
import warnings

warnings.warn("stages.attribute is renamed stages.repair; this alias goes in the next release", FutureWarning, stacklevel=2)

from stages.repair import *  # noqa: E402, F403
