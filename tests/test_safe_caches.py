"""Issue 36 #3, #6, #10: one safe npz reader for every cache and user file (headers checked before any array is
read), content digests for the converted model cache (checked at load, healed on mismatch), and the folders a killed
`discard` left aside removed by a later run."""
from __future__ import annotations

import ast
import gc
import io
import logging
import os
import signal
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import PROJECT_ROOT
from pipeline.engine import resources
from pipeline.engine.cache import clean_stale_discarded, clean_stale_partials, discard
from stages.common.npzsafe import NpzRefused, NpzUnreadable, read_npz

# ---- 3. one safe npz reader -------------------------------------------------------------------------------------

FORGED = (24_000, 24_000)  # float32: 2.3 GB declared by a header of a few dozen bytes


def _npy_header(shape: tuple) -> bytes:
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32)) | {"shape": shape}
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    return member.getvalue()


def _forge(path: Path, key: str, shape: tuple, how: str) -> None:
    """Rewrite the npz at ``path`` with member ``key`` replaced by one declaring ``shape`` float32.

    header: the npy header alone; directory: the zip's directory also claims every declared byte is there;
    deflated: the whole array present, compressed (our caches are written uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        others = {i.filename: archive.read(i) for i in archive.infolist() if i.filename != f"{key}.npy"}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in others.items():
            archive.writestr(name, data)
        if how == "deflated":
            member = io.BytesIO()
            np.lib.format.write_array(member, np.zeros(shape, np.float32))
            archive.writestr(f"{key}.npy", member.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
        else:
            archive.writestr(f"{key}.npy", _npy_header(shape))
    if how == "directory":  # patch the central directory entry's sizes (the last one: the forged member)
        blob = bytearray(path.read_bytes())
        entry = blob.rindex(b"PK\x01\x02")
        size = len(_npy_header(shape)) + int(np.prod(shape)) * 4
        blob[entry + 20: entry + 28] = struct.pack("<II", size, size)
        path.write_bytes(bytes(blob))


def _peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_npz_is_read_but_by_the_safe_reader():
    """No np.load / numpy.load (nor `from numpy import load`) in stages/, pipeline/, bench/ or tools/."""
    found = []
    for folder in ("stages", "pipeline", "bench", "tools"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                        and node.value.id in ("np", "numpy"):
                    found.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("numpy") \
                        and any(a.name in ("load", "NpzFile") for a in node.names):
                    found.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert not found, f"read npz files with stages.common.npzsafe.read_npz: {found}"


@pytest.mark.parametrize(("how", "shape", "why"), [
    ("header", FORGED, "declares shape (24000, 24000) of float32 (2,304,000,000 bytes), over the"),
    ("directory", (16_000, 16_000), "more than the file holds"),
    ("deflated", (300, 300), "is compressed"),
])
def test_a_forged_index_cache_member_is_refused_unread_and_the_cache_rebuilt(tmp_path, make_tree, fresh_index_memory,
                                                                            caplog, how, shape, why):
    from stages.common.program import indexstore
    from stages.common.program.indexing import build_index, indexing_code

    root = make_tree(tmp_path / "prog", {"m.py": "def f():\n    return 1\n", "n.py": "import m\n\nm.f()\n"})
    cache = tmp_path / "cache"
    first = build_index(str(root), [], 1_000_000, 80, cache)
    [stored] = (cache / "index").glob("*.npz")
    _forge(stored, "sym_doc", shape, how)
    resources.clear("program-index")  # a new process
    with caplog.at_level(logging.WARNING):
        peak = _peak_bytes(lambda: build_index(str(root), [], 1_000_000, 80, cache))
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated"
    [line] = [r.getMessage() for r in caplog.records if "index cache" in r.getMessage()]
    assert str(stored) in line and why in line and "nothing was read" in line and "rebuilding it" in line
    again = indexstore.load(stored, 80, indexing_code())  # rewritten whole
    assert again is not None and sorted(again.keys()) == sorted((p, r.sha256) for p, r in first.files.items())


@pytest.mark.parametrize(("how", "shape", "why"), [
    ("header", FORGED, "over the 2,147,483,648 an array may take"),
    ("directory", (16_000, 16_000), "more than the file holds"),
    ("deflated", (3, 384), "is compressed"),
])
def test_a_forged_dense_cache_member_is_refused_unread(tmp_path, caplog, how, shape, why):
    from stages.common.retrieval import dense

    path = tmp_path / "dense.npz"
    keys = np.array([b"0" * 32, b"1" * 32, b"2" * 32], dtype="S32")
    vectors = np.eye(3, 384, dtype=np.float32)
    np.savez(path, keys=keys, vectors=vectors, code=np.array("code-1"))  # as dense.py writes it
    assert {k: v.tolist() for k, v in dense._load(path, 384, "code-1").items()} == dict(zip(keys.tolist(), vectors.tolist()))
    _forge(path, "vectors", shape, how)
    with caplog.at_level(logging.WARNING):
        peak = _peak_bytes(lambda: dense._load(path, 384, "code-1"))
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated"
    [line] = [r.getMessage() for r in caplog.records if "dense cache" in r.getMessage()]
    assert str(path) in line and why in line and "re-embedding" in line
    assert dense._load(path, 384, "code-1") == {}


def test_the_safe_reader_reads_what_numpy_writes_and_refuses_the_rest(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.int64).reshape(3, 4), "s": np.array("text"), "f": np.ones(5, np.float32).T}
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "ok.npz", **arrays)
        back = read_npz(tmp_path / "ok.npz")
        assert back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    with pytest.raises(NpzRefused, match="is compressed"):  # where our caches are read, only stored members
        read_npz(tmp_path / "ok.npz", stored_only=True)
    np.savez(tmp_path / "ok.npz", **arrays)
    blob = bytearray((tmp_path / "ok.npz").read_bytes())  # one bit of array data flipped: its zip CRC fails
    at = blob.index(np.arange(12, dtype=np.int64).tobytes()) + 40
    blob[at] ^= 1
    (tmp_path / "flip.npz").write_bytes(bytes(blob))
    with pytest.raises(NpzUnreadable, match="Bad CRC-32"):
        read_npz(tmp_path / "flip.npz")
    np.savez(tmp_path / "obj.npz", o=np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(NpzRefused, match="'o' is an object array; refusing to unpickle it"):
        read_npz(tmp_path / "obj.npz")
    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as archive:
        archive.writestr("notes.txt", b"not an array")
    with pytest.raises(NpzUnreadable, match="'notes.txt' is not an .npy array"):
        read_npz(tmp_path / "raw.npz")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:  # a user's file: any compression, but whole
        archive.writestr("v.npy", _npy_header((1000, 1000)), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(NpzRefused, match="'v' declares 4,000,000 bytes but its member holds 0; nothing was read"):
        read_npz(tmp_path / "short.npz")
    with pytest.raises(NpzRefused, match="its arrays declare 132 bytes together, over the 100 a file may take"):
        read_npz(tmp_path / "ok.npz", max_total_bytes=100)


# ---- 6. content digests of the converted model cache ------------------------------------------------------------

NAN_4K = struct.pack("<f", float("nan")) * 1024


def _converter(tiny_lm, calls):
    def convert(path: Path, out: Path) -> None:
        calls.append(out)
        tiny_lm.model.save_pretrained(out)
        tiny_lm.tokenizer.save_pretrained(out)
    return convert


def _damage_in_place(weights: Path) -> None:
    """4 KB of NaN bytes over the middle of the tensors: same size, same mtime."""
    gc.collect()  # let earlier models unmap the file first
    stat = weights.stat()
    with open(weights, "r+b") as handle:
        handle.seek(stat.st_size // 2)
        handle.write(NAN_4K)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.arange(1, 9).unsqueeze(0)).logits.float()


@pytest.fixture()
def fake_gguf(tmp_path, tiny_lm, monkeypatch):
    import stages.common.models.gguf as gguf_loading

    gguf = tmp_path / "Fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[Path] = []
    monkeypatch.setattr(gguf_loading, "convert_gguf", _converter(tiny_lm, calls))

    def load(dtype: str = "float32"):
        return gguf_loading.load_gguf_converted(gguf, tmp_path / "models", dtype, "cpu", None, "fake")
    return load, calls, tmp_path / "models"


def test_a_converted_model_damaged_in_place_is_named_and_converted_again(fake_gguf, tiny_lm, caplog):
    from stages.common.models.checkpoint import DIGESTS

    load, calls, cache = fake_gguf
    expected = _logits(load())
    [converted] = list(cache.iterdir())
    assert (converted / DIGESTS).is_file() and len(calls) == 1
    _damage_in_place(converted / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        again = load()
    [line] = [r.getMessage() for r in caplog.records if "converted model" in r.getMessage()]
    assert line == (f"the converted model '{converted}' is corrupt (model.safetensors: its content differs from the "
                    "sha256 recorded when it was written (damaged in place?)); removing it and converting again")
    assert len(calls) == 2 and torch.equal(_logits(again), expected) and torch.isfinite(expected).all()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load()  # healed: checked and loaded as it is
    assert len(calls) == 2 and "converted model" not in caplog.text


def test_only_the_copy_loaded_or_copied_from_is_hashed_and_each_heals(fake_gguf, caplog):
    load, calls, cache = fake_gguf
    expected = _logits(load("bfloat16"))
    converted = next(p for p in cache.iterdir() if not p.name.endswith("-bfloat16"))
    copy = converted.with_name(f"{converted.name}-bfloat16")
    _damage_in_place(converted / "model.safetensors")
    load("bfloat16")  # the float32 copy is not read: only its cheap checks run
    assert len(calls) == 1
    _damage_in_place(copy / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        again = load("bfloat16")  # the bfloat16 copy is remade, from a float32 copy checked in full first
    lines = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert [line.split("'")[1] for line in lines] == [str(copy), str(converted)]
    assert len(calls) == 2 and torch.equal(_logits(again), expected)


def test_a_converted_model_without_digests_is_converted_again_once(fake_gguf, caplog):
    from stages.common.models.checkpoint import DIGESTS

    load, calls, cache = fake_gguf
    load()
    [converted] = list(cache.iterdir())
    (converted / DIGESTS).unlink()  # a copy from before digests were recorded
    with caplog.at_level(logging.WARNING):
        load()
    assert f"the converted model '{converted}' is corrupt (no {DIGESTS}" in caplog.text and len(calls) == 2
    (converted / "extra.json").write_text("{}")  # a file the writer did not write
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load()
    assert "extra.json: not among the files recorded" in caplog.text and len(calls) == 3


# ---- 10. folders a killed discard left aside --------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _aside(parent: Path, name: str) -> Path:
    folder = parent / name
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    return folder


def test_a_kill_9_while_discarding_leaves_a_folder_the_next_run_removes(fake_gguf, caplog):
    load, calls, cache = fake_gguf
    load()
    [converted] = list(cache.iterdir())
    script = ("import os, shutil, signal, sys\nfrom pathlib import Path\nfrom pipeline.engine.cache import discard\n"
              "shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed right after the rename\n"
              "discard(Path(sys.argv[1]))\n")
    killed = subprocess.Popen([sys.executable, "-c", script, str(converted)], cwd=PROJECT_ROOT)
    assert killed.wait(timeout=120) == -signal.SIGKILL
    [left] = [p for p in cache.iterdir() if p.name.endswith(".discarded")]
    assert left.name.startswith(f".{converted.name}.{killed.pid}-") and not converted.exists()
    with caplog.at_level(logging.WARNING):
        load()  # a later run: converts again and removes what the killed one left
    assert not left.exists() and converted.is_dir() and len(calls) == 2
    assert f"removed '{left}', left by a run killed while deleting a corrupt cache entry" in caplog.text


def test_only_our_stale_discarded_folders_are_removed(tmp_path):
    dead, ours = _dead_pid(), os.getpid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [_aside(tmp_path, f".model-ab12.{dead}-0a1b2c3d.discarded"), _aside(tmp_path, f".art-1.{dead}.discarded")]
        kept = [_aside(tmp_path, f".model-ab12.{ours}-00000000.discarded"),  # ours, deleting it now
                _aside(tmp_path, f".model-ab12.{live.pid}-ffffffff.discarded"),  # a live run's, just set aside
                _aside(tmp_path, f"model.{dead}.discarded"),  # not a name discard makes
                _aside(tmp_path, f".model.{dead}.discarded.keep"), _aside(tmp_path, ".model.x.discarded"),
                _aside(tmp_path, f".model.{dead}-nothex!.discarded")]
        (tmp_path / f".file.{dead}.discarded").write_text("a file, not a folder discard made")
        assert sorted(clean_stale_partials(tmp_path)) == sorted(stale)
        assert all(not p.exists() for p in stale) and all(p.is_dir() for p in kept)
        assert (tmp_path / f".file.{dead}.discarded").is_file()
        removed = clean_stale_discarded(tmp_path, stale_after_s=-1)  # set aside long ago: removed whoever's
        assert sorted(removed) == sorted(kept[:2]) and all(p.is_dir() for p in kept[2:])
    finally:
        live.kill()
        live.wait()


def test_discard_still_takes_a_folder_out_of_the_way_at_once(tmp_path):
    folder = _aside(tmp_path, "entry")
    discard(folder)
    discard(folder)  # a second healer finds it gone
    assert not folder.exists() and not list(tmp_path.iterdir())
