"""Renamed to `stages.sub` (the node, its config group and its module share one name; conf/renamed.yaml).

This alias keeps `_target_: stages.subgraph.…` and `import stages.subgraph` working for one release, with a warning.
"""
import warnings

warnings.warn("stages.subgraph is renamed stages.sub; this alias goes in the next release", FutureWarning, stacklevel=2)

from stages.sub import *  # noqa: E402, F403
