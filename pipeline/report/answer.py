"""The sections of a run's report about the answer: the question and the answer (each citation a link to its window,
invalid citations and unknown identifiers marked), its headline facts and citations, and the evidence windows with
their code (read from the program root, never outside it) and the selected files."""
from __future__ import annotations

import fnmatch
import re
from typing import Any

from pipeline.engine.records import CitationRecord, Span
from pipeline.htmlkit import esc, fmt, highlight, table
from pipeline.runfolder import RunFolder, read_lines, source_hashes

# a citation as docs/behaviour.md §5 writes it, path.ext:START[-END] (ASCII digits), found as the regex
# ([\w./-]+\.\w+):([0-9]+)(?:-([0-9]+))? would find it, but in linear time (that regex backtracks on `a.a.a…`)
_RUN = re.compile(r"[\w./-]+")
_LINES = re.compile(r":([0-9]+)(?:-([0-9]+))?")
CODE_SAYS = re.compile(r"\[the code says: [^\[\]\n]*\]")


def citations_in(text: str) -> list[tuple[int, int, str, int, int]]:
    """(char start, char end, path, start, end) of every `path.ext:A-B` in ``text``, leftmost first, not overlapping."""
    runs = {m.end(): m.start() for m in _RUN.finditer(text)}
    found, done = [], 0
    for lines in _LINES.finditer(text):
        colon = lines.start()
        lo = max(runs.get(colon, colon), done)
        dot = text.rfind(".", lo, colon)  # the last dot, with a character before it and only word characters after it
        if lo < dot < colon - 1 and text.find("/", dot, colon) < 0 and text.find("-", dot, colon) < 0:
            first, last = (int(d) if len(d) <= 18 else 10**18 for d in (lines.group(1), lines.group(2) or lines.group(1)))
            found.append((lo, lines.end(), text[lo:colon], first, last))
            done = lines.end()
    return found


def flatten(data: Any, prefix: str = "", depth: int = 3) -> dict[str, Any]:
    """``data``'s entries with dotted keys, ``depth`` levels down."""
    out: dict[str, Any] = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1:
            out.update(flatten(value, f"{name}.", depth - 1))
        else:
            out[name] = value
    return out


def pick(flat: dict[str, Any], patterns: list[str]) -> list[tuple[str, Any]]:
    """The entries whose dotted key matches one of ``patterns``, in the patterns' order."""
    picked: list[tuple[str, Any]] = []
    for pattern in patterns:
        picked += [(k, v) for k, v in flat.items() if fnmatch.fnmatchcase(k, pattern) and (k, v) not in picked]
    return picked


def spans(run: RunFolder) -> list[tuple[Span, float | None]]:
    """The packed windows, each with its selection score when the run recorded one."""
    if run.record is None:
        return []
    windows, scores = run.record.windows_packed, run.record.window_scores
    return list(zip(windows, scores if len(scores) == len(windows) else [None] * len(windows)))


def _window_for(windows: list[tuple[Span, float | None]], path: str, start: int, end: int) -> int | None:
    for i, (w, _) in enumerate(windows):
        if w.path == path and w.start <= end and start <= w.end:
            return i
    return None


def _citation_records(run: RunFolder) -> dict[tuple[str, int, int], CitationRecord]:
    records: dict[tuple[str, int, int], CitationRecord] = {}
    for c in run.record.citations if run.record else ():
        records.setdefault((c.path, c.start, c.last), c)
    return records


def render_answer(run: RunFolder) -> str:
    """The answer with each citation a link to its window and unknown identifiers marked; all text escaped."""
    record = run.record
    if record is None or record.answer is None:
        return "<p class=\"muted\">(no answer recorded)</p>"
    text = record.answer
    windows, records = spans(run), _citation_records(run)
    marks: list[tuple[int, int, str]] = []
    for char_start, char_end, path, start, end in citations_in(text):
        cited = records.get((path, start, end))
        if cited is None:
            continue
        index = _window_for(windows, path, start, end)
        label = esc(text[char_start:char_end])
        if cited.valid and not cited.removed and index is not None:
            source = esc(cited.source)
            marks.append((char_start, char_end, f'<a class="cite {source}" href="#w{index}" '
                                                f'title="{source} citation, window {index + 1}">{label}</a>'))
        else:
            why = cited.reason or ("removed: not in the evidence" if cited.removed else "invalid")
            marks.append((char_start, char_end, f'<span class="invalid" title="{esc(why)}">{label}</span>'))
    for match in CODE_SAYS.finditer(text):  # the claims node's marker after a sentence that contradicts the code
        if not any(a < match.end() and match.start() < b for a, b, _ in marks):
            marks.append((match.start(), match.end(), f'<span class="contradicted" title="a claim the code '
                                                      f'contradicts">{esc(match.group(0))}</span>'))
    for word in sorted({w for w in record.unknown_identifiers if w}, key=len, reverse=True):
        for match in re.finditer(rf"(?<![\w.]){re.escape(word)}(?![\w])", text):
            if not any(a < match.end() and match.start() < b for a, b, _ in marks):
                marks.append((match.start(), match.end(), f'<mark class="unknown" title="not in the program nor '
                                                          f'the question">{esc(match.group(0))}</mark>'))
    out, pos = [], 0
    for start, end, markup in sorted(marks):
        out += [esc(text[pos:start]), markup]
        pos = end
    out.append(esc(text[pos:]))
    return f'<div class="answer" id="answer">{"".join(out)}</div>'


def section_question(run: RunFolder) -> str:
    record = run.record
    if record is None:
        return ""
    parts = ["<h2>Question and answer</h2>", f'<div class="question" id="question">{esc(record.prompt)}</div>']
    grounded, reported = run.grounded(), record.grounded is not None
    why = ("the answer passed its checks with at least one valid citation" if reported else
           "at least one citation is valid") if grounded else \
        ("the checks could not ground this answer in the program" if reported else
         "no citation is valid: nothing in this answer is backed by the evidence below")
    if record.not_grounded and not grounded:  # the badge node's phrases, one per failed check
        why = "; ".join(record.not_grounded.values())
    if record.interrupted:
        why = "interrupted (Ctrl-C): the draft decoded so far, not checked"
    confidence = (f' <span class="badge" id="confidence" title="lead margin, cited evidence and checks; not a '
                  f'probability of being right">confidence {record.confidence:.2f}</span>'
                  if record.confidence is not None else "")
    parts.append(f'<p><span class="badge {"ok" if grounded else "warn"}" id="grounded">'
                 f'{"grounded" if grounded else "not grounded"}</span>{confidence} {esc(why)}</p>')
    parts.append(render_answer(run))
    parts.append('<p class="small muted">key: <a class="cite model">model citation</a> '
                 '<a class="cite attributed">attributed (added by citation repair)</a> '
                 '<span class="invalid">invalid</span> <mark class="unknown">unknown identifier</mark> '
                 '<span class="contradicted">claim the code contradicts</span></p>')
    head = [(k, v) for k, v in pick(flatten(run.telemetry), run.settings.get("headline") or []) if v is not None]
    if head:
        parts.append('<p class="facts">' + " ".join(f'<span class="fact"><span class="muted">{esc(k)}</span> '
                                                   f"<b>{esc(fmt(v))}</b></span>" for k, v in head) + "</p>")
    if record.unknown_identifiers:
        parts.append("<p>Unknown identifiers (in neither the program nor the question): "
                     + ", ".join(f'<mark class="unknown">{esc(u)}</mark>' for u in record.unknown_identifiers) + "</p>")
    if record.claims:
        rows = [[esc(c.name), esc(c.kind), esc(c.said), "<b>contradicted</b>" if c.verdict == "contradicted" else
                 esc(c.verdict), esc(c.code_says)] for c in record.claims]
        parts.append(f"<h3>Claims checked against the code: {record.claims_checked}, contradicted "
                     f"{record.claims_contradicted}</h3>"
                     + table(["about", "kind", "the answer says", "verdict", "the code says"], rows, raw=True))
    if record.citations:
        windows = spans(run)
        rows = []
        for c in record.citations:
            index = _window_for(windows, c.path, c.start, c.last)
            where = f"{esc(c.path)}:{esc(c.start)}-{esc(c.last)}"
            link = f'<a class="cite" href="#w{index}">{where}</a>' if index is not None and c.valid else \
                f'<span class="{"" if c.valid else "invalid"}">{where}</span>'
            rows.append([link, esc(c.source), "yes" if c.valid else "<b>no</b>", "yes" if c.removed else "",
                         esc(c.reason)])
        parts.append("<h3>Citations</h3>" + table(["citation", "source", "valid", "removed", "why"], rows, raw=True))
    return "".join(parts)


def section_evidence(run: RunFolder) -> str:
    windows = spans(run)
    files = run.record.files_selected if run.record else ()
    if not windows and not files:
        return ""
    cited: dict[str, list[tuple[int, int]]] = {}  # every valid citation, repeats included: each one is counted
    for c in run.record.citations if run.record else ():
        if c.valid and not c.removed:
            cited.setdefault(c.path, []).append((c.start, c.last))
    root = run.settings.get("program_root")
    parts = [f"<h2>Evidence: {len(windows)} packed windows</h2>",
             f'<p class="small muted">code read from {esc(root or "(unknown program root)")} when this report '
             f"was written</p>"]
    limit = int(run.settings.get("max_code_lines") or 400)
    hashes = source_hashes(run)
    for i, (w, score) in enumerate(windows):
        path, start, end = w.path, w.start, w.end
        cites = [(a, b) for a, b in cited.get(path, []) if a <= end and start <= b]
        marked = {n for a, b in cites for n in range(max(a, start), min(b, end) + 1)}
        badge = f' <span class="badge ok cited">cited ×{len(cites)}</span>' if cites else ""
        lines, why = read_lines(root, path, start, min(end, start + limit - 1), hashes.get(path))
        code = highlight(path, lines, start, marked) if lines is not None else \
            f'<p class="muted" style="padding:6px 10px">code not shown: {esc(why)}</p>'
        if lines is not None and why:
            code = f'<p class="banner warn small changed">{esc(why)}</p>{code}'
        if lines is not None and end - start + 1 > limit:
            code += f'<p class="small muted" style="padding:0 10px">… {end - start + 1 - limit} more lines</p>'
        scored = f"score {fmt(score)}" if score is not None else ""
        parts.append(f'<div class="window" id="w{i}" data-path="{esc(path)}"><div class="head mono">'
                     f'{i + 1}. [ctx] path: {esc(path)}:{start}-{end}{badge} '
                     f'<span class="muted small">{esc(scored)}</span></div>{code}</div>')
    if files and run.record is not None:
        scores = run.record.file_scores
        rows = [[i + 1, f, scores.get(f), sum(w.path == f for w, _ in windows)] for i, f in enumerate(files)]
        parts.append("<h3>Files selected</h3>" + table(["#", "file", "score", "windows packed"], rows))
        if run.record.modules_selected:
            parts.append(f'<p class="small">modules: {esc(", ".join(run.record.modules_selected))}</p>')
    return "".join(parts)
