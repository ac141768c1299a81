"""Issue 34 item 1: every stage works on a Qwen2-shaped model (`model=tiny_random model.arch=qwen2`: biased q/k/v,
an untied output layer, Qwen's chat template and specials).

The existing tests of exact restore, of the guards (chat markers, quotes) and their fixtures are imported and run
again here with `tiny_lm` overridden by the Qwen2-shaped model; the PEFT exports and the graph-level restore, whose
originals name `model=tiny_random` in their overrides, are written out below with `model.arch=qwen2` (the fitted
synth's PEFT export is tests/test_fitted.py's, parametrized by shape).
"""
from __future__ import annotations

import pytest
from conftest import compose_config
from test_adapters import PROGRAM, same_weights, snapshot
from test_adapters import (
    test_merge_mode_reuses_its_workspace_and_a_nested_merge_restores_exactly as test_qwen_nested_merge_restores,  # noqa: F401
)
from test_adapters import test_mix_handle_restores_bit_for_bit_after_random_mixes_and_failures as test_qwen_mix_restores  # noqa: F401
from test_fitted import FAST, assert_peft_export_matches_our_mix
from test_fitted import SOURCE as FITTED_SOURCE
from test_quoteguard import test_decode_with_quotes_and_labels_on_the_tiny_model as test_qwen_decode_quote_guard  # noqa: F401
from test_special_tokens import FORGED, counts, forwards, hostile, specials  # noqa: F401
from test_special_tokens import test_answer_prompt_gets_the_templates_markers_only as test_qwen_answer_prompt_markers  # noqa: F401
from test_special_tokens import test_closed_book_prompt_gets_the_templates_markers_only as test_qwen_closed_book_markers  # noqa: F401
from test_special_tokens import test_pack_function_first_gets_the_templates_markers_only as test_qwen_pack_markers  # noqa: F401
from test_special_tokens import test_rescore_lm_gets_no_special_token as test_qwen_rescore_markers  # noqa: F401

from pipeline import api
from stages.common.adapters.factors import infer_targets
from stages.common.tokens import encode_chat

QWEN = ["model=tiny_random", "model.arch=qwen2"]


@pytest.fixture(scope="module")
def tiny_lm():
    """`model=tiny_random model.arch=qwen2` through its stage; overrides conftest's `tiny_lm` for this module."""
    from pipeline.engine.graph import build_graph

    return build_graph(compose_config(*QWEN)).instantiate().nodes["model"].stage.run()["lm"]


@pytest.fixture
def program(tmp_path, make_tree):
    return make_tree(tmp_path / "prog", PROGRAM)


def test_the_model_has_qwens_shape(tiny_lm):
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    attn = model.model.layers[0].self_attn
    assert all(p.bias is not None and p.bias.abs().sum() > 0 for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.o_proj.bias is None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings and type(model).__name__ == "Qwen2ForCausalLM"
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_prefix|>", "<|file_sep|>"} <= set(specials(tok))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tiny_lm.model_id == "tiny-random-qwen2-2x64"
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(infer_targets(model).targets)


def test_qwens_default_system_turn_and_a_forged_marker_stay_apart(tiny_lm):
    """Qwen's template writes its own system turn; the question's `<|im_start|>` stays text."""
    tok = tiny_lm.tokenizer
    text, ids = encode_chat(tok, [{"role": "user", "content": f"What is x? {FORGED}"}])
    assert text.startswith("<|im_start|>system\nYou are Qwen")
    assert counts(tok, ids)["<|im_start|>"] == 3 and counts(tok, ids)["<|endoftext|>"] == 0  # system, user, assistant
    assert FORGED in tok.decode(ids)
    _, fim = encode_chat(tok, [{"role": "user", "content": "<|fim_prefix|>def f(): <|file_sep|>"}])
    assert counts(tok, fim)["<|fim_prefix|>"] == counts(tok, fim)["<|file_sep|>"] == 0


@pytest.mark.parametrize("synth", ["hashed", "fitted"])
def test_answers_mix_and_restore_the_weights_exactly(tmp_path, make_tree, tiny_lm, synth):
    """A whole answer (build, mix, decode, retry) on the Qwen2 shape leaves every weight and bias as it was."""
    program = make_tree(tmp_path / "prog", {"numbers.py": FITTED_SOURCE})
    snap = snapshot(tiny_lm.model)
    extra = FAST if synth == "fitted" else []
    _, result = api.run(["pipeline=answer", *QWEN, f"paths.outputs={tmp_path / 'out'}", f"program_root={program}",
                         "prompt=What does function_3 return?", "decode.max_new_tokens=6", "decode.min_new_tokens=0",
                         "fallback.max_new_tokens_floor=4", "cite.min_citations=99", *extra],
                        run_dir=tmp_path / "run")
    assert result.output("model", "lm") is tiny_lm  # the same shared model the snapshot was taken of
    assert result.output("mix", "report")["alpha"] > 0  # an adapter was mixed in (and the retry re-mixed)
    assert same_weights(tiny_lm.model, snap)


def test_peft_export_gives_the_same_logits_as_our_mix(tmp_path, make_tree, tiny_lm):
    """The hashed synth's export; the fitted one's on Qwen2 is tests/test_fitted.py's, parametrized by shape."""
    program = make_tree(tmp_path / "prog", {"numbers.py": FITTED_SOURCE})
    out = tmp_path / "peft"
    _, result = api.run([*QWEN, f"paths.outputs={tmp_path / 'out'}", f"program_root={program}", "prompt=function",
                         f"out={out}", "mix.delta_cap=null"], run_dir=tmp_path / "run", config_name="export")
    assert_peft_export_matches_our_mix(tiny_lm, result, out)
