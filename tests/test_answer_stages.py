"""Answer stages between selection and telemetry (docs/behaviour.md §5, §6) with the tiny random model: pack, prompt, decode,
choose, telemetry."""
from __future__ import annotations

import json

import pytest

from pipeline.engine.errors import ConfigError
from pipeline.engine.execute import NodeTrace, RunResult
from pipeline.engine.stage import RunContext
from stages.choose import ChooseBetter
from stages.common.grounding.citations import check
from stages.common.types import Answer, Draft, Prompt, Selection, Window
from stages.decode import Decode, RetryDecode
from stages.pack import PackFunctionFirst, PackHeads, PackWindows
from stages.scaffold import BuildPrompt
from stages.select import QuestionSelect
from stages.telemetry import WriteTelemetry

TREE = {
    "kettle.py": (
        '"""Kettle control."""\n\n\n'
        "def boil_water(litres):\n"
        '    """Boil the given litres of water."""\n'
        "    return litres * 90\n\n\n"
        "def pour_water(cup):\n"
        "    return cup\n\n\n"
        "def descale(kettle):\n"
        "    # remove lime\n"
        "    return kettle\n"
    ),
    "cup.py": "class Cup:\n    \"\"\"A cup that holds water.\"\"\"\n\n    def fill(self, water):\n        return water\n",
    "notes.txt": "Water boils at 100 degrees.\n" * 3,
}
QUESTION = "How does boil_water heat the water?"


@pytest.fixture(scope="module")
def program(tmp_path_factory, make_index):
    return make_index(tmp_path_factory.mktemp("kettle"), TREE)


@pytest.fixture(scope="module")
def selection(program):
    return QuestionSelect(top_k=8).run(program, QUESTION)["selection"]


def count_tokens(tokenizer, windows):
    return sum(len(tokenizer(w.block() + "\n\n", add_special_tokens=False)["input_ids"]) for w in windows)


# ---------------------------------------------------------------- pack


def check_blocks(program, evidence):
    for w in evidence.windows:
        assert w.header == f"[ctx] path: {w.path}:{w.start}-{w.end}"
        assert w.block().splitlines()[0] == w.header
        assert w.end <= program.files[w.path].lines
        assert w.text == "\n".join(program.lines(w.path)[w.start - 1:w.end])  # the exact source lines


def test_pack_windows(program, selection, tiny_lm):
    assert selection.files[0] == "kettle.py"
    evidence = PackWindows(context_tokens=2000).run(program, selection, QUESTION, tiny_lm)["evidence"]
    check_blocks(program, evidence)
    assert evidence.windows[0].path == "kettle.py" and "def boil_water" in evidence.windows[0].text
    # at most two windows per file, the better one first; packed files are selected files
    paths = [w.path for w in evidence.windows]
    assert all(paths.count(p) <= 2 for p in paths) and set(paths) <= set(selection.files)
    for path in set(paths):
        mine = [w for w in evidence.windows if w.path == path]
        assert mine[0].score >= mine[-1].score
    assert evidence.tokens == count_tokens(tiny_lm.tokenizer, evidence.windows) <= 2000
    one = PackWindows(context_tokens=2000, windows_per_file=1).run(program, selection, QUESTION, tiny_lm)["evidence"]
    assert len({w.path for w in one.windows}) == len(one.windows)


def test_pack_windows_beyond_two_per_file(tmp_path, make_index, tiny_lm):
    """`windows_per_file` > 2: a file's further windows are disjoint from the ones before them, in
    score order, never scored 0, and go ahead of a later file's best window only when they outscore it."""
    body = "".join(f"def step_{i}(x):\n    return x + {i}\n\n\n" for i in range(5))
    program = make_index(tmp_path, {"long.py": body, "other.py": "def lone(y):\n    return y\n"})
    defs = {w.anchor.rsplit(".", 1)[-1]: w for w in program.windows if w.kind == "function"}
    head = next(w for w in program.windows if w.path == "long.py" and w.kind == "head")
    overlapping = Window("long.py", defs["step_3"].start, defs["step_4"].end, "step_3", "function")  # never shown
    ranking = {
        "long.py": [(9.0, defs["step_0"]), (8.0, defs["step_3"]), (7.5, overlapping), (6.0, defs["step_2"]), (5.0, defs["step_4"]),
                    (4.0, defs["step_1"]), (0.0, head)],
        "other.py": [(7.0, defs["lone"])],
    }
    selection = Selection(["long.py", "other.py"], [], {}, [], 2, window_ranking=ranking)
    spans = lambda wpf, weight=1.0: [(w.path, w.start) for w in PackWindows(  # noqa: E731
        context_tokens=100_000, windows_per_file=wpf, second_window_weight=weight).run(
        program, selection, QUESTION, tiny_lm)["evidence"].windows]
    start = {name: w.start for name, w in defs.items()}
    assert spans(2) == [("long.py", start["step_0"]), ("long.py", start["step_3"]), ("other.py", 1)]
    assert spans(3) == [("long.py", start["step_0"]), ("long.py", start["step_3"]), ("other.py", 1),
                        ("long.py", start["step_2"])]  # 6 < 7: after the other file's best
    assert spans(9) == spans(3)[:3] + [("long.py", start[n]) for n in ("step_2", "step_4", "step_1")]
    assert spans(9, weight=0.0)[:2] == [("long.py", start["step_0"]), ("other.py", 1)]


def test_pack_windows_never_packs_the_same_span_twice(program, selection, tiny_lm):
    evidence = PackWindows(context_tokens=2000).run(program, selection, QUESTION, tiny_lm)["evidence"]
    spans = [(w.path, w.start, w.end) for w in evidence.windows]
    assert len(spans) == len(set(spans)), spans


def test_pack_respects_the_token_budget(program, selection, tiny_lm):
    full = PackWindows(context_tokens=100_000).run(program, selection, QUESTION, tiny_lm)["evidence"]
    budget = count_tokens(tiny_lm.tokenizer, full.windows[:1]) + 5
    small = PackWindows(context_tokens=budget).run(program, selection, QUESTION, tiny_lm)["evidence"]
    assert 1 <= len(small.windows) < len(full.windows) and small.tokens <= budget
    with pytest.raises(ConfigError, match="context_tokens"):
        PackWindows(context_tokens=3).run(program, selection, QUESTION, tiny_lm)


def test_pack_heads(program, selection, tiny_lm):
    evidence = PackHeads(context_tokens=2000).run(program, selection, QUESTION, tiny_lm)["evidence"]
    check_blocks(program, evidence)
    assert [w.start for w in evidence.windows] == [1] * len(evidence.windows)
    assert [w.path for w in evidence.windows] == [p for p in selection.files if program.windows_of(p)]


def test_pack_function_first(program, selection, tiny_lm):
    stage = PackFunctionFirst(context_tokens=2000, ff_window_lines=3, ff_max_candidates=4)
    evidence = stage.run(program, selection, QUESTION, tiny_lm)["evidence"]
    check_blocks(program, evidence)
    assert 1 <= len(evidence.windows) <= 4 and all(w.end - w.start < 3 for w in evidence.windows)
    assert all(-1.0 <= w.score <= 1.0 for w in evidence.windows)


# ---------------------------------------------------------------- prompt


@pytest.fixture(scope="module")
def evidence(program, selection, tiny_lm):
    return PackWindows(context_tokens=2000).run(program, selection, QUESTION, tiny_lm)["evidence"]


def test_prompt_standard_scaffold(evidence, tiny_lm):
    prompt = BuildPrompt(min_citations=3).run(QUESTION, evidence, tiny_lm)["prompt"]
    user = prompt.messages[-1]["content"]
    for w in evidence.windows:
        assert w.block() in user
    first = evidence.windows[0]
    assert f"{first.path}:{first.start}-{first.end}" in user  # the example is the first packed window
    assert "at least 3" in user and QUESTION in user
    assert prompt.text.startswith("<|im_start|>system") and prompt.text.endswith("<|im_start|>assistant\n")
    assert prompt.prefill == "" and prompt.decode_hints == {} and prompt.attempt == 1


def test_prompt_per_paragraph_and_strong(evidence, tiny_lm):
    per = BuildPrompt(citations_per_paragraph=True).run(QUESTION, evidence, tiny_lm)["prompt"]
    assert "paragraph" in per.messages[-1]["content"]
    strong = BuildPrompt(scaffold="strong", attempt=2).run(QUESTION, evidence, tiny_lm)["prompt"]
    first = evidence.windows[0]
    assert f"[{first.path}:{first.start}-{first.end}]" in strong.messages[-1]["content"] and strong.attempt == 2
    plain = BuildPrompt(require_citations=False).run(QUESTION, evidence, tiny_lm)["prompt"]
    assert "citation" not in plain.messages[-1]["content"].lower()


def test_prompt_system_message(evidence, tiny_lm):
    prompt = BuildPrompt(system="Answer in French.").run(QUESTION, evidence, tiny_lm)["prompt"]
    assert prompt.messages[0] == {"role": "system", "content": "Answer in French."}
    assert "Answer in French." in prompt.text
    assert BuildPrompt().run(QUESTION, evidence, tiny_lm)["prompt"].messages[0]["content"].startswith("You answer")


def test_prompt_instruction_replaces_the_built_rules(evidence, tiny_lm):
    said = "Start with `name` [{example}], then answer in two sentences."
    prompt = BuildPrompt(instruction=said, min_citations=3).run(QUESTION, evidence, tiny_lm)["prompt"]
    first = evidence.windows[0]
    user = prompt.messages[-1]["content"]
    assert user.endswith(f"Question: {QUESTION}\n\nStart with `name` [{first.path}:{first.start}-{first.end}], then "
                         "answer in two sentences.")
    assert "at least 3" not in user and "Cite the lines" not in user
    assert prompt.citations  # the citable spans are the packed windows, as without it


def test_prompt_adapter_aware(evidence, tiny_lm):
    prompt = BuildPrompt(adapter_aware_decoding=True, prefill_pointer=True).run(QUESTION, evidence, tiny_lm)["prompt"]
    first = evidence.windows[0]
    assert prompt.prefill == f"[{first.path}:{first.start}-{first.end}] "
    assert prompt.decode_hints == {"top_p": pytest.approx(0.03), "repetition_penalty": pytest.approx(-0.05)}


# ---------------------------------------------------------------- decode


def test_decode_settings():
    plain = Prompt([], "x")
    hinted = Prompt([], "x", decode_hints={"top_p": 0.03, "repetition_penalty": -0.05})
    stage = Decode(top_p=0.98, repetition_penalty=1.02, min_new_tokens=64, max_new_tokens=16)
    assert stage.for_prompt(plain).min_new_tokens == 16  # never more than max
    s = stage.for_prompt(hinted)
    assert s.top_p == pytest.approx(0.99) and s.repetition_penalty == pytest.approx(1.0)
    assert stage.for_prompt(plain).repetition_penalty == 1.02
    assert Decode(top_p=0.5).for_prompt(hinted).top_p == pytest.approx(0.53)
    retry = RetryDecode(do_sample=True, max_new_tokens=16).for_prompt(plain)
    assert retry.do_sample is False and retry.max_new_tokens == 256 and retry.min_new_tokens == 16
    assert RetryDecode(max_new_tokens=300).for_prompt(plain).max_new_tokens == 300
    assert RetryDecode(max_new_tokens=16, max_new_tokens_floor=20).for_prompt(plain).max_new_tokens == 20


def test_sampling_narrows_to_greedy_with_top_k_one_or_a_cold_temperature(evidence, tiny_lm):
    """top_k=1 keeps only the likeliest token and a temperature near 0 makes it all but certain: either way sampling
    writes the greedy reply, whatever the seed; hot and unrestricted, some seed writes another."""
    prompt = BuildPrompt(form="free").run(QUESTION, evidence, tiny_lm)["prompt"]
    free = {"constrain": [], "max_new_tokens": 8, "min_new_tokens": 8}
    greedy = Decode(**free).run(tiny_lm, prompt)["draft"].text

    def sampled(seed: int, **config) -> str:
        return Decode(do_sample=True, seed=seed, **free, **config).run(tiny_lm, prompt)["draft"].text

    for seed in (1, 2, 3):
        assert sampled(seed, top_k=1, temperature=1.5) == greedy
        assert sampled(seed, top_k=0, temperature=1e-4) == greedy
    assert {sampled(seed, top_k=0, temperature=1.5) for seed in (1, 2, 3)} - {greedy}


def test_decode_runs_and_counts_tokens(evidence, tiny_lm):
    prompt = BuildPrompt().run(QUESTION, evidence, tiny_lm)["prompt"]
    draft = Decode(min_new_tokens=4, max_new_tokens=4).run(tiny_lm, prompt)["draft"]
    assert draft.generated_tokens == 4 and draft.prompt_tokens > 0 and draft.device == "cpu"
    again = Decode(min_new_tokens=4, max_new_tokens=4).run(tiny_lm, prompt)["draft"]
    assert again.text == draft.text  # greedy is deterministic
    prefilled = Prompt(prompt.messages, prompt.text, prefill="[kettle.py:4-6] ")
    out = Decode(min_new_tokens=2, max_new_tokens=2).run(tiny_lm, prefilled)["draft"]
    assert out.text.startswith("[kettle.py:4-6]") and out.prefill_chars == len("[kettle.py:4-6]")


# ---------------------------------------------------------------- choose and telemetry


def attempt(text, program, evidence, n=1):
    draft = Draft(text, 10, 5, 0.1, "cpu", attempt=n)
    return draft, check(text, program, evidence, 1, False, [])


def test_choose(program, evidence):
    w = evidence.windows[0]
    good = f"It boils {w.path}:{w.start}-{w.end}."
    first, first_report = attempt("It boils.", program, evidence)
    retry, retry_report = attempt(good, program, evidence, 2)
    chosen = ChooseBetter().run(first, first_report)["answer"]
    assert (chosen.text, chosen.retries, chosen.fallback_used) == ("It boils.", 0, False)
    better = ChooseBetter().run(first, first_report, retry, retry_report)["answer"]
    assert (better.text, better.retries, better.fallback_used) == (good, 1, True)
    assert better.draft is retry and better.report is retry_report
    worse = ChooseBetter().run(retry, retry_report, first, first_report)["answer"]
    assert (worse.text, worse.retries, worse.fallback_used) == (good, 1, False)


def test_telemetry_record(tmp_path, program, selection, evidence, tiny_lm):
    w = evidence.windows[0]
    draft, report = attempt(f"It boils {w.path}:{w.start}-{w.end} and other.py:1.", program, evidence)
    answer = Answer(draft.text, report.citations, draft, report, 0, False)
    ran = [NodeTrace("select", "s.Select", "ok", 0.5), NodeTrace("praise", "s.Praise", "skipped"),
           NodeTrace("decode", "s.Decode", "ok", 1.25)]
    ctx = RunContext(tmp_path / "run", ["a=1"], {}, result=RunResult({}, ran))
    out_file = tmp_path / "copy" / "t.json"
    record = WriteTelemetry(telemetry_out=str(out_file)).run(ctx, QUESTION, answer, selection, evidence,
                                                             tiny_lm)["telemetry"].to_json()
    on_disk = json.loads((tmp_path / "run" / "telemetry.json").read_text())
    assert on_disk == json.loads(out_file.read_text()) == json.loads(json.dumps(record, default=str))
    assert record["status"] == "ok" and record["overrides"] == ["a=1"] and record["prompt"] == QUESTION
    assert record["files_selected"] == selection.files
    assert record["windows_packed"] == [{"path": x.path, "start": x.start, "end": x.end} for x in evidence.windows]
    assert (record["citations_total"], record["citations_valid"], record["citations_model"]) == (2, 1, 2)
    assert record["timings"] == {"select": 0.5, "decode": 1.25} and record["elapsed_sec"] == pytest.approx(1.75)
    assert record["tokens"] == {"prompt": 10, "generated": 5} and record["model"] == tiny_lm.model_id


def test_telemetry_after_a_failure(tmp_path):
    result = RunResult({}, [])
    result.fail("decode", RuntimeError("boom"))
    ctx = RunContext(tmp_path, [], {}, result=result)
    record = WriteTelemetry().run(ctx)["telemetry"].to_json()
    assert record["status"] == "failed" and "decode" in record["error"]
    assert record["answer"] is None and record["citations"] == []
    assert json.loads((tmp_path / "telemetry.json").read_text())["status"] == "failed"
