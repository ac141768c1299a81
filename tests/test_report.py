"""Issue 15: report.html of a run and of a sweep (`python -m pipeline.report`), from files only."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from report_fixtures import telemetry, trace, write_program, write_run

from pipeline import PROJECT_ROOT
from pipeline.report import ReportError, salvage_object, write_report, write_run_report


@pytest.fixture
def program(tmp_path):
    return write_program(tmp_path / "prog")


def render(folder) -> str:
    return write_report(folder).read_text()


def test_citations_link_to_their_windows_and_bad_ones_are_marked(tmp_path, program):
    html = render(write_run(tmp_path / "run", program, telemetry()))
    # a valid citation is a link to the packed window it overlaps; the window is there with that id
    assert re.search(r'<a class="cite model" href="#w0"[^>]*>pkg/core\.py:4-6</a>', html)
    assert re.search(r'<a class="cite attributed" href="#w1"[^>]*>pkg/core\.py:9-16</a>', html)
    assert 'id="w0"' in html and 'id="w1"' in html
    # the invalid one is no link, marked, with its reason
    assert re.search(r'<span class="invalid" title="pkg/missing.py is not in the program">pkg/missing\.py:1-3</span>', html)
    assert 'href="#w2"' not in html
    # unknown identifiers are marked in the answer and listed
    assert re.search(r'<mark class="unknown"[^>]*>frobnicate_all</mark>', html)
    # the windows' code is highlighted, numbered from the window's first line, cited lines shaded
    window1 = html[html.index('id="w1"'):]
    assert re.search(r'<span class="linenos">\s*9</span>', window1) and 'class="hll"' in window1
    assert "parse_config" in window1 and "score 3.25" in window1  # its score
    assert "score" not in html[html.index('id="w0"'):html.index('id="w1"')]  # a window nothing scored
    assert re.search(r"<td>pkg/core\.py</td><td[^>]*>7\.125</td>", html)  # the file's selection score
    # the headline facts, the adapter, the graph with every node and its status
    assert 'id="grounded"' in html and "tokens_per_second" in html
    assert "q_proj" in html and "Adapter" in html
    for node in ("index", "select", "pack", "decode", "cite", "telemetry"):
        assert f'data-node="{node}" data-status="ok"' in html


def test_program_text_question_and_answer_are_escaped(tmp_path, program):
    html = render(write_run(tmp_path / "run", program, telemetry()))
    assert "<script" not in html  # a run report has no script of its own; the program's is text
    assert re.search(r"&lt;script&gt;alert\((&quot;|\")pwned(&quot;|\")\)&lt;/script&gt;", html)
    assert "&lt;/pre&gt;" in html
    assert "How is &lt;config&gt; parsed? ${x}" in html  # the question: escaped, never interpolated
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold</b>" not in html


def test_missing_telemetry_still_renders_and_says_what_is_missing(tmp_path, program):
    html = render(write_run(tmp_path / "run", program, None))
    assert 'id="missing"' in html and "telemetry.json" in html[html.index('id="missing"'):][:300]
    assert 'data-node="decode"' in html  # the trace still shows the graph


def test_truncated_telemetry_renders_its_complete_entries(tmp_path, program):
    run = write_run(tmp_path / "run", program, telemetry())
    text = (run / "telemetry.json").read_text()
    (run / "telemetry.json").write_text(text[:text.index('"citations"') + 30])
    html = render(run)
    assert "telemetry.json: truncated or invalid" in html
    assert "How is &lt;config&gt; parsed?" in html and 'id="w0"' in html  # entries before the cut are shown
    assert 'href="#w' not in html  # the citations were cut off: nothing is linked as if checked


def test_salvage_keeps_only_complete_entries():
    data, _ = salvage_object('{"a": 1, "b": [1, 2], "c": {"d": ')
    assert data == {"a": 1, "b": [1, 2]}
    assert salvage_object("{")[0] == {}


def test_failed_run_report_shows_the_failing_node(tmp_path, program):
    tele = telemetry(status="failed", error="node 'pack': program root does not exist", answer=None, citations=[])
    html = render(write_run(tmp_path / "run", program, tele, trace(failed="pack")))
    banner = re.search(r'<div class="banner failed" id="failure">(.*?)</div>', html).group(1)
    assert "<b>pack</b>" in banner and "program root does not exist" in banner
    assert 'data-node="pack" data-status="failed"' in html and 'data-node="decode" data-status="skipped"' in html
    assert 'id="status">failed' in html


def test_prefill_and_decode_are_drawn_apart_when_the_trace_has_them(tmp_path, program):
    html = render(write_run(tmp_path / "run", program, telemetry(), trace(phases=True)))
    assert 'title="prefill 0.2 s"' in html and 'title="decode 0.3 s"' in html


def test_a_window_outside_the_program_root_is_not_read(tmp_path, program):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE\n" * 5)
    (program / "pkg" / "link.py").symlink_to(secret)
    tele = telemetry(windows_packed=[{"path": "pkg/link.py", "start": 1, "end": 3},
                                     {"path": "../secret.txt", "start": 1, "end": 3}])
    html = render(write_run(tmp_path / "run", program, tele))
    assert "TOP-SECRET-LINE" not in html
    assert html.count("is not a file inside the program root") == 2


@pytest.mark.parametrize("make", ["empty", "file", "missing"])
def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path, make):
    target = tmp_path / "x"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("hello")
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", str(target)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout
    with pytest.raises(ReportError):
        write_run_report(target)


def write_sweep(tmp_path, program, values):
    sweep = tmp_path / "sweep"
    (sweep).mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for number, (alpha, seconds) in enumerate(values):
        tele = telemetry(alpha=alpha, elapsed_sec=seconds)
        write_run(sweep / str(number), program, tele, overrides=[f"mix.alpha={alpha}", "model=tiny_random"])
    return sweep


def test_sweep_report_links_every_job_and_sorts(tmp_path, program):
    sweep = write_sweep(tmp_path, program, [(8, 3.0), (16, 1.0), (32, 2.0)])
    html = render(sweep)
    for job in "012":
        assert f'href="{job}/report.html"' in html and (sweep / job / "report.html").is_file()
    assert 'class="sortable"' in html and "<script>" in html  # the sorting script is inline
    assert re.search(r"<th>mix\.alpha</th>", html)
    # a metric whose values are all equal says so (citations_valid is 2 in every job)
    chart = html[html.index("<h3>citations_valid</h3>"):][:300]
    assert "all 3 values are equal (2)" in chart
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched


def test_report_cli_prints_where_it_wrote(tmp_path, program):
    run = write_run(tmp_path / "run", program, telemetry())
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", str(run)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {run / 'report.html'}"
    json.loads((run / "telemetry.json").read_text())  # the run's own files are left as they were


def test_a_broken_config_is_named_and_the_rest_renders(tmp_path, program):
    run = write_run(tmp_path / "run", program, telemetry())
    (run / ".hydra" / "config.yaml").write_text("program_root: [unclosed\n")
    html = render(run)
    assert ".hydra/config.yaml: unreadable" in html and 'id="answer"' in html
    assert "code not shown: the program root is unknown" in html


def test_a_file_changed_since_the_run_is_flagged(tmp_path, program):
    import hashlib

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "manifest.json").write_text(json.dumps({"model_id": "tiny", "rank": 12, "synth": {"name": "fitted",
                                                          "val_perplexity_plain": 12.4, "val_perplexity_fitted": 9.3}}))
    seen = hashlib.sha256((program / "pkg" / "core.py").read_bytes()).hexdigest()
    (artifacts / "sources.jsonl").write_text(json.dumps({"path": "pkg/core.py", "sha256": seen, "bytes": 1}) + "\n")
    tr = trace()
    tr["nodes"][0]["outputs"] = {"artifacts": {"path": str(artifacts), "rank": 12}}
    run = write_run(tmp_path / "run", program, telemetry(), tr)
    html = render(run)
    assert "changed since the run" not in html
    assert "val_perplexity_fitted" in html and "9.3" in html  # the build's perplexities, from its manifest
    with open(program / "pkg" / "core.py", "a") as handle:
        handle.write("# edited after the run\n")
    assert html.count("pkg/core.py changed since the run") == 0
    assert render(run).count("pkg/core.py changed since the run") == 2  # both windows say so


def test_grounded_comes_from_telemetry_or_else_from_valid_citations(tmp_path, program):
    def badge(**changes):
        html = render(write_run(tmp_path / f"run{len(list(tmp_path.iterdir()))}", program, telemetry(**changes)))
        return re.search(r'id="grounded">([^<]*)</span>', html).group(1)

    assert badge() == "grounded"
    assert badge(grounded=False) == "not grounded"  # telemetry's own verdict wins over the valid citations
    assert badge(grounded=None) == "grounded"  # not reported: one valid citation is enough
    assert badge(grounded=None, citations=[]) == "not grounded"


def test_the_telemetry_record_reads_back_what_it_wrote_and_older_files():
    from pipeline.engine.records import CitationRecord, Telemetry

    data = telemetry()
    record = Telemetry.from_json(data)
    assert record.to_json() == {**Telemetry().to_json(), **data}  # absent keys take their defaults
    assert record.citations[2] == CitationRecord(path="pkg/missing.py", start=1, end=3, valid=False, removed=True,
                                                 reason="pkg/missing.py is not in the program")
    assert record.extra == {"tokens_per_second": 12.5}  # a key without a field is kept, at the top level on disk
    assert Telemetry.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="key 'retries': expected an integer, got 'one'"):
        Telemetry.from_json({**data, "retries": "one"})
    assert Telemetry.from_json({**data, "retries": "one"}, strict=False).retries == 0


def test_a_value_of_the_wrong_type_is_named_and_the_rest_renders(tmp_path, program):
    html = render(write_run(tmp_path / "run", program, telemetry(citations="oops")))
    assert "telemetry.json: key &#x27;citations&#x27;: expected a list, got &#x27;oops&#x27;" in html
    assert 'id="answer"' in html and 'href="#w' not in html  # no citation is linked as if checked
    assert 'id="w0"' in html


def test_what_ran_after_a_ctrl_c_is_said_from_the_trace(tmp_path, program):
    from pipeline.runfolder import interrupt_notes, settings_of

    settings = settings_of(None)
    tr = trace()
    tr["nodes"].append({"node": "unmix", "status": "ok", "seconds": 0.0, "outputs": {"restored": True}})
    run = write_run(tmp_path / "run", program, telemetry(), tr)
    assert interrupt_notes(run, settings) == ["model weights restored"]
    tr["nodes"][-1].update(status="skipped", outputs={})  # interrupted before anything was mixed
    run = write_run(tmp_path / "run2", program, telemetry(), tr)
    assert interrupt_notes(run, settings) == []
