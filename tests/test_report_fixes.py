"""Issue 37 item 8: the report's decode phase, citation counts per window and each job's answer in a sweep report
(the layout at 1,400 px and the bars in a browser: tests/test_report_browser.py)."""
from __future__ import annotations

import json
import re

import pytest
from report_fixtures import ANSWER, telemetry, trace, write_program, write_run

from pipeline.report import write_report


@pytest.fixture
def program(tmp_path):
    return write_program(tmp_path / "prog")


def cite(start: int, end: int, **changes) -> dict:
    record = {"path": "pkg/core.py", "start": start, "end": end, "valid": True, "source": "model", "removed": False,
              "reason": ""}
    return record | changes


def badges(html: str) -> dict[str, str]:
    """Each window's `cited ×N` badge ('' without one), by window id."""
    found = {}
    for match in re.finditer(r'<div class="window" id="(w\d+)"[^>]*><div class="head mono">(.*?)</div>', html):
        count = re.search(r"cited ×(\d+)", match.group(2))
        found[match.group(1)] = count.group(1) if count else ""
    return found


def test_a_window_cited_three_times_says_so(tmp_path, program):
    answer = "Add: pkg/core.py:4-6. Again pkg/core.py:4-6, and pkg/core.py:5-5. Parse: pkg/core.py:9-16."
    citations = [cite(4, 6), cite(4, 6), cite(5, 5), cite(9, 16, source="attributed"),
                 cite(1, 2, valid=False, reason="bad"), cite(10, 11, removed=True)]
    html = write_report(write_run(tmp_path / "run", program, telemetry(answer=answer, citations=citations))).read_text()
    # every valid citation counts, repeats of the same span included; an invalid or removed one does not
    assert badges(html) == {"w0": "3", "w1": "1"}


def test_the_default_fixture_counts_each_valid_citation_once(tmp_path, program):
    html = write_report(write_run(tmp_path / "run", program, telemetry())).read_text()
    assert badges(html) == {"w0": "1", "w1": "1"}


def test_decode_is_drawn_next_to_prefill_from_the_drafts_summary(tmp_path, program):
    # what the trace really holds: the draft's summary has `seconds` and `prefill_seconds`, no `decode_seconds`
    data = trace()
    decode = next(n for n in data["nodes"] if n["node"] == "decode")
    decode["seconds"] = 190.0
    decode["outputs"] = {"draft": {"generated_tokens": 300, "seconds": 183.0, "prefill_seconds": 40.0, "attempt": 1}}
    html = write_report(write_run(tmp_path / "run", program, telemetry(), data)).read_text()
    assert 'data-phase="prefill"' in html and 'data-phase="decode"' in html
    assert 'title="prefill 40 s"' in html and 'title="decode 143 s"' in html


def test_a_decode_node_without_sub_timings_takes_them_from_telemetry(tmp_path, program):
    decoding = {"attempts": 1, "prefill_seconds": 40.0, "decode_seconds": 143.0}
    html = write_report(write_run(tmp_path / "run", program, telemetry(decoding=decoding))).read_text()
    assert 'title="prefill 40 s"' in html and 'title="decode 143 s"' in html
    # two attempts (a retry decoded too): telemetry's sums are not this node's, nothing is drawn from them
    decoding["attempts"] = 2
    html = write_report(write_run(tmp_path / "run2", program, telemetry(decoding=decoding))).read_text()
    assert 'data-phase="decode"' not in html


def write_sweep(tmp_path, program, answers):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for number, answer in enumerate(answers):
        write_run(sweep / str(number), program, telemetry(answer=answer), overrides=[f"mix.alpha={8 * 2 ** number}"])
    return sweep


def jobs_table(html: str) -> tuple[list[str], list[list[str]]]:
    table = html[html.index('id="jobs"'):]
    table = table[:table.index("</table>")]
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table[table.index("<tbody>"):])]
    return header, rows


def test_the_sweep_report_shows_each_jobs_answer_escaped_and_cut(tmp_path, program):
    long = "word " * 100 + "<script>alert(1)</script>"
    sweep = write_sweep(tmp_path, program, [ANSWER, long, None])
    html = write_report(sweep).read_text()
    header, rows = jobs_table(html)
    column = header.index("status") + 1  # next to the status, before the metrics
    assert header[column] == "answer" and len(rows) == 3
    first, second, third = (row[column] for row in rows)
    assert first.startswith("Numbers are added by `add` in pkg/core.py:4-6") and "&lt;b&gt;bold&lt;/b&gt;" in first
    assert "<b>" not in first
    assert second.endswith("…") and len(second) <= 201 and "script" not in second  # the first 200 characters
    assert third == ""  # a job with no answer: an empty cell
    assert "<script>alert" not in html


def test_a_sweep_without_answers_has_no_answer_column(tmp_path, program):
    sweep = write_sweep(tmp_path, program, [None, None])
    for job in ("0", "1"):
        (sweep / job / "telemetry.json").write_text(json.dumps({k: v for k, v in telemetry().items() if k != "answer"}))
    header, _ = jobs_table(write_report(sweep).read_text())
    assert "answer" not in header
