"""Issue 36 #5: merge mode restores exactly what was loaded, whatever happens to the checkpoint file meanwhile.

The weights are read from a private copy of the file taken at load and never from the file again; a weight written in
place is read back from that copy (stages/common/adapters/weightfile.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_merge_in_place import bits, load, mix_of, save_tiny

import stages.common.adapters.weightfile as weightfile
from stages.common.adapters.mixing import _WORKSPACES
from stages.common.adapters.weightfile import weight_file

IDS = torch.randint(0, 250, (1, 8), generator=torch.Generator().manual_seed(0))
Q = "model.layers.0.self_attn.q_proj.weight"


def file_bits(path: Path) -> dict[str, bytes]:
    return {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k, v in load_file(path).items()}


def region(path: Path, name: str) -> tuple[int, int]:
    """Where the bytes of ``name`` lie in the safetensors file ``path``: (offset, length)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + length])[name]["data_offsets"]
    return 8 + length + begin, end - begin


def mapped_files(model) -> list[str]:
    """The files that back any of ``model``'s tensors (read from /proc/self/maps)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end, fields[5]))
    tensors = [*model.parameters(), *model.buffers()]
    return sorted({path for t in tensors for start, end, path in spans if start <= t.data_ptr() < end})


def damage(path: Path, how: str) -> None:
    if how == "in place":  # the probe: same size, the first q_proj zeroed
        offset, length = region(path, Q)
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write(b"\0" * length)
    elif how == "rewritten in place":  # another model's bytes, same size, the same inode
        other = (save_tiny(path.parent.parent / "other", seed=1) / "model.safetensors").read_bytes()
        assert len(other) == path.stat().st_size
        with open(path, "r+b") as handle:
            handle.write(other)
    elif how == "truncated":
        os.truncate(path, 100)
    else:
        path.unlink()


def answer(mix, settings, lm, during=None):
    """One answer's mix: (the merged weights, the logits), restored afterwards; ``during`` runs while mixed."""
    mix.apply(settings)
    try:
        with torch.no_grad():
            logits = lm.model(IDS).logits.clone()
        merged = bits(lm.model)
        if during:
            during()
    finally:
        mix.restore()
    return merged, logits


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_the_loaded_weights_are_the_files_bytes_and_no_longer_map_it(tmp_path):
    folder = save_tiny(tmp_path / "ckpt")
    saved = file_bits(folder / "model.safetensors")
    lm = load(folder)
    assert bits(lm.model) == saved
    assert mapped_files(lm.model) == []  # a file changed or truncated later can reach no weight


@pytest.mark.parametrize("how", ["in place", "rewritten in place", "truncated", "deleted"])
@pytest.mark.parametrize("when", ["before the first answer", "between answers", "during an answer"])
def test_restore_returns_what_was_loaded_whatever_happens_to_the_file(tmp_path, how, when):
    path = save_tiny(tmp_path / "ckpt") / "model.safetensors"
    lm = load(path.parent)
    if Path("/proc/self/maps").exists():
        assert mapped_files(lm.model) == []  # else a truncation below would kill this process (SIGBUS)
    loaded = bits(lm.model)
    mix, settings, _ = mix_of(lm)
    hurt = lambda: damage(path, how)  # noqa: E731
    if when == "before the first answer":
        hurt()
    first = answer(mix, settings, lm, during=hurt if when == "during an answer" else None)
    assert bits(lm.model) == loaded
    if when == "between answers":
        hurt()
    for _ in range(2):  # the next answers: the same merged weights, the same logits, restored again
        merged, logits = answer(mix, settings, lm)
        assert merged == first[0] and torch.equal(logits, first[1])
        assert bits(lm.model) == loaded
    q = lm.model.model.layers[0].self_attn.q_proj
    assert q not in _WORKSPACES and not weight_file(lm.model).lost  # still merged in place, never lost


def test_a_copy_through_a_buffer_when_the_kernel_cannot_copy(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(weightfile.os, "copy_file_range", refuse, raising=False)
    path = save_tiny(tmp_path / "ckpt") / "model.safetensors"
    saved = file_bits(path)
    lm = load(path.parent)
    assert bits(lm.model) == saved
    mix, settings, _ = mix_of(lm)
    damage(path, "in place")
    answer(mix, settings, lm)
    assert bits(lm.model) == saved and Q in weight_file(lm.model).entries


def test_without_a_private_copy_merge_keeps_copies_and_the_weights_still_leave_the_file(tmp_path, monkeypatch, caplog):
    def full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weightfile, "private_copy", full)
    path = save_tiny(tmp_path / "ckpt") / "model.safetensors"
    saved = file_bits(path)
    lm = load(path.parent)
    assert weight_file(lm.model) is None and "No space left on device); merge mode keeps copies" in caplog.text
    assert bits(lm.model) == saved
    if Path("/proc/self/maps").exists():
        assert mapped_files(lm.model) == []
    mix, settings, _ = mix_of(lm)
    first = answer(mix, settings, lm)
    damage(path, "truncated")
    assert answer(mix, settings, lm)[0] == first[0] and bits(lm.model) == saved
    assert lm.model.model.layers[0].self_attn.q_proj in _WORKSPACES  # merged by a copy


def test_without_proc_every_weight_is_copied_to_memory_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(weightfile, "_file_mappings", lambda: None)
    path = save_tiny(tmp_path / "ckpt") / "model.safetensors"
    saved = file_bits(path)
    lm = load(path.parent)
    assert bits(lm.model) == saved
    if Path("/proc/self/maps").exists():
        assert mapped_files(lm.model) == []
    damage(path, "rewritten in place")
    assert bits(lm.model) == saved
