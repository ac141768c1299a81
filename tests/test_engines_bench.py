"""The engines bench (issue 38, item 1): the GGUF each engine reads, the shared prompt ids, a skip row without
llama-cpp-python, and llama.cpp's greedy tokens against transformers' on SmolLM2's GGUF where it is installed."""
from __future__ import annotations

import sys

import pytest

NO_LLAMA_CPP = "llama-cpp-python is an optional extra (pip install -e '.[engines]'); the engines bench needs it"


def test_smollm2_gguf_is_the_file_its_model_node_reads():
    from bench.engines import model_stage

    path = model_stage("smollm2").gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.read_bytes()[:4] == b"GGUF"


def test_both_engines_get_the_same_prompt_ids_of_the_asked_length(tiny_lm):
    from bench.engines import prompt_ids

    ids = prompt_ids(tiny_lm.tokenizer, 300)
    assert len(ids) == 300 and ids == prompt_ids(tiny_lm.tokenizer, 300)
    with pytest.raises(RuntimeError, match="fewer than"):
        prompt_ids(tiny_lm.tokenizer, 10**9)


def test_without_llama_cpp_the_bench_is_one_row_that_says_how_to_install_it(monkeypatch):
    from bench.engines import engines

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    rows = engines(("smollm2",))
    assert len(rows) == 1 and "skipped" in rows[0]["name"] and ".[engines]" in rows[0]["detail"]


def test_llama_cpp_greedy_tokens_follow_transformers_on_smollm2():
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    from bench.decoding import _plain_generate
    from bench.engines import _llama_run, model_stage, prompt_ids

    stage = model_stage("smollm2")
    lm = stage.run()["lm"]
    ids = prompt_ids(lm.tokenizer, 200)
    ours = _plain_generate(lm, ids, tokens=8)
    llama = _llama_run(stage.gguf_path(), ids, threads=2, tokens=8)
    # the same greedy start from the Q4 file and its bfloat16 conversion (the logits read are the last position's)
    assert llama["ids"][:4] == ours["ids"][:4]
    assert llama["prefill"] > 0 and llama["tps"] > 0
