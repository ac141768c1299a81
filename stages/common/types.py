"""Value types that flow along the edges of the answer and build graphs (one typed value per edge)."""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the build graph's edge types live with the adapters; stages name them from here too
from stages.common.adapters.values import ArtifactLocation, Artifacts, Capacity, ProgramEmbedding, TargetPlan  # noqa: F401
from stages.common.program.callgraph import CallGraph
from stages.common.program.lines import split_lines


@dataclasses.dataclass(frozen=True)
class Symbol:
    name: str
    qualname: str
    kind: str  # function | class | method (definitions) | constant | attribute (module- and class-level values)
    path: str
    module: str
    start: int  # first line, decorators included
    end: int
    signature: str
    doc: str  # first line of the docstring
    is_public: bool
    annotations: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()  # a value's names it reads (`_available_shells` -> BashComplete, ...)

    @property
    def node_id(self) -> str:
        return f"sym:{self.path}::{self.qualname}"

    @property
    def is_definition(self) -> bool:  # a function, class or method, not a constant or attribute
        return self.kind in ("function", "class", "method")


@dataclasses.dataclass(frozen=True)
class Window:
    """A candidate evidence span of the windows index (§1)."""

    path: str
    start: int
    end: int
    anchor: str
    kind: str  # head | function | class | method | constant (a run of values no other window shows)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    bytes: int
    lines: int
    module: str | None  # dotted module name for Python files
    parsed: bool  # Python that ast could parse


@dataclasses.dataclass
class ProgramIndex:
    """Everything the answer graph knows about the program, built by the index stage."""

    root: Path
    files: dict[str, FileRecord]
    symbols: list[Symbol]
    windows: list[Window]
    callgraph: CallGraph  # nodes file:/mod:/sym:, edges typed defines|imports|calls|tests, as arrays
    fingerprint: str  # sha256 over (path, sha256) of every indexed file and the indexing code's source fingerprint
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why it was not indexed
    texts: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # path -> decoded text
    file: str | None = None  # the one file that program_root named (the whole program, in ``root``); None: a folder
    _derived: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.callgraph, CallGraph):  # a networkx graph made by hand (tests, other tools)
            self.callgraph = CallGraph.from_networkx(self.callgraph)

    @property
    def location(self) -> Path:
        """What program_root named: the folder, or the one file (caches are keyed by it)."""
        return self.root / self.file if self.file else self.root

    def derived(self, key: str, compute: Callable[[], Any]) -> Any:
        """Compute once per index a value derived from it (token sets, centrality), reused by later jobs."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    @property
    def graph(self):
        """The graph as a networkx MultiDiGraph, built on first use (for graph algorithms; counting edges is
        cheaper on ``callgraph``)."""
        return self.callgraph.to_networkx()

    @property
    def modules(self) -> dict[str, str]:
        """module name -> path."""
        return {rec.module: rec.path for rec in self.files.values() if rec.module}

    def lines(self, path: str) -> list[str]:
        return self.derived(f"lines:{path}", lambda: split_lines(self.texts[path]))

    def windows_of(self, path: str) -> list[Window]:
        by_path = self.derived("windows_by_path", self._windows_by_path)
        return by_path.get(path, [])

    def _windows_by_path(self) -> dict[str, list[Window]]:
        out: dict[str, list[Window]] = {}
        for window in self.windows:
            out.setdefault(window.path, []).append(window)
        return out

    def symbols_in(self, path: str) -> list[Symbol]:
        by_path = self.derived("symbols_by_path", lambda: _group(self.symbols))
        return by_path.get(path, [])

    def summary(self) -> dict[str, Any]:
        return {"files": len(self.files), "symbols": len(self.symbols), "windows": len(self.windows),
                "skipped": len(self.skipped), "skipped_paths": dict(sorted(self.skipped.items())[:20])}


def _group(symbols: list[Symbol]) -> dict[str, list[Symbol]]:
    out: dict[str, list[Symbol]] = {}
    for sym in symbols:
        out.setdefault(sym.path, []).append(sym)
    return out


@dataclasses.dataclass
class Selection:
    """The region of the program a question is about."""

    files: list[str]  # ordered, best first
    modules: list[str]
    scores: dict[str, float]
    symbols: list[str]  # qualnames that matched (question) or seeded (zoom)
    matched_files: int  # files the prompt matched at all (the Q term of entropy capacity)
    nodes: list[str] = dataclasses.field(default_factory=list)  # graph nodes of the region
    # per file, its windows best first with the score that ranked them, when select/rerank ranked windows
    # themselves (select=hybrid, rerank=lm); pack then shows those windows. None: pack ranks windows by relevance.
    window_ranking: dict[str, list[tuple[float, Window]]] | None = None

    def summary(self) -> dict[str, Any]:
        return {"files": self.files[:8], "modules": len(self.modules), "matched_files": self.matched_files}


@dataclasses.dataclass(frozen=True)
class PackedWindow:
    path: str
    start: int
    end: int
    text: str  # the exact source lines start..end
    score: float = 0.0
    context: str = ""  # the enclosing definitions' headers a window starting inside them does not show ("" none)

    @property
    def header(self) -> str:
        return f"[ctx] path: {self.path}:{self.start}-{self.end}"

    def block(self) -> str:
        return f"{self.header}\n{self.context}\n{self.text}" if self.context else f"{self.header}\n{self.text}"

    def span(self) -> dict[str, Any]:
        return {"path": self.path, "start": self.start, "end": self.end}


@dataclasses.dataclass
class Evidence:
    """The packed context. Citation validation uses these records, never the prompt text."""

    windows: list[PackedWindow]
    tokens: int
    tokenizer: str = ""  # whose tokenizer counted `tokens` (the model id): it decides how many windows fit

    def covers(self, path: str, start: int, end: int) -> bool:
        return any(w.path == path and w.start <= end and start <= w.end for w in self.windows)

    def summary(self) -> dict[str, Any]:
        return {"windows": [f"{w.path}:{w.start}-{w.end}" for w in self.windows], "tokens": self.tokens}


@dataclasses.dataclass
class Prompt:
    messages: list[dict[str, str]]
    text: str  # rendered with the chat template
    prefill: str = ""  # start of the assistant's reply, fed to the model before it continues
    attempt: int = 1
    decode_hints: dict[str, float] = dataclasses.field(default_factory=dict)  # deltas for sampling knobs
    ids: list[int] = dataclasses.field(default_factory=list, repr=False)  # token ids of `text`, data kept as data
    citations: list[str] = dataclasses.field(default_factory=list)  # `path:A-B` a citation may name
    lead: list[str] = dataclasses.field(default_factory=list)  # choices the reply may start with (form=lead)
    names: list[str] = dataclasses.field(default_factory=list)  # identifiers inline code may name
    lead_rank: list[int] = dataclasses.field(default_factory=list)  # packed-window position of each lead choice
    lead_bonus: list[float] = dataclasses.field(default_factory=list)  # added to each lead choice's score (leadsim)
    neutral_ids: list[int] = dataclasses.field(default_factory=list, repr=False)  # same prompt, a neutral question
    plain_ids: list[int] = dataclasses.field(default_factory=list, repr=False)  # same prompt without the evidence
    quotes: list[str] = dataclasses.field(default_factory=list, repr=False)  # the packed lines code may copy
    # definition name -> the citations a `name` [path:A-B] label may carry (spans where such a definition starts)
    labels: dict[str, list[str]] = dataclasses.field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"chars": len(self.text), "tokens": len(self.ids), "attempt": self.attempt, "prefill": self.prefill,
                "citations": len(self.citations), "lead": len(self.lead), "names": len(self.names)}


@dataclasses.dataclass
class Draft:
    text: str
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    device: str
    attempt: int = 1
    notes: list[str] = dataclasses.field(default_factory=list)
    prefill_chars: int = 0  # the first characters were written by the scaffold, not by the model
    prefill_seconds: float = 0.0  # the prompt's forward pass (the rest of `seconds` is decoding)
    constrained_citations: int = 0  # citations completed under the grounding constraint
    constrained_names: int = 0  # inline-code names completed under it
    steered_quotes: int = 0  # steps whose likeliest token would have started code the evidence does not hold
    lead: dict[str, Any] = dataclasses.field(default_factory=dict)  # how decode.lead=likelihood chose the lead
    cut_at: int | None = None  # the max_new_tokens the reply ran into before it ended by itself; None: not cut

    def source_at(self, offset: int) -> str:
        return "attributed" if offset < self.prefill_chars else "model"

    @property
    def tokens_per_second(self) -> float:
        decoding = self.seconds - self.prefill_seconds
        return self.generated_tokens / decoding if decoding > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3),
                "prefill_seconds": round(self.prefill_seconds, 3), "attempt": self.attempt}


@dataclasses.dataclass
class Citation:
    path: str
    start: int
    end: int
    valid: bool
    source: str = "model"  # model | attributed
    removed: bool = False
    reason: str = ""
    text: str = ""  # the matched text in the answer

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "text"}


@dataclasses.dataclass
class CitationReport:
    citations: list[Citation]
    passed: bool
    required: int
    must: int = 0
    reason: str = ""
    names: Any = None  # the draft's NameCheck (stages/common/grounding/identifiers.py) when the `names` node ran

    @property
    def unknown_names(self) -> list[str]:
        return list(self.names.unknown) if self.names is not None else []

    @property
    def total(self) -> int:
        return len(self.citations)

    @property
    def valid(self) -> int:
        return sum(c.valid for c in self.citations)

    @property
    def precision(self) -> float:
        return self.valid / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        return {"passed": self.passed, "total": self.total, "valid": self.valid, "reason": self.reason}


@dataclasses.dataclass
class Answer:
    text: str
    citations: list[Citation]
    draft: Draft
    report: CitationReport
    retries: int
    fallback_used: bool

    def __str__(self) -> str:
        return self.text

    def summary(self) -> dict[str, Any]:
        return {"chars": len(self.text), "citations": len(self.citations), "retries": self.retries}


class LanguageModel:
    """A causal LM and its tokenizer (shared across the jobs of a multirun).

    With a ``loader`` and no ``model``, only the tokenizer is loaded: the weights load on the first read of
    ``.model`` (graphs that only count tokens, such as retrieval, never read it). ``architecture`` returns the
    model's transformers config: nodes that need only its layers and shapes read ``.skeleton``, which never loads
    the weights."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str, device: str,
                 loader: Callable[[], tuple[Any, str]] | None = None, gguf: Path | None = None,
                 architecture: Callable[[], Any] | None = None):
        if model is None and loader is None:
            raise ValueError("LanguageModel needs a model or a loader")
        self._model, self._loader, self._lock = model, loader, threading.Lock()
        self._architecture, self._skeleton = architecture, None
        self.tokenizer, self.model_id, self.device = tokenizer, model_id, device
        self.gguf = gguf  # the GGUF file the weights came from (decode.engine=llamacpp reads it); None: not one

    @property
    def model(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    assert self._loader is not None  # __init__: a model or a loader
                    self._model, self.device = self._loader()
        return self._model

    @property
    def skeleton(self) -> Any:
        """The model's modules with their shapes: the model itself once its weights are loaded, else the same
        architecture built on the meta device (no memory, no weights read; never computed with)."""
        if self._model is not None or self._architecture is None:
            return self.model
        with self._lock:
            if self._skeleton is None:
                import torch
                from transformers import AutoModelForCausalLM

                with torch.device("meta"):
                    self._skeleton = AutoModelForCausalLM.from_config(self._architecture())
            return self._skeleton

    @property
    def weights_loaded(self) -> bool:
        return self._model is not None

    def summary(self) -> dict[str, Any]:
        return {"model": self.model_id, "device": self.device, "weights": "loaded" if self.weights_loaded else "not loaded"}
