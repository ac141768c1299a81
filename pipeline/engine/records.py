"""Records a run leaves on disk, typed once and shared by the stage that writes them and the tools that read them.

Data only: the engine neither writes nor reads these records; it holds them because both sides may import it (a
stage imports only the engine's contract, the product never imports a stage). ``to_json`` gives the JSON object
as written to disk, ``from_json`` reads one back, also one of an older run (absent keys take their defaults,
keys without a field are kept in ``extra``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Union


@dataclasses.dataclass(frozen=True, kw_only=True)
class Span:
    """Lines ``start``..``end`` of the program file ``path`` (a packed evidence window)."""

    path: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class CitationRecord:
    """A citation of the answer and what its check found."""

    path: str
    start: int
    end: int | None = None  # None: the single line ``start``
    valid: bool = False
    source: str = "model"  # model | attributed (added by citation repair)
    removed: bool = False  # replaced in the answer's text by a marker: the reader never sees it as evidence
    reason: str = ""  # why it is invalid

    @property
    def last(self) -> int:
        return self.end if self.end is not None else self.start


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClaimRecord:
    """A statement of the answer about a definition, checked against its AST (the `claims` node)."""

    name: str  # the subject as the answer wrote it
    kind: str  # param_count | param_name | returns_none | returns_value | raises | calls | kind | decorated
    verdict: str  # supported | contradicted
    qualname: str = ""  # the definition checked
    value: str = ""  # what is claimed (a count, a name, a kind; "" for "an exception", "a decorator")
    said: str = ""  # the words that claim it
    code_says: str = ""  # for a contradicted claim: what the code says instead


@dataclasses.dataclass(frozen=True, kw_only=True)
class Telemetry:
    """One answer's record (`telemetry.json`): written also after a failure, with ``status`` failed."""

    status: str = "ok"  # ok | failed
    error: str | None = None  # the first failure: its node and one line
    prompt: str = ""
    answer: str | None = None
    interrupted: bool = False  # Ctrl-C: the answer, if any, is the draft decoded so far, unchecked
    overrides: tuple[str, ...] = ()
    files_selected: tuple[str, ...] = ()
    modules_selected: tuple[str, ...] = ()
    windows_packed: tuple[Span, ...] = ()
    file_scores: dict[str, float | None] = dataclasses.field(default_factory=dict)  # selection score per file
    window_scores: tuple[float | None, ...] = ()  # per packed window; None where nothing scored it
    citations: tuple[CitationRecord, ...] = ()
    citations_total: int = 0
    citations_valid: int = 0
    citations_model: int = 0
    citations_attributed: int = 0
    citations_must: int = 0
    citation_precision: float = 0.0
    first_check_passed: bool | None = None  # None: the stage-2 retry's answer was kept
    first_check: dict[str, Any] | None = None  # the first draft's check (passed, reason): why the retry ran
    retries: int = 0
    fallback_used: bool = False
    citations_model_valid: int = 0
    grounded: bool | None = None  # None: not recorded (a valid citation then stands for it)
    not_grounded: dict[str, str] = dataclasses.field(default_factory=dict)  # failed check -> why (the badge node)
    confidence: float | None = None  # in [0, 1] (docs/behaviour.md §5, the honest badge); None: not computed
    confidence_parts: dict[str, Any] = dataclasses.field(default_factory=dict)  # margin, evidence, factor
    cut_at: int | None = None  # the max_new_tokens the reply was cut at (trimmed, with a notice); None: not cut
    claims_checked: int = 0  # the answer's statements about definitions checked against the AST
    claims_contradicted: int = 0
    claims_dropped: int = 0  # sentences left out for a contradicted claim (claims.on_contradiction=drop)
    claims: tuple[ClaimRecord, ...] = ()
    code_identifiers: int = 0
    unknown_identifiers: tuple[str, ...] = ()
    unknown_identifier_rate: float = 0.0
    code_lines: int = 0
    code_lines_unverified: tuple[str, ...] = ()
    citations_mislabelled: tuple[str, ...] = ()
    decoding: dict[str, Any] = dataclasses.field(default_factory=dict)
    lead: dict[str, Any] = dataclasses.field(default_factory=dict)
    rank: int | None = None
    gsub: float | None = None
    alpha: float | None = None
    entropy: dict[str, Any] | None = None
    delta_norms: dict[str, Any] = dataclasses.field(default_factory=dict)
    # entries without a field of their own (the rest of the mix report, keys of older writers): top level on disk
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    fallback_mix: dict[str, Any] | None = None  # the stage-2 retry's mix report
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per node that ran
    elapsed_sec: float = 0.0
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # prompt, generated
    model: str | None = None
    device: str | None = None
    notes: tuple[str, ...] = ()
    created: str = ""

    def with_entries(self, entries: Mapping[str, Any]) -> Telemetry:
        """This record with ``entries`` set: a key that names a field sets it, any other goes to ``extra``."""
        fields, extra = _split(type(self), entries)
        return dataclasses.replace(self, **fields, extra={**self.extra, **extra})

    def to_json(self) -> dict[str, Any]:
        """The JSON object on disk: one key per field, ``extra`` spread at its place."""
        fields = dataclasses.fields(self)
        names = {f.name for f in fields}
        out: dict[str, Any] = {}
        for field in fields:
            if field.name == "extra":
                out.update({k: _plain(v) for k, v in self.extra.items() if k not in names})
            else:
                out[field.name] = _plain(getattr(self, field.name))
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], strict: bool = True) -> Telemetry:
        """The record of a JSON object. A value of the wrong type is a ValueError naming its key; with
        ``strict=False`` it is left out (the field keeps its default) so that a damaged file still reads."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a telemetry record is a JSON object, not {type(data).__name__}")
        fields, extra = _split(cls, data)
        hints = typing.get_type_hints(cls)
        kept = {}
        for name, value in fields.items():
            try:
                kept[name] = _fit(value, hints[name])
            except TypeError as err:
                if strict:
                    raise ValueError(f"key '{name}': {err}") from None
        return cls(**kept, extra=dict(extra))


def _split(cls: type, entries: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return ({k: v for k, v in entries.items() if k in names},
            {str(k): v for k, v in entries.items() if k not in names})


def _plain(value: Any) -> Any:
    """JSON-ready: records become objects, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _fit(value: Any, hint: Any) -> Any:
    """``value`` (parsed JSON) as the annotation ``hint`` asks (lists -> tuples, objects -> records), or TypeError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arm in args:
            try:
                return _fit(value, arm)
            except TypeError:
                continue
        raise TypeError(f"expected {_name(hint)}, got {_short(value)}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_fit(v, args[0]) for v in value)
    elif origin is dict:
        if isinstance(value, Mapping):
            return {str(k): _fit(v, args[1]) for k, v in value.items()}
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, Mapping):
            return _record(hint, value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise TypeError(f"expected {_name(hint)}, got {_short(value)}")


def _record(cls: Any, data: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in data]
    if missing:
        raise TypeError(f"a {cls.__name__} needs {', '.join(missing)}")
    return cls(**{k: _fit(v, hints[k]) for k, v in data.items() if k in fields})


def _name(hint: Any) -> str:
    """The JSON name of what ``hint`` accepts."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_name(arm) for arm in typing.get_args(hint))
    names = {tuple: "a list", dict: "an object", str: "a string", int: "an integer", float: "a number",
             bool: "true or false", type(None): "null"}
    base = typing.get_origin(hint) or hint
    return names.get(base) or (f"an object ({getattr(hint, '__name__', hint)})" if dataclasses.is_dataclass(hint)
                               else str(hint))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
