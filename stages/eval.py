"""Stages of the eval graph (docs/behaviour.md §9): load a question set, run our graph on every question, score and report.

Our system is the answer graph itself, run per question through the framework (compose + run_config), never by
importing other stages: `eval.mode=answer` runs `pipeline=answer` (decoding, citations), `eval.mode=retrieval`
runs `pipeline=retrieve` (select, rerank, pack only). The inner runs start from this job's own config, so
every knob of a sweep (`-m select.top_k=4,8 rerank=heuristic,none`) applies to them; the loaded model and the
program index are process-wide resources, reused by every question.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Literal

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import ConfigError, InputError, PipelineError
from pipeline.engine.records import Telemetry
from pipeline.engine.stage import Range, RunContext, Stage
from stages.common.retrieval.evaluation import (
    QuestionSet,
    Record,
    SystemRun,
    check_templates,
    entry,
    load_questions,
    natural_section,
    phrase,
    score,
    spread,
)
from stages.common.types import ProgramIndex

log = logging.getLogger(__name__)
METRICS = Literal["file_recall@1", "file_recall@k", "evidence_recall@1", "evidence_recall@k", "evidence_recall",
                  "citation_hit", "citation_precision", "model_citation_rate", "model_citation_hit",
                  "first_citation_hit", "symbol_hit", "unknown_identifier_rate", "invented_code_rate", "mislabelled_rate",
                  "retry_rate", "tokens_per_second", "seconds", "evidence_hit", "lead_hit", "key_fact_recall",
                  "correct_rate"]


class LoadQuestions(Stage):
    """Read the JSONL set, check every answer span against the program, keep an evenly spread `limit`, and put
    each question in the configured `phrasing` (bare sentence, a question template around it, or keywords)."""

    outputs = {"questions": QuestionSet}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        limit: Annotated[int, Range(ge=1)] | None = None
        phrasing: Literal["bare", "template", "keywords"] = "bare"
        templates: tuple[str, ...] = (  # the templates retrieval was tuned with (on click and omegaconf)
            "Which part of the code does this: {question}? Cite the file and lines.",
            "Where in this project is the following implemented: {question}? Please show the function and give the "
            "file and line numbers.",
            "I am reading the source. Which function or class is responsible for this: {question}? Point me to the "
            "exact lines.",
            "Can you find the code that handles this? {question}. Answer with the path and the line range.",
        )
        keywords: Annotated[int, Range(ge=1)] = 4

        def __post_init__(self) -> None:
            check_templates(self.templates)

    config: Config

    def run(self, source: str | None, index: ProgramIndex) -> dict:
        if not source:
            raise InputError("questions is not set; pass questions=<file.jsonl> (python -m pipeline.questions makes one)")
        questions = load_questions(source)
        for number, q in enumerate(questions, start=1):
            for path, start, end in q.spans:  # the answer's span, and a natural question's other gold spans
                if path not in index.files:
                    raise InputError(f"questions '{source}' question {number}: path '{path}' is not a file of "
                                     f"program_root '{index.root}'")
                if end > index.files[path].lines:
                    raise InputError(f"questions '{source}' question {number}: {path}:{start}-{end} is past the "
                                     f"end of the file ({index.files[path].lines} lines)")
        c = self.config
        chosen = [dataclasses.replace(q, question=phrase(q.question, c.phrasing, c.templates, c.keywords),
                                      sentence=q.question) for q in spread(questions, c.limit)]
        return {"questions": QuestionSet(str(source), chosen, len(questions), c.phrasing)}


class RunGraphPerQuestion(Stage):
    """Our system: the configured graph, once per question, with this job's config and the question as prompt."""

    outputs = {"run": SystemRun}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        mode: Literal["answer", "retrieval"] = "retrieval"
        graphs: dict[str, str] = dataclasses.field(default_factory=lambda: {"answer": "answer", "retrieval": "retrieve"})
        # where the inner graph leaves what is scored (node.output); a name left out is not scored
        refs: dict[str, str] = dataclasses.field(default_factory=lambda: {
            "selection": "rescore.selection", "evidence": "pack.evidence", "answer": "badge.answer",
            "telemetry": "telemetry.telemetry", "claims": "claims.report"})
        progress: bool = True

        def __post_init__(self) -> None:
            if not self.graphs.get(self.mode):
                raise ConfigError(f"eval.graphs has no graph for mode '{self.mode}'; graphs: {', '.join(self.graphs)}")

    config: Config

    @property
    def graph(self) -> str:
        return self.config.graphs[self.config.mode]

    def run(self, context: RunContext, questions: QuestionSet) -> dict:
        from tqdm import tqdm

        if context.run_graph is None:
            raise ConfigError("the eval's per-question runs need a framework that runs graphs (RunContext.run_graph)")
        loggers = [logging.getLogger(name) for name in ("pipeline", "stages")]
        levels = [logger.level for logger in loggers]
        refs = {name: tuple(str(ref).split(".", 1)) for name, ref in self.config.refs.items()}
        records, tokenizers = [], []
        try:
            for logger in loggers:
                logger.setLevel(logging.WARNING)  # one progress bar, not a log line per node per question
            bar = tqdm(questions.questions, desc=f"eval ({self.graph})", unit="q", disable=not self.config.progress)
            for number, question in enumerate(bar, start=1):
                started = time.perf_counter()
                try:
                    result = context.run_graph(self.graph, {"prompt": question.question},
                                               Path(context.run_dir) / "questions" / f"{number:04d}", drop=("questions",))
                except PipelineError as err:
                    raise PipelineError(f"question {number} ({question.path}:{question.start}): {err}") from err
                records.append(record(result, refs, time.perf_counter() - started))
                evidence = result.output(*refs["evidence"]) if "evidence" in refs else None
                if evidence is not None and evidence.tokenizer and evidence.tokenizer not in tokenizers:
                    tokenizers.append(evidence.tokenizer)
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
        detail = f"pipeline={self.graph}" + (f", windows packed with the {', '.join(tokenizers)} tokenizer" if tokenizers else "")
        return {"run": SystemRun("ours", records, 0.0, detail, tokenizers)}


def record(result, refs: dict[str, tuple[str, ...]], seconds: float) -> Record:
    """What one inner run did with its question, read from the outputs ``refs`` names (node, port)."""
    selection = result.output(*refs["selection"]) if "selection" in refs else None
    evidence = result.output(*refs["evidence"]) if "evidence" in refs else None
    answer = result.output(*refs["answer"]) if "answer" in refs else None
    telemetry = (result.output(*refs["telemetry"]) if "telemetry" in refs else None) or Telemetry()
    claims = result.output(*refs["claims"]) if "claims" in refs else None
    if getattr(claims, "action", "none") == "none":  # no claims node, or claims=none: nothing was checked
        claims = None
    return Record(
        files=list(selection.files) if selection else [],
        windows=[(w.path, w.start, w.end) for w in evidence.windows] if evidence else [],
        seconds=seconds,
        citations=[c.as_dict() for c in answer.citations] if answer else None,
        retries=answer.retries if answer else None,
        answer=answer.text if answer else None,
        names=telemetry.code_identifiers,
        unknown=list(telemetry.unknown_identifiers),
        new_tokens=int(telemetry.decoding.get("new_tokens") or 0),
        decode_seconds=float(telemetry.decoding.get("decode_seconds") or 0.0),
        code_lines=telemetry.code_lines,
        code_unverified=len(telemetry.code_lines_unverified),
        mislabelled=len(telemetry.citations_mislabelled),
        lead=str(telemetry.lead.get("lead") or ""), grounded=telemetry.grounded,
        confidence=entry(telemetry, "confidence"), claims_checked=claims.checked if claims is not None else None,
        claims_contradicted=claims.contradicted if claims is not None else None,
    )


def _rank(hits: list[bool]) -> int | None:
    return next((i + 1 for i, hit in enumerate(hits) if hit), None)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


class EvalReport(Stage):
    """Metrics of ours and the baseline side by side: printed as a table, written to `eval.json`."""

    outputs = {"table": str, "metric": float, "report": dict}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        k: Annotated[int, Range(ge=1)] = 5
        metric: METRICS = "evidence_recall@k"  # the float the graph returns with pipeline.result=report.metric
        # the tokenizer our results were measured with: windows packed by another one make recall incomparable
        reference_tokenizer: str | None = "SmolLM2-135M-Instruct"

    config: Config

    @property
    def metric(self) -> str:
        """The configured metric's key in the report (``@k`` spelled with this ``k``)."""
        return self.config.metric.replace("@k", f"@{self.config.k}")

    def run(self, context: RunContext, questions: QuestionSet, ours: SystemRun, baseline: SystemRun | None = None) -> dict:
        systems = [run for run in (ours, baseline) if run is not None]
        qs = questions.questions
        k = self.config.k
        metrics = {run.name: score(qs, run.records, k) for run in systems}
        for run in systems:
            metrics[run.name]["setup_seconds"] = round(run.setup_seconds, 4)
        per_question = []
        for i, q in enumerate(qs):
            item = {"question": q.question, "sentence": q.sentence or q.question, "path": q.path, "start": q.start,
                    "end": q.end}
            for run in systems:
                r = run.records[i]
                item[run.name] = {"file_rank": _rank([p == q.path for p in r.files]),
                                  "window_rank": _rank([q.hit_by(*w) for w in r.windows])}
            per_question.append(item)
        natural = natural_section(qs, systems, metrics, per_question)
        report = {"questions": questions.source, "phrasing": questions.phrasing, "evaluated": len(qs),
                  "total": questions.total, "k": k,
                  "overrides": list(context.overrides), "metric": self.metric,
                  "systems": {run.name: run.detail for run in systems}, "tokenizer": ours.tokenizers, "metrics": metrics,
                  "per_question": per_question, **natural}
        write_atomic(Path(context.run_dir) / "eval.json", json.dumps(report, indent=2))
        names = [run.name for run in systems]
        rows = [f"{'metric':<22}" + "".join(f"{n:>10}" for n in names)]
        for key in metrics[names[0]]:
            rows.append(f"{key:<22}" + "".join(f"{_cell(metrics[n].get(key)):>10}" for n in names))
        header = (f"eval: {len(qs)} of {questions.total} questions from {questions.source}, phrasing {questions.phrasing}\n"
                  + "\n".join(f"  {run.name}: {run.detail}" for run in systems))
        reference = self.config.reference_tokenizer
        other = [t for t in ours.tokenizers if reference and t != reference]
        if other:
            # packing counts tokens: a byte-level tokenizer fits far fewer windows in the same budget
            warning = (f"warning: windows were packed with the {', '.join(other)} tokenizer, not the reference one "
                       f"({reference}, eval.reference_tokenizer): {metrics['ours']['windows_shown']} "
                       "windows shown per question, so recall is not comparable with the results tables packed with it")
            log.warning(warning)
            header += "\n" + warning
        value = metrics["ours"].get(self.metric)
        return {"table": header + "\n" + "\n".join(rows), "metric": float("nan") if value is None else float(value),
                "report": report}
