"""Issue 12: hostile and everyday inputs the fault matrix did not cover.

Threads sharing one loaded model, pseudo filesystems and absurd roots, a named adapter file, caches that heal,
npz bombs, line breaks editors do not count, run folders inside the program, and the Python API's arguments.
(Rows that fit the fault matrix's tables live in tests/test_fault_matrix.py.)
"""
from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine import resources
from pipeline.engine.errors import ConfigError, InputError, PipelineError

GOOD = {"pkg/__init__.py": "", "pkg/core.py": 'def add(a, b):\n    """Add."""\n    return a + b\n'}
QUICK = ["synth=hashed", "decode.max_new_tokens=4", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=4"]


def the_model():
    """The tiny model every run of these tests shares (the one in the process-wide cache)."""
    models = [lm for lm in resources.values("model") if lm.model_id.startswith("tiny-random")]
    assert models, "run an answer first"
    return models[-1]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ---- 1. concurrent answers in one process ----------------------------------------------------------------------

# (name, overrides): different targets and strengths, so each answer's delta and hooks are its own
CONCURRENT = [
    ("attn_off", ["mix.ablate=[attn]"]),
    ("mlp_off", ["mix.ablate=[mlp]"]),
    ("all", []),
    ("all_alpha4_uncapped", ["mix.alpha=4", "mix.delta_cap=null"]),
]


@pytest.mark.parametrize("mode", ["hooks", "merge"])
def test_concurrent_answers_each_see_only_their_own_mix(tmp_path, make_tree, monkeypatch, mode):
    import pipeline
    import stages.decode

    program = make_tree(tmp_path / "prog", GOOD)
    real = stages.decode.generate
    seen: dict[str, list] = {}
    probe_ids = torch.arange(1, 33).unsqueeze(0)

    def probe(lm, prompt, settings, reuse=None):
        name = threading.current_thread().name
        if "explode" in prompt.text:
            raise RuntimeError("injected failure")
        time.sleep(0.2)  # an answer mixing now (without the lock) would land inside this decode
        with torch.no_grad():
            logits = lm.model(input_ids=probe_ids).logits.clone()
        seen.setdefault(name, []).append((hook_count(lm.model), logits))
        return real(lm, prompt, settings, reuse)

    monkeypatch.setattr(stages.decode, "generate", probe)

    def answer(name, overrides, prompt="how does add work"):
        return pipeline.generate_answer(
            "tiny_random", None, str(program), prompt,
            overrides=[f"paths.outputs={tmp_path / 'out'}", *QUICK, f"mix.mode={mode}", *overrides,
                       f"telemetry.telemetry_out={tmp_path / (name + '.json')}"])

    # one at a time: what each answer must see
    for name, overrides in CONCURRENT:
        threading.current_thread().name, old = f"ref_{name}", threading.current_thread().name
        try:
            answer(f"ref_{name}", overrides)
        finally:
            threading.current_thread().name = old
    lm = the_model()
    model = lm.model
    snap = snapshot(model)
    reference = {name: seen.pop(f"ref_{name}") for name, _ in CONCURRENT}

    # all at once, plus one answer that fails inside decode (its lock must come back)
    errors: dict[str, BaseException] = {}

    def worker(name, overrides, prompt="how does add work"):
        try:
            answer(name, overrides, prompt)
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors[name] = err

    threads = [threading.Thread(target=worker, args=(n, o), name=n) for n, o in CONCURRENT]
    threads.insert(1, threading.Thread(target=worker, args=("failing", [], "explode please"), name="failing"))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "an answer never finished (a lock was not released?)"

    assert set(errors) == {"failing"} and isinstance(errors["failing"], PipelineError), errors
    assert "node 'decode': RuntimeError: injected failure" in str(errors["failing"])
    for name, _ in CONCURRENT:
        got, want = seen[name], reference[name]
        assert [h for h, _ in got] == [h for h, _ in want], name  # only its own hooks were in the model
        assert all(torch.allclose(g, w, rtol=0, atol=1e-6) for (_, g), (_, w) in zip(got, want)), name
        telemetry = json.loads((tmp_path / f"{name}.json").read_text())
        reference_telemetry = json.loads((tmp_path / f"ref_{name}.json").read_text())
        assert telemetry["status"] == "ok" and telemetry["mix_mode"] == mode
        assert telemetry["hooks_active"] == reference_telemetry["hooks_active"] == want[0][0]
        assert telemetry["delta_norms"] == reference_telemetry["delta_norms"]
    failed = json.loads((tmp_path / "failing.json").read_text())
    assert failed["status"] == "failed"
    assert same_state(model, snap) and hook_count(model) == 0
    from stages.common.adapters.mixing import model_lock

    assert not model_lock(lm).held


def test_a_mix_dropped_without_unmix_gives_back_weights_and_lock(tiny_lm):
    import gc

    from stages.common.adapters.factors import infer_targets
    from stages.common.adapters.mixing import AdapterMix, MixSettings, model_lock
    from stages.common.adapters.synthesis import synthesize

    tmap = infer_targets(tiny_lm.model)
    adapters = synthesize(np.ones(64, np.float32), tmap.num_layers, tmap.shapes, tmap.targets, 4, 0, "zmean", None)
    snap = snapshot(tiny_lm.model)
    for mode in ("merge", "hooks"):
        mix = AdapterMix(tiny_lm, tmap, mode, adapters, None, 4.0)
        mix.apply(MixSettings(0.0, 4.0, 4, {}, [1.0] * tmap.num_layers, {}, None))
        assert model_lock(tiny_lm).held and (hook_count(tiny_lm.model) or not same_state(tiny_lm.model, snap))
        other = threading.Thread(target=lambda: model_lock(tiny_lm).acquire() or model_lock(tiny_lm).release())
        other.start()
        other.join(timeout=0.3)
        assert other.is_alive()  # another thread waits while the mix is in
        del mix
        gc.collect()
        other.join(timeout=10)
        assert not other.is_alive() and not model_lock(tiny_lm).held
        assert same_state(tiny_lm.model, snap) and hook_count(tiny_lm.model) == 0


def test_a_failed_mix_releases_the_model(tiny_lm):
    from stages.common.adapters.factors import infer_targets
    from stages.common.adapters.mixing import AdapterMix, MixSettings, model_lock
    from stages.common.adapters.synthesis import synthesize

    tmap = infer_targets(tiny_lm.model)
    adapters = synthesize(np.ones(64, np.float32), tmap.num_layers, tmap.shapes, tmap.targets, 4, 0, "zmean", None)
    adapters.factors = {k: np.full_like(v, 3e38) for k, v in adapters.factors.items()}
    mix = AdapterMix(tiny_lm, tmap, "merge", adapters, None, 4.0)
    with pytest.raises(InputError, match="not finite"):
        mix.apply(MixSettings(0.0, 4.0, 4, {}, [1.0] * tmap.num_layers, {}, None))
    assert not model_lock(tiny_lm).held


# ---- 3. pseudo filesystems, absurd roots, what is not a regular file ------------------------------------------

def test_proc_as_program_root_is_refused_before_the_model_loads(cli, tmp_path):
    started = time.perf_counter()
    proc = cli(["model=tiny_random", f"paths.outputs={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
                "prompt=how does add work", "program_root=/proc"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: node 'index': program_root '/proc' is on a proc pseudo filesystem"), last
    assert time.perf_counter() - started < 120


def test_the_filesystem_root_is_bounded_by_the_index_budget(cli, tmp_path):
    proc = cli(["model=tiny_random", f"paths.outputs={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
                "prompt=how does add work", "program_root=/", "index.max_files=300"], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "has more than index.max_files=300 files" in last and last.startswith("error: node 'index':"), last


def test_byte_budget(tmp_path, make_tree):
    from stages.common.program.walk import Limits
    from stages.index import build_index

    root = make_tree(tmp_path / "prog", {f"m{i}.py": "x = 1\n" * 200 for i in range(5)})
    with pytest.raises(InputError, match="more than index.max_total_bytes=3000 bytes"):
        build_index(str(root), [], 1_000_000, 80, None, limits=Limits(max_total_bytes=3000))
    assert len(build_index(str(root), [], 1_000_000, 80, None, limits=Limits(max_total_bytes=6000)).files) == 5


def test_a_fifo_or_a_pseudo_filesystem_folder_inside_the_program_is_never_opened(tmp_path, make_tree, monkeypatch):
    import stages.common.program.walk as program
    from stages.index import build_index

    root = make_tree(tmp_path / "prog", GOOD)
    os.mkfifo(root / "pipe.py")  # opening a FIFO for reading blocks until a writer comes
    (root / "kernel").mkdir()
    (root / "kernel" / "kmsg").write_text("would block\n")
    kernel = str((root / "kernel").resolve())
    monkeypatch.setattr(program, "mount_table", lambda: {kernel: "proc"})  # as if a /proc were mounted there
    index = build_index(str(root), [], 1_000_000, 80, None)
    assert index.skipped["pipe.py"] == "not a regular file"
    assert index.skipped["kernel"] == "proc pseudo filesystem" and not any(p.startswith("kernel/") for p in index.files)


# ---- 4. adapters=<file>.npz loads that file ---------------------------------------------------------------------

def _build(tmp_path, program) -> Path:
    import pipeline.api

    value, _ = pipeline.api.run(["pipeline=build", "model=tiny_random", "synth=hashed", f"program_root={program}",
                                 f"paths.outputs={tmp_path / 'out'}"], run_dir=tmp_path / "build-run")
    return Path(str(value))


def test_a_named_npz_is_the_file_loaded(tmp_path, make_tree):
    import pipeline.api
    from stages.common.adapters.factors import save_npz

    program = make_tree(tmp_path / "prog", GOOD)
    folder = _build(tmp_path, program)
    with np.load(folder / "adapters.npz") as data:
        arrays = {k: data[k] for k in data.files}
    mine = {k: (v[:, :3] if k.endswith(".A") else v[:3] if k.endswith(".B") else v) for k, v in arrays.items()}
    save_npz(folder / "mine.npz", mine)
    args = ["model=tiny_random", f"program_root={program}", f"paths.outputs={tmp_path / 'out'}", *QUICK]
    _, result = pipeline.api.run([*args, f"adapters={folder / 'mine.npz'}"], run_dir=tmp_path / "r1")
    artifacts = result.output("load_artifacts", "artifacts")
    assert artifacts.adapters.rank == 3 and artifacts.manifest == {}  # mine.npz, not the folder's adapters.npz
    _, result = pipeline.api.run([*args, f"adapters={folder}"], run_dir=tmp_path / "r2")
    assert result.output("load_artifacts", "artifacts").adapters.rank == 12

    mine["L0.q_proj.A"][0, 0] = np.nan
    save_npz(folder / "mine.npz", mine)
    with pytest.raises(PipelineError, match=r"mine\.npz: 'L0\.q_proj\.A' contains NaN"):
        pipeline.api.run([*args, f"adapters={folder / 'mine.npz'}"], run_dir=tmp_path / "r3")
    (folder / "notes.txt").write_text("x")
    for path, message in ((folder / "notes.txt", "is a file but not an .npz"), (folder / "nope.npz", "does not exist")):
        with pytest.raises(PipelineError, match=message):
            pipeline.api.run([*args, f"adapters={path}"], run_dir=tmp_path / "r4")


# ---- 5. caches that heal ---------------------------------------------------------------------------------------

def test_a_truncated_cached_adapters_npz_is_rebuilt_with_a_warning(tmp_path, make_tree, caplog):
    import pipeline.api

    program = make_tree(tmp_path / "prog", GOOD)
    folder = _build(tmp_path, program)
    good = (folder / "adapters.npz").read_bytes()
    (folder / "adapters.npz").write_bytes(good[: len(good) // 2])
    args = ["model=tiny_random", f"program_root={program}", f"paths.outputs={tmp_path / 'out'}", *QUICK]
    with caplog.at_level(logging.WARNING):
        pipeline.api.run(args, run_dir=tmp_path / "answer")  # the answer graph heals it and answers
    assert f"cached artifacts '{folder}' are corrupt (adapters.npz does not match" in caplog.text
    assert (folder / "adapters.npz").read_bytes() == good  # rebuilt: same program, same bytes
    (folder / "manifest.json").write_text("{ half")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _build(tmp_path, program) == folder  # pipeline.build heals too
    assert "manifest.json: JSONDecodeError" in caplog.text
    assert json.loads((folder / "manifest.json").read_text())["files"]["adapters.npz"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_partial_folders_of_killed_builds_are_cleaned_but_not_a_live_one(tmp_path, make_tree):
    from pipeline.engine.cache import PARTIAL_LOCK

    program = make_tree(tmp_path / "prog", GOOD)
    folder = _build(tmp_path, program)
    root = folder.parent

    def partial(name, lock=True, age_s=0.0):
        path = root / f".{folder.name}.{name}.partial"
        path.mkdir()
        (path / "adapters.npz").write_bytes(b"half" * 1000)
        if lock:
            (path / PARTIAL_LOCK).write_bytes(b"")
        if age_s:
            os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    dead = partial("killed")  # its writer is gone: nobody holds the lock
    old = partial("old-no-lock", lock=False, age_s=7200)
    young = partial("young-no-lock", lock=False)
    live = partial("live")
    with open(live / PARTIAL_LOCK, "rb") as handle:  # a build that is still writing holds the lock
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _build(tmp_path, program)
        assert not dead.exists() and not old.exists()
        assert live.exists() and young.exists()
    _build(tmp_path, program)
    assert not live.exists() and young.exists()


def _tiny_checkpoint_writer(tiny_lm, calls):
    def convert(out: Path) -> None:
        calls.append(out)
        tiny_lm.model.save_pretrained(out)
        tiny_lm.tokenizer.save_pretrained(out)
    return convert


def test_a_truncated_converted_model_is_converted_again(tmp_path, tiny_lm, caplog, monkeypatch):
    import stages.common.models.gguf as gguf_loading
    from pipeline.engine.cache import PARTIAL_LOCK
    from stages.common.models.checkpoint import record_digests

    gguf = tmp_path / "Fake.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "models"
    calls = []
    monkeypatch.setattr(gguf_loading, "convert_gguf", lambda path, out: _tiny_checkpoint_writer(tiny_lm, calls)(out))
    gguf_loading.load_gguf_converted(gguf, cache, "float32", "cpu", None, "fake")  # its tensors map the file:
    gc.collect()  # let them go before the file is truncated in place (a mapped page past the end is SIGBUS)
    [converted] = [p for p in cache.iterdir()]
    weights = converted / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 1000])
    stale = cache / f".{converted.name}.x.partial"
    stale.mkdir()
    (stale / PARTIAL_LOCK).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        again = gguf_loading.load_gguf_converted(gguf, cache, "float32", "cpu", None, "fake")
    assert f"the converted model '{converted}' is corrupt (model.safetensors:" in caplog.text
    assert len(calls) == 2 and weights.read_bytes() == whole and not stale.exists()
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, tiny_lm.model(input_ids=ids).logits)

    (converted / "tokenizer.json").write_text("{ broken")  # passes every check, fails to load: remade too
    record_digests(converted)  # as if written so (tests/test_safe_caches.py: a changed digest is caught earlier)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        gguf_loading.load_gguf_converted(gguf, cache, "float32", "cpu", None, "fake")
    assert f"the converted model '{converted}' does not load" in caplog.text and len(calls) == 3


# ---- 6. npz bombs ----------------------------------------------------------------------------------------------

def _bomb(path: Path, key: str, shape: tuple) -> None:
    """A deflated member whose header declares ``shape`` float32 and whose data is all there (zeros)."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32))
    header["shape"] = shape
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            block = bytes(1 << 20)
            for _ in range(int(np.prod(shape)) * 4 // len(block)):
                member.write(block)


def test_an_npz_bomb_is_refused_from_its_header(tmp_path, tiny_lm):
    from stages.common.adapters.buildfolder import load_artifacts

    folder = tmp_path / "bomb"
    folder.mkdir()
    _bomb(folder / "adapters.npz", "L0.q_proj.A", (64, 262_144))  # 64 MB declared, ~64 KB on disk
    assert (folder / "adapters.npz").stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"'L0\.q_proj\.A' has rank 262144, more than the 64 .*nothing was read"):
            load_artifacts(folder, tiny_lm, require_manifest=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated before refusing"


def test_npz_members_of_unknown_keys_or_huge_plain_arrays_are_refused_unread(tmp_path):
    from stages.common.adapters.factors import factor_check, load_npz

    _bomb(tmp_path / "a.npz", "evil", (300, 300))
    with pytest.raises(InputError, match="'evil' is not an adapter key"):
        load_npz(tmp_path / "a.npz", check=factor_check({"q_proj": (64, 64)}, 2))
    _bomb(tmp_path / "b.npz", "z", (1, 80 << 20))  # 320 MB declared for an embedding vector
    with pytest.raises(InputError, match="over the 268,435,456 an array may take"):
        load_npz(tmp_path / "b.npz")


# ---- 10. lower ones ------------------------------------------------------------------------------------------

def test_form_feed_and_unicode_line_separators_do_not_shift_lines(tmp_path, make_tree):
    from stages.common.types import Window
    from stages.index import build_index
    from stages.pack import cut

    text = ("# section one\f(form feed)\n"
            "NOTE = 'a\u2028b\u2029c\x85d\x0be'\n"
            "\n"
            "def target():\n"
            "    return 42\r\n"
            "x = 1\r"
            "y = 2\n")
    root = make_tree(tmp_path / "prog", {"m.py": text})
    index = build_index(str(root), [], 1_000_000, 80, None)
    assert index.files["m.py"].lines == 7
    [window] = [w for w in index.windows if w.anchor == "target"]
    assert (window.start, window.end) == (4, 5)
    assert cut(index, window).text == "def target():\n    return 42"
    assert cut(index, Window("m.py", 6, 7, "", "head")).text == "x = 1\ny = 2"


def test_outputs_and_run_folders_inside_the_program_are_never_indexed(tmp_path, make_tree):
    import pipeline.api

    program = make_tree(tmp_path / "prog", GOOD)
    args = ["model=tiny_random", f"program_root={program}", f"paths.outputs={program / 'generated'}", *QUICK]
    pipeline.api.run(args, run_dir=program / "my-runs" / "first")
    hydra_folder = make_tree(program / "old-run", {".hydra/config.yaml": "a: 1\n", "telemetry.json": "{}\n",
                                                   "notes.py": "LEAK = 1\n"})
    assert (program / "generated" / "adapters").is_dir() and (program / "my-runs" / "first" / "trace.json").is_file()
    _, result = pipeline.api.run(args, run_dir=program / "my-runs" / "second")
    index = result.output("index", "index")
    assert sorted(index.files) == ["pkg/__init__.py", "pkg/core.py"], sorted(index.files)
    assert index.skipped["generated"] == "the pipeline's own outputs folder"
    assert index.skipped["old-run"].startswith("a run folder") and hydra_folder.is_dir()
    assert index.skipped["my-runs/first"].startswith("a run folder")


def test_a_file_made_unreadable_is_listed_as_skipped(tmp_path, make_tree, monkeypatch, caplog):
    import pipeline.api

    program = make_tree(tmp_path / "prog", {**GOOD, "pkg/locked.py": "x = 1\n", "secret/a.py": "y = 2\n"})
    real_open, real_scandir = os.open, os.scandir

    def refuse_open(file, *args, **kwargs):
        if os.path.basename(file) == "locked.py":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def refuse_scandir(path="."):
        if os.path.basename(str(path)) == "secret":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", refuse_open)  # as the kernel does for a non-root user (tests may run as root)
    monkeypatch.setattr(os, "scandir", refuse_scandir)
    with caplog.at_level(logging.WARNING):
        pipeline.api.run(["model=tiny_random", f"program_root={program}", f"paths.outputs={tmp_path / 'out'}",
                          *QUICK], run_dir=tmp_path / "run")
    assert "skipped 2 path(s)" in caplog.text and "(1 unreadable, 1 unreadable folder)" in caplog.text
    assert "pkg/locked.py (unreadable (permission denied))" in caplog.text
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    [index_node] = [n for n in trace["nodes"] if n["node"] == "index"]
    skipped = index_node["outputs"]["index"]["skipped_paths"]
    assert skipped["pkg/locked.py"] == "unreadable (permission denied)"
    assert skipped["secret"].startswith("unreadable folder (Permission denied")


def test_generate_answer_inside_the_users_own_hydra_app(tmp_path, make_tree):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import pipeline

    program = make_tree(tmp_path / "prog", GOOD)
    user_conf = make_tree(tmp_path / "user_conf", {"config.yaml": "lr: 0.1\n"})
    with initialize_config_dir(config_dir=str(user_conf), version_base="1.3"):
        theirs = GlobalHydra.instance().hydra
        text = pipeline.generate_answer("tiny_random", None, str(program), "how does add work",
                                        overrides=[f"paths.outputs={tmp_path / 'out'}", *QUICK])
        assert isinstance(text, pipeline.Answer) and isinstance(str(text), str)
        assert GlobalHydra.instance().hydra is theirs and compose("config").lr == 0.1  # their app is untouched


@pytest.mark.parametrize("args, message", [
    ((["smollm2"], None, ".", "q"), "model_id must be a short name (qwen_coder_1_5b, qwen_coder_0_5b, smollm2, tiny_random), a local folder or a .gguf path, got list ['smollm2']"),
    (("tiny_random", None, ".", None), "prompt must be the question, a string, got NoneType None"),
    (("tiny_random", None, ".", 42), "prompt must be the question, a string, got int 42"),
    (("tiny_random", 3, ".", "q"), "adapters_npz must be an artifact folder or an .npz path, got int 3"),
    (("tiny_random", None, {"x": 1}, "q"), "program_root must be a folder path, got dict"),
])
def test_python_api_arguments_of_the_wrong_kind(args, message):
    import pipeline

    with pytest.raises(ConfigError) as caught:
        pipeline.generate_answer(*args)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_missing_program_root_fails_before_the_model_loads(tmp_path, monkeypatch):
    import pipeline.api
    from stages.model import TinyRandomLlama

    loads = []
    real = TinyRandomLlama.run
    monkeypatch.setattr(TinyRandomLlama, "run", lambda self: loads.append(1) or real(self))
    with pytest.raises(PipelineError, match="node 'index': program_root '/does-not-exist' does not exist"):
        pipeline.api.run(["model=tiny_random", "program_root=/does-not-exist", f"paths.outputs={tmp_path}"],
                         run_dir=tmp_path / "run")
    assert loads == []


def test_git_metadata_is_read_only_as_small_regular_files_inside_the_program(tmp_path, make_tree):
    from stages.common.adapters.buildfolder import git_commit

    outside = make_tree(tmp_path / "outside", {"secret": "TOP-SECRET-TOKEN\n"})
    program = make_tree(tmp_path / "prog", {**GOOD, ".git/HEAD": "ref: refs/heads/main\n",
                                            ".git/packed-refs": "abc123 refs/heads/other\n"})
    (program / ".git" / "refs" / "heads").mkdir(parents=True)
    (program / ".git" / "refs" / "heads" / "main").write_text("0123456789abcdef\n")
    assert git_commit(program) == "0123456789abcdef"
    (program / ".git" / "refs" / "heads" / "main").unlink()
    (program / ".git" / "refs" / "heads" / "main").symlink_to(outside / "secret")  # a link out of the program
    assert git_commit(program) is None
    (program / ".git" / "HEAD").unlink()
    os.mkfifo(program / ".git" / "HEAD")  # reading it would wait for a writer forever
    assert git_commit(program) is None
