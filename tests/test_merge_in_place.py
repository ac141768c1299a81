"""mix.mode=merge writes into weights loaded from a checkpoint file and reads them back from it (no merged copies)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.engine.errors import InputError
from stages.common.adapters.factors import infer_targets
from stages.common.adapters.mixing import _WORKSPACES, AdapterMix, MixSettings
from stages.common.adapters.synthesis import synthesize
from stages.common.adapters.weightfile import weight_file
from stages.common.models.tiny import byte_tokenizer
from stages.model import HFCheckpoint


def save_tiny(folder, dtype=torch.bfloat16, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def bits(model) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k, v in model.state_dict().items()}


def load(folder, dtype="bfloat16"):
    return HFCheckpoint(id=str(folder), dtype=dtype).run()["lm"]


def mix_of(lm, seed=0):
    tmap = infer_targets(lm.model)
    adapters = synthesize(np.random.default_rng(seed).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 4, 0)
    settings = MixSettings(0.0, 4.0, 4, {}, [1.0] * tmap.num_layers, {}, None)
    return AdapterMix(lm, tmap, "merge", adapters, None, 4.0), settings, tmap


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_merge_writes_in_place_and_reads_back_bit_for_bit(tmp_path, dtype):
    lm = load(save_tiny(tmp_path / "ckpt", getattr(torch, dtype)), dtype)
    before = bits(lm.model)
    mix, settings, tmap = mix_of(lm)
    ids = torch.randint(0, 250, (1, 8))
    with torch.no_grad():
        hooks = AdapterMix(lm, tmap, "hooks", mix.base, None, 4.0)
        hooks.apply(settings)
        expected = lm.model(ids).logits.float()
        hooks.restore()
    q = lm.model.model.layers[0].self_attn.q_proj
    pointer = q.weight.data_ptr()
    for _ in range(2):  # the second answer writes in place again
        mix.apply(settings)
        assert q.weight.data_ptr() == pointer and q not in _WORKSPACES  # written in place, no copy kept
        assert "model.layers.0.self_attn.q_proj.weight" in weight_file(lm.model).written
        with torch.no_grad():
            merged = lm.model(ids).logits.float()
        mix.restore()
        assert bits(lm.model) == before and not weight_file(lm.model).written
    assert torch.allclose(merged, expected, atol=0.05 if dtype == "bfloat16" else 1e-5)


def test_a_weight_that_is_not_the_files_is_merged_by_a_copy(tmp_path):
    lm = load(save_tiny(tmp_path / "ckpt"))
    q = lm.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        q.weight.add_(1.0)  # no longer what the file holds (as if cast or changed after loading)
    before = bits(lm.model)
    mix, settings, _ = mix_of(lm)
    mix.apply(settings)
    assert q in _WORKSPACES and "model.layers.1.self_attn.q_proj.weight" not in weight_file(lm.model).written
    assert "model.layers.0.self_attn.q_proj.weight" in weight_file(lm.model).written
    mix.restore()
    assert bits(lm.model) == before


def test_a_checkpoint_replaced_on_disk_still_reads_back_what_was_loaded(tmp_path):
    folder = save_tiny(tmp_path / "ckpt")
    lm = load(folder)
    before = bits(lm.model)
    mix, settings, _ = mix_of(lm)
    mix.apply(settings)
    other = save_tiny(tmp_path / "other", seed=1)  # healed / converted again: published by rename
    os.replace(other / "model.safetensors", folder / "model.safetensors")
    mix.restore()
    assert bits(lm.model) == before


def test_a_nested_merge_copies_what_the_outer_one_wrote_in_place(tmp_path):
    lm = load(save_tiny(tmp_path / "ckpt"))
    before = bits(lm.model)
    outer, settings, _ = mix_of(lm)
    outer.apply(settings)
    q = lm.model.model.layers[0].self_attn.q_proj
    merged_once = bits(lm.model)
    inner, _, _ = mix_of(lm, seed=1)
    inner.apply(settings)
    assert q in _WORKSPACES and bits(lm.model) != merged_once  # on top of the outer mix, by a copy
    inner.restore()
    assert bits(lm.model) == merged_once
    outer.restore()
    assert bits(lm.model) == before


def test_generation_that_raises_still_reads_the_weights_back(tmp_path, monkeypatch):
    lm = load(save_tiny(tmp_path / "ckpt"))
    before = bits(lm.model)
    mix, settings, _ = mix_of(lm)
    mix.apply(settings)
    try:
        with pytest.raises(IndexError):
            with torch.no_grad():
                lm.model(torch.full((1, 4), 999))  # token ids outside the vocabulary
    finally:
        mix.restore()
    assert bits(lm.model) == before


def test_a_failed_read_back_is_an_error_and_the_model_is_refused_after(tmp_path, monkeypatch):
    import stages.common.adapters.weightfile as weightfile

    folder = save_tiny(tmp_path / "ckpt")
    lm = load(folder)
    mix, settings, _ = mix_of(lm)
    mix.apply(settings)
    monkeypatch.setattr(weightfile.os, "preadv", lambda fd, buffers, offset: 0)  # the file ends early
    with pytest.raises(InputError, match="could not be restored: .* weights not read back from .*ckpt"):
        mix.restore()
    monkeypatch.undo()
    again, _, _ = mix_of(lm)
    with pytest.raises(InputError, match="not exact since a restore failed"):
        again.apply(settings)
    assert not again.lease.held  # the refusal does not keep the model locked


@pytest.mark.parametrize("head, problem", [(b"\x01\x02", "shorter than its header"),
                                           ((10**9).to_bytes(8, "little") + b"{}", "header of 1000000000 bytes")])
def test_a_broken_header_is_named_by_the_check_and_keeps_merge_on_copies(tmp_path, caplog, head, problem):
    from stages.common.adapters.weightfile import remember
    from stages.common.models.checkpoint import safetensors_problem

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(head)
    assert problem in safetensors_problem(folder / "model.safetensors")
    model = torch.nn.Linear(2, 2)
    remember(model, folder)
    assert weight_file(model) is None and problem in caplog.text and "merge mode keeps copies" in caplog.text

