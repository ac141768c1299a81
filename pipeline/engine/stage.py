"""The contract between the framework and a stage.

A stage is a class:
- its ``Config``, a frozen dataclass, is its config: the fields are the YAML keys, their annotations the types,
  their defaults the defaults (one place); the engine binds and type-checks them before anything runs, and the
  stage reads ``self.config``. A stage without ``Config`` has no settings.
- its ``run`` keyword arguments are its input ports (the annotation is the port type; a default makes the
  port optional: it receives the default when its producer was skipped or is not wired);
- its ``outputs`` class attribute maps each output port to its type; ``run`` returns a dict with those keys.

Config values may be constrained declaratively with ``Annotated[int, Range(ge=1)]`` so that out-of-range
values are rejected at validation time, before any model loads.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.engine.errors import ConfigError

if TYPE_CHECKING:  # the executor imports this module
    from pipeline.engine.execute import RunResult

_EMPTY = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds for a numeric config value: ``Annotated[float, Range(ge=0, le=1)]``."""

    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None

    def violation(self, value: float) -> str | None:
        for bound, ok, word in (
            (self.ge, lambda b: value >= b, ">="),
            (self.le, lambda b: value <= b, "<="),
            (self.gt, lambda b: value > b, ">"),
            (self.lt, lambda b: value < b, "<"),
        ):
            if bound is not None and not ok(bound):
                return f"must be {word} {bound:g}, got {value!r}"
        return None


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """Allows nan and ±inf for one float config value: ``Annotated[float, NonFinite()]``.

    Without it every float config value must be finite: a nan or inf knob would otherwise flow into weights,
    scores and deltas and end as a garbage answer reported as success.
    """


@dataclasses.dataclass(frozen=True)
class Port:
    """An input port of a stage. An optional one (``required=False``) keeps its default in the ``run`` signature
    only: the executor leaves an unproduced optional input out of the call, so Python applies that default."""

    name: str
    type: Any
    required: bool


@dataclasses.dataclass
class RunContext:
    """Injected into any ``run`` parameter annotated ``RunContext``: what the framework knows about the run.

    The run's progress has one record, its ``RunResult`` (set by the executor); ``statuses``, ``timings`` and
    ``failure`` read it."""

    run_dir: Path
    overrides: list[str]
    config: dict
    result: RunResult | None = None
    # run another graph of this app with this run's config: ``run_graph(graph, {key: text}, run_dir, drop=())``
    # -> RunResult. How a stage that drives graphs (the eval, once per question) runs one without importing the
    # framework's apps; the framework sets it, None outside an app.
    run_graph: Callable[..., Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    # one job of a multirun (`-m`): later jobs in this process may reuse what this one computed
    sweep: bool = False

    @property
    def statuses(self) -> dict[str, str]:
        """node -> ok | skipped | failed, for the nodes visited so far (not the one running)."""
        return self.result.statuses if self.result is not None else {}

    @property
    def timings(self) -> dict[str, float]:
        """node -> seconds, for the nodes whose stage ran so far."""
        return self.result.timings if self.result is not None else {}

    @property
    def failure(self) -> str | None:
        """The first failure of the run (one line naming the node), or None."""
        return self.result.failure if self.result is not None else None

    @property
    def error(self) -> BaseException | None:
        """The first failure's exception (e.g. a Ctrl-C carrying a partial draft), or None."""
        return self.result.error if self.result is not None else None


def _is_context(annotation: Any) -> bool:
    """A ``run`` parameter the framework fills with the run's context: ``RunContext``, or ``RunContext | None`` for a
    stage that can also be called outside a run (then it gets None there)."""
    return annotation is RunContext or annotation == (RunContext | None)


class Stage:
    """Base class of every stage. Subclasses set ``outputs`` and ``Config`` and implement ``run``."""

    outputs: ClassVar[dict[str, Any]] = {}
    # the stage's settings: a frozen dataclass (``@dataclasses.dataclass(frozen=True) class Config: ...``)
    Config: ClassVar[type | None] = None

    def __init__(self, **settings: Any) -> None:
        if self.Config is None:
            if settings:
                raise TypeError(f"{type(self).__name__} takes no settings, got {sorted(settings)}")
            return
        hints = typing.get_type_hints(self.Config)
        self.config = self.Config(**{k: frozen(v, hints.get(k, Any)) for k, v in settings.items()})

    # (*args, **inputs): any signature may override it; the ports are read from the subclass's own signature
    def run(self, *args: Any, **inputs: Any) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def precheck(self, *args: Any, **inputs: Any) -> None:
        """Optional: refuse bad graph inputs before any node runs (before any model loads).

        Called once per run with those input ports that are wired straight to graph inputs (values known up
        front, e.g. ``program_root``); raise a ``PipelineError`` naming the culprit. Must be cheap.
        """

    @classmethod
    def input_ports(cls) -> dict[str, Port]:
        hints = typing.get_type_hints(cls.run, include_extras=False)
        ports = {}
        for name, param in inspect.signature(cls.run).parameters.items():
            if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            annotation = hints.get(name, Any)
            if _is_context(annotation):
                continue
            required = param.default is _EMPTY
            ports[name] = Port(name, annotation, required)
        return ports

    @classmethod
    def context_params(cls) -> list[str]:
        hints = typing.get_type_hints(cls.run)
        return [n for n, t in hints.items() if _is_context(t)]

    @classmethod
    def config_params(cls) -> dict[str, inspect.Parameter]:
        """The fields of ``Config`` as keyword parameters (a ``default_factory`` gives the default)."""
        params: dict[str, inspect.Parameter] = {}
        for f in dataclasses.fields(cls.Config) if cls.Config is not None else ():
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else _EMPTY)
            params[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default)
        return params

    @classmethod
    def config_hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls.Config, include_extras=True) if cls.Config is not None else {}


def frozen(value: Any, annotation: Any) -> Any:
    """A YAML list as the tuple a frozen config field declares (``tuple[str, ...]``); anything else as it is."""
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
    origins = {typing.get_origin(a) or a for a in (typing.get_args(base) if typing.get_origin(base) in (
        typing.Union, types.UnionType) else (base,))}
    return tuple(value) if tuple in origins and isinstance(value, list) else value


def check_config(owner: str, cls: type[Stage], values: dict[str, Any]) -> None:
    """Bind ``values`` to the stage's ``Config`` without building it (torchtune-style) and check types/ranges."""
    params = cls.config_params()
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ConfigError(
            f"{owner}: config key '{unknown[0]}' is not accepted by {cls.__name__}; "
            f"accepted: {', '.join(sorted(params)) or '(none)'}"
        )
    missing = [n for n, p in params.items() if p.default is _EMPTY and n not in values]
    if missing:
        raise ConfigError(f"{owner}: config key '{missing[0]}' is required by {cls.__name__}")
    hints = cls.config_hints()
    for key, value in values.items():
        problem = type_problem(hints.get(key, Any), value)
        if problem:
            raise ConfigError(f"{owner}: config key '{key}' {problem}")


def type_problem(annotation: Any, value: Any, non_finite: bool = False) -> str | None:
    """Why ``value`` does not fit ``annotation`` (None when it fits). Covers the shapes YAML can produce.

    A float must be finite unless the annotation carries ``NonFinite()`` (``non_finite``)."""
    if annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        non_finite = non_finite or any(isinstance(extra, NonFinite) for extra in extras)
        problem = type_problem(base, value, non_finite)
        if problem:
            return problem
        for extra in extras:
            if isinstance(extra, Range) and value is not None:
                violation = extra.violation(value)
                if violation:
                    return violation
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(arg, value, non_finite) for arg in typing.get_args(annotation)]
        if all(problems):
            finite = [p for p in problems if p and "finite" in p]  # a float of the right type, but nan/inf
            return finite[0] if finite else f"must be {_type_name(annotation)}, got {value!r}"
        return None
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            return f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
        return None
    if annotation is type(None):
        return None if value is None else f"must be null, got {value!r}"
    if origin in (list, tuple, set, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return f"must be a list, got {value!r}"
        args = typing.get_args(annotation)
        if args and (args[-1] is Ellipsis or origin is not tuple):  # list[X], tuple[X, ...]
            for item in value:
                problem = type_problem(args[0], item, non_finite)
                if problem:
                    return f"item {problem}"
        return None
    if origin is dict or annotation is dict:
        return None if isinstance(value, dict) else f"must be a mapping, got {value!r}"
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not non_finite and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        return None if ok else f"must be a number, got {value!r}"
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    if annotation is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if annotation is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if isinstance(annotation, type):
        return None if isinstance(value, annotation) else f"must be {annotation.__name__}, got {value!r}"
    return None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def type_fits(produced: Any, accepted: Any) -> bool:
    """Whether a producer's declared output type may feed a consumer's input annotation."""
    if accepted is Any or produced is Any:
        return True
    accepted_origin = typing.get_origin(accepted)
    produced_origin = typing.get_origin(produced)
    if produced_origin in (typing.Union, types.UnionType):
        return all(type_fits(arg, accepted) for arg in typing.get_args(produced))
    if accepted_origin in (typing.Union, types.UnionType):
        return any(type_fits(produced, arg) for arg in typing.get_args(accepted))
    if accepted_origin is not None or produced_origin is not None:
        p_base = produced_origin or produced
        a_base = accepted_origin or accepted
        if not (isinstance(p_base, type) and isinstance(a_base, type) and issubclass(p_base, a_base)):
            return False
        p_args, a_args = typing.get_args(produced), typing.get_args(accepted)
        return not a_args or not p_args or all(type_fits(p, a) for p, a in zip(p_args, a_args))
    if isinstance(produced, type) and isinstance(accepted, type):
        if accepted is float and produced is int:
            return True
        return issubclass(produced, accepted)
    return produced == accepted


def type_name(annotation: Any) -> str:
    return _type_name(annotation)
