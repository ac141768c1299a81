"""A build-artifact folder (docs/behaviour.md §2): what it holds, the check before it is trusted, reading it back.

Written by the `store` stage (stages/artifacts.py) into a temporary folder published atomically; a later run checks
every file against the sha256 its manifest recorded, and `load_artifacts` reads it with `allow_pickle=False` and
checks it against the loaded model.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

from pipeline.engine.errors import InputError
from stages.common.adapters.factors import check_factors, factor_check, infer_targets, load_npz
from stages.common.program.walk import read_small
from stages.common.types import ArtifactLocation, Artifacts, LanguageModel, ProgramEmbedding

SCHEMA_VERSION = 1  # the folder's file format, checked when a folder is loaded (adapters=<folder> is never rebuilt)


def given_location(path: str, key: str) -> ArtifactLocation:
    """`adapters=<folder>` uses <folder>/adapters.npz; `adapters=<file>.npz` uses exactly that file."""
    given = Path(path).expanduser()
    if not given.exists():
        raise InputError(f"adapters '{path}' does not exist; pass an artifact folder or an .npz file")
    if given.is_dir():
        return ArtifactLocation(given, True, key, fixed=True)
    if given.suffix != ".npz":
        raise InputError(f"adapters '{path}' is a file but not an .npz; pass an artifact folder or an .npz file")
    return ArtifactLocation(given.parent, True, key, fixed=True, adapters_file=given)


ARTIFACT_FILES = ("adapters.npz", "embedding.npz", "sources.jsonl", "windows.jsonl")


def folder_problem(folder: Path) -> str | None:
    """Why a cached artifact folder cannot be trusted (None when it is whole): an unreadable manifest, a file
    whose sha256 differs from the one the manifest recorded (truncated, overwritten), or, for folders from
    before the hashes were recorded, an npz whose zip CRCs fail."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        return f"manifest.json: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not isinstance(manifest, dict):
        return "manifest.json is not a JSON object"
    recorded = manifest.get("files")
    if isinstance(recorded, dict):
        for name, digest in recorded.items():
            try:
                actual = file_sha256(folder / name)
            except OSError as err:
                return f"{name}: {err.strerror or err}"
            if actual != digest:
                return f"{name} does not match the sha256 in manifest.json"
        return None
    for name in ("adapters.npz", "embedding.npz"):
        if not (folder / name).is_file():
            continue
        try:
            with zipfile.ZipFile(folder / name) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            return f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'truncated'}"
        if bad:
            return f"{name}: member '{bad}' fails its CRC"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(root: Path) -> str | None:
    """The checked-out commit, read from .git without running git (never execute anything of the program).

    Only small regular files inside the program are read: a `.git/HEAD` that is a FIFO or a link out of the
    root is not followed."""

    def read(rel: str) -> str:
        data = read_small(root, root / ".git" / rel, 1 << 20)
        return "" if data is None else data.decode("utf-8", errors="replace").strip()

    ref = read("HEAD")
    if not ref.startswith("ref:"):
        return ref or None
    name = ref[4:].strip()
    if not name or ".." in name.split("/"):
        return None
    commit = read(name)
    if commit:
        return commit
    for line in read("packed-refs").splitlines():
        if line.endswith(" " + name):
            return line.split()[0]
    return None


def load_artifacts(folder: Path, lm: LanguageModel, require_manifest: bool = True, npz: Path | None = None) -> Artifacts:
    """Read an artifact folder (or, with ``npz``, exactly that adapter file) and check it against the model.

    A named file other than the folder's own adapters.npz is read alone: the folder's manifest and embedding
    describe its adapters.npz, not that file."""
    tmap = infer_targets(lm.skeleton)  # shapes only
    npz = Path(npz) if npz else folder / "adapters.npz"
    own = npz == folder / "adapters.npz"
    manifest_file = folder / "manifest.json"
    manifest: dict[str, Any] = {}
    if own and manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
        except ValueError as err:
            raise InputError(f"'{manifest_file}' is not valid JSON ({err})") from err
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"'{manifest_file}' has schema_version {manifest.get('schema_version')!r}; "
                             f"this version reads {SCHEMA_VERSION}; rebuild with python -m pipeline.build")
        if manifest.get("model_id") != lm.model_id or manifest.get("num_layers") != tmap.num_layers:
            raise InputError(f"'{manifest_file}' was built for model {manifest.get('model_id')!r} "
                             f"({manifest.get('num_layers')} layers), not {lm.model_id!r} ({tmap.num_layers} layers)")
    elif require_manifest:
        raise InputError(f"'{folder}' has no manifest.json")
    arrays = load_npz(npz, check=factor_check(tmap.shapes, tmap.num_layers))  # headers first: no zip bomb
    empty_by_design = (manifest.get("synth") or {}).get("name") == "none"  # synth=none stores no factors
    adapters = check_factors(arrays, tmap.shapes, tmap.num_layers, str(npz), empty_by_design)
    adapters.meta = dict(manifest.get("synth") or {"synth": "external"})
    adapters.meta["synth"] = adapters.meta.pop("name", adapters.meta.get("synth"))
    embedding = None
    if own and (folder / "embedding.npz").is_file():
        vectors = load_npz(folder / "embedding.npz")
        if "z" in vectors:
            embedding = ProgramEmbedding(vectors, int(vectors["z"].shape[0]), int(manifest.get("seed", 0)),
                                         dict(manifest.get("channel_weights", {})))
    return Artifacts(folder, manifest, embedding, adapters)
