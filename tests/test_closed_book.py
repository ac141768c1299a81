"""Issue 17 on the tiny model: exact batched candidate scoring and the closed-book symbol test graph."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import api
from pipeline.engine.errors import PipelineError
from stages.common.retrieval.evaluation import ranks

PROGRAM = {
    "shapes.py": "\n".join(
        f"def area_{i}(width, height):\n    \"\"\"Compute the area number {i}.\"\"\"\n    return width * height + {i}\n\n"
        for i in range(8)) + "\nclass Shape:\n    def draw(self):\n        return 'shape'\n",
    "colors.py": "def blend(a, b):\n    return (a + b) / 2\n\n\ndef _darken(color):\n    return color * 0.5\n",
}


def naive(lm, prompt, candidate):
    """log p(candidate | prompt) from one plain forward of prompt + candidate."""
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([prompt + candidate])).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(candidate))


def test_stage_scores_are_sums_or_means_of_exact_token_scores(tiny_lm, compose):
    """The stage's candidate scores (stages.common.generation.continuations, tested exact there) reduced per candidate."""
    from hydra.utils import instantiate

    prompt, candidates = list(range(20, 32)), [[5], [5, 7], [5, 7, 9], [6, 7, 8, 9, 10], [5, 7]]
    reference = np.array([naive(tiny_lm, prompt, c) for c in candidates])
    stage = instantiate(compose("closed_book.chunk_tokens=3").closed_book)
    assert np.allclose(stage._scores(tiny_lm, prompt, candidates, "sum"), reference, atol=1e-4)
    mean = stage._scores(tiny_lm, prompt, candidates, "mean")
    assert np.allclose(mean, reference / np.array([len(c) for c in candidates]), atol=1e-4)


def test_prompt_chat_and_prefix_make_the_scored_prompt(tiny_lm, compose):
    from hydra.utils import instantiate

    tok = tiny_lm.tokenizer
    default = instantiate(compose().closed_book)
    content = default.config.prompt.format(program="prog", question="What adds?")
    chat = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert default._prompt_ids(tiny_lm, "prog", "What adds?") == tok(chat, add_special_tokens=False)["input_ids"]
    plain = instantiate(compose("closed_book.chat=false", "closed_book.prompt='In {program}: {question}'",
                                "closed_book.prefix=' Name:'").closed_book)
    assert plain._prompt_ids(tiny_lm, "prog", "What adds?") == tok("In prog: What adds? Name:",
                                                                   add_special_tokens=False)["input_ids"]


def test_ranks_share_the_better_rank_on_ties():
    assert ranks(np.array([0.5, 2.0, 0.5, -1.0])).tolist() == [2, 1, 2, 4]


def questions_for(program, tmp_path, names):
    from stages.common.program.indexing import build_index

    index = build_index(str(program), [], 10**6, 80, None)
    by_name = {s.name: s for s in index.symbols}
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": f"What does {n} do?", "path": by_name[n].path,
                                        "start": by_name[n].start, "end": by_name[n].end, "symbol": n}) + "\n"
                            for n in names))
    return path, index


def closed_book(tmp_path, program, questions, *overrides, tag="run"):
    args = ["pipeline=closed_book", "model=tiny_random", f"program_root={program}", f"questions={questions}",
            f"paths.outputs={tmp_path / 'out'}", "closed_book.progress=false", *overrides]
    return api.run(args, run_dir=tmp_path / tag)


def test_closed_book_ranks_every_definition_name(tmp_path, make_tree, tiny_lm, compose):
    from hydra.utils import instantiate

    program = make_tree(tmp_path / "prog", PROGRAM)
    questions, index = questions_for(program, tmp_path, ["area_3", "blend", "draw", "Shape"])
    report, result = closed_book(tmp_path, program, questions, "synth=none", "closed_book.score=sum")
    written = json.loads((tmp_path / "run" / "closed_book.json").read_text())
    names = sorted({s.name for s in index.symbols})
    assert report["plain"]["candidates"] == len(names) == 12 and report["plain"]["questions"] == 4
    assert report["plain"] == report["mixed"] and written["synth"] == "none"  # nothing mixed in
    # each rank is the gold name's place among all names, scored exactly as a separate forward would
    stage = instantiate(compose("closed_book.score=sum").closed_book)  # the configured prompt and candidate templates
    for row in written["per_question"]:
        prompt = stage._prompt_ids(tiny_lm, program.name, row["question"])
        scores = np.array([naive(tiny_lm, prompt, tiny_lm.tokenizer(f"`{n}`", add_special_tokens=False)["input_ids"])
                           for n in names])
        assert row["rank"] == 1 + int(np.sum(scores > scores[names.index(row["gold"])] + 1e-6))
        assert row["top"][0] == names[int(np.argmax(scores))]
    m = report["plain"]
    ranked = np.array([r["rank"] for r in written["per_question"]])
    assert m["mrr"] == pytest.approx(np.mean(1 / ranked), abs=1e-4) and m["top5"] == np.mean(ranked <= 5)


def test_closed_book_mixed_differs_with_an_adapter(tmp_path, make_tree, capsys):
    program = make_tree(tmp_path / "prog", PROGRAM)
    questions, _ = questions_for(program, tmp_path, ["area_3", "blend"])
    report, _ = closed_book(tmp_path, program, questions, "synth=hashed", "closed_book.top=3", "eval.k=3",
                            "closed_book.progress=true")
    assert report["score"] == "pmi" and report["synth"] == "hashed"
    assert "top3" in report["plain"] and "top5" not in report["mixed"] and "top3_ratio" in report
    per_question = json.loads((tmp_path / "run" / "closed_book.json").read_text())["per_question"]
    assert all(1 <= r["rank"] <= 12 and 1 <= r["plain_rank"] <= 12 for r in per_question)
    assert all(len(r["top"]) == len(r["plain_top"]) == 3 for r in per_question)
    assert "closed book" in capsys.readouterr().err  # the progress bar


def test_closed_book_bad_inputs(tmp_path, make_tree):
    program = make_tree(tmp_path / "prog", PROGRAM)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "x?", "path": "colors.py", "start": 1, "end": 2,
                                     "symbol": "not_a_name"}) + "\n")
    with pytest.raises(PipelineError, match="'not_a_name' is not a name of the program"):
        closed_book(tmp_path, program, questions, "synth=none")
    good, _ = questions_for(program, tmp_path, ["blend"])
    with pytest.raises(PipelineError, match="closed_book.candidate"):
        closed_book(tmp_path, program, good, "synth=none", "closed_book.candidate=`{nam}`", tag="b")


def test_plain_ranking_is_computed_once_for_a_sweep_over_adapters(tmp_path, make_tree):
    from pipeline.engine import resources
    program = make_tree(tmp_path / "prog", PROGRAM)
    questions, _ = questions_for(program, tmp_path, ["area_3", "blend"])
    resources.clear("closed-book-plain")  # an earlier test may have ranked the same program and questions
    before = resources.stats("closed-book-plain")
    first, _ = closed_book(tmp_path, program, questions, "synth=none", tag="a")
    second, _ = closed_book(tmp_path, program, questions, "synth=hashed", tag="b")
    after = resources.stats("closed-book-plain")
    assert after["misses"] == before["misses"] + 1 and after["hits"] == before["hits"] + 1
    assert first["plain"] == second["plain"]


def test_closed_book_multirun_over_synthesizers_and_summary(tmp_path, make_tree, capsys):
    """`python -m pipeline.run -m ...` and `python -m pipeline.summary` through their mains in this process (the tiny
    model stays loaded); tests/test_cli.py and tests/test_summary.py run them as real processes."""
    from conftest import call_main

    import pipeline.run as run_app
    from pipeline.summary import main as summary_main

    program = make_tree(tmp_path / "prog", PROGRAM)
    questions, _ = questions_for(program, tmp_path, ["area_3", "blend", "Shape"])
    sweep = tmp_path / "sweep"
    code, _, err = call_main(run_app.main, [
        "-m", "pipeline=closed_book", "synth=none,hashed,fitted", "model=tiny_random", f"program_root={program}",
        f"questions={questions}", "closed_book.progress=false", f"paths.outputs={tmp_path / 'out'}",
        f"hydra.sweep.dir={sweep}"])
    assert code == 0, err[-2000:]
    reports = [json.loads((sweep / str(n) / "closed_book.json").read_text()) for n in range(3)]
    assert [r["synth"] for r in reports] == ["none", "hashed", "fitted"]
    assert reports[0]["plain"] == reports[1]["plain"] == reports[2]["plain"]
    assert summary_main([str(sweep), "--metric", "cb.mixed.mrr"]) == 0, capsys.readouterr().err
    header = (sweep / "summary.csv").read_text().splitlines()[0]
    assert "cb.mixed.top5" in header and "cb.plain.mrr" in header and (sweep / "summary_cb.mixed.mrr.png").is_file()


def test_shared_words_split():
    from stages.common.retrieval.evaluation import shares_words

    assert shares_words("is_ascii_encoding", "Checks if a given encoding is ascii.")
    assert shares_words("TerminalWidth", "Return the width of the terminal.")
    assert shares_words("_FixupStream", "The new io interface needs more from streams.")  # stream(s)
    assert not shares_words("_FixupStream", "The new io interface needs more than it gets.")
