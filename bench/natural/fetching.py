"""The programs of the natural set: `programs.json` read and checked, each wheel downloaded (never installed or
imported) and only its package folder unpacked into `<out>/programs/<name>/<package>/`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

from pipeline.engine.errors import InputError

SPLITS = ("test", "dev")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def programs(data: Path, split: str = "all") -> dict[str, dict[str, str]]:
    """name -> {requirement, package, split} of ``split`` (test, dev or all), in the file's order."""
    source = data / "programs.json"
    try:
        table = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{source}: cannot read it as JSON ({err})") from err
    if not isinstance(table, dict):
        raise InputError(f"{source}: expected an object of program name -> {{requirement, package, split}}")
    for name, entry in table.items():
        if not (_NAME.fullmatch(name) and isinstance(entry, dict)
                and all(isinstance(entry.get(k), str) for k in ("requirement", "package", "split"))):
            raise InputError(f"{source}: program {name!r} must be a plain name with requirement, package, split strings")
        if entry["split"] not in SPLITS or not _NAME.fullmatch(entry["package"]) or "==" not in entry["requirement"]:
            raise InputError(f"{source}: program {name!r}: split must be test or dev, package a plain name and "
                             f"requirement pinned (name==version), got {entry}")
    return {n: e for n, e in table.items() if split in ("all", e["split"])}


def questions_file(data: Path, name: str, split: str) -> Path:
    return data / ("dev" if split == "dev" else "") / f"{name}.jsonl"


def program_root(programs_dir: Path, name: str, entry: dict[str, str]) -> Path:
    return programs_dir / name / entry["package"]


def _download(requirement: str, into: Path) -> Path:
    """The wheel of ``requirement``, downloaded by pip into ``into`` (no dependencies, no source builds)."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                           "-d", str(into), requirement], capture_output=True, text=True, timeout=600)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        last = (done.stderr.strip().splitlines() or ["no wheel came back"])[-1]
        raise InputError(f"pip download {requirement} failed: {last}")
    return wheels[0]


def unpack(wheel: Path, package: str, target: Path) -> int:
    """The files under ``package/`` of ``wheel`` written into ``target/package`` (a member with an absolute path
    or `..` is refused); returns how many. Nothing of the wheel is run."""
    written = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            path = PurePosixPath(member.filename)
            if member.is_dir() or not path.parts or path.parts[0] != package:
                continue
            if path.is_absolute() or ".." in path.parts:
                raise InputError(f"{wheel.name}: member {member.filename!r} points outside the package folder")
            out = target.joinpath(*path.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written += 1
    if not written:
        raise InputError(f"{wheel.name} has no folder '{package}/' (programs.json names the wrong package?)")
    return written


def fetch(data: Path, out: Path, split: str = "all", log=print) -> list[Path]:
    """Every program of ``split`` under ``out/programs`` (one already there is kept); returns their roots."""
    roots = []
    for name, entry in programs(data, split).items():
        root = program_root(out / "programs", name, entry)
        if root.is_dir():
            log(f"{name}: {root} (already there)")
            roots.append(root)
            continue
        wheels, partial = out / "wheels", out / "programs" / f".partial-{name}"
        for folder in (wheels / f".partial-{name}", partial):
            shutil.rmtree(folder, ignore_errors=True)  # what an interrupted fetch left
        (wheels / f".partial-{name}").mkdir(parents=True)
        wheel = _download(entry["requirement"], wheels / f".partial-{name}")
        kept = wheels / wheel.name
        wheel.replace(kept)
        shutil.rmtree(wheels / f".partial-{name}")
        files = unpack(kept, entry["package"], partial)
        shutil.rmtree(out / "programs" / name, ignore_errors=True)
        partial.replace(out / "programs" / name)
        log(f"{name}: {root} ({files} files from {kept.name})")
        roots.append(root)
    return roots
