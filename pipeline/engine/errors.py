"""Failures a user can act on. Each message is one line that names the culprit (node, port, key, file)."""
from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base of every expected failure: the Hydra apps print `error: <message>` and exit non-zero."""


class ConfigError(PipelineError):
    """The composed config or the graph it declares is wrong (unknown stage, bad wiring, bad value)."""


class InputError(PipelineError):
    """The data a run was pointed at is unusable (program tree, adapter artifacts, question set)."""


class StageFailed(PipelineError):
    """A stage raised while running; the message names the node and the original error."""

    def __init__(self, node: str, error: BaseException):
        self.node = node
        self.error = error
        self.result: Any = None  # the run's RunResult (trace, failure; no values), set by the executor
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not isinstance(error, PipelineError):
            detail = f"{type(error).__name__}: {detail}"
        super().__init__(f"node '{node}': {detail}")
