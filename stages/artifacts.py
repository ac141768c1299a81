"""Build artifacts (SPEC §2): locate the folder of (program, build config, model), store it, load it.

A folder is keyed by what made it (``artifact_key``): the program's index fingerprint (its files and the indexing
code), the build config, the model's shapes, and the source fingerprint (pipeline/engine/cache.py) of the code that writes
the folder (this module) and of every stage the build config names with a ``_target_`` (embed, synth): an edit to
synthesis or fitting code is a new key, so a stale adapter is never reused.

`locate` decides whether the build nodes must run (`missing`); `store` writes the folder atomically (a
temporary folder renamed into place, so two builds at once leave one complete folder); `load` reads it back
with `allow_pickle=False` and checks it against the loaded model.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.engine.cache import clean_stale_partials, discard, fingerprint, publish_dir, source_fingerprint
from pipeline.engine.errors import InputError
from pipeline.engine.stage import Stage
from stages.common.adapters.curves import write_curve
from stages.common.adapters.factors import AdapterSet, check_factors, factor_check, infer_targets, load_npz, save_npz
from stages.common.program.walk import read_small
from stages.common.types import ArtifactLocation, Artifacts, LanguageModel, ProgramEmbedding, ProgramIndex

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1  # the folder's file format, checked when a folder is loaded (adapters=<folder> is never rebuilt)


def _model_key(lm: LanguageModel) -> dict[str, Any]:
    tmap = infer_targets(lm.model)
    return {"model": lm.model_id, "num_layers": tmap.num_layers, "shapes": {t: list(s) for t, s in tmap.shapes.items()}}


def build_code(build_config: Any) -> dict[str, str]:
    """module -> source fingerprint, for this module and every ``_target_`` found in ``build_config``."""
    modules = {__name__: source_fingerprint(__name__)}
    for target in _targets(build_config):
        modules[target] = source_fingerprint(target)
    return dict(sorted(modules.items()))


def _targets(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        found = [str(value["_target_"])] if isinstance(value.get("_target_"), str) else []
        return found + [t for k, v in value.items() if k != "_target_" for t in _targets(v)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [t for v in value for t in _targets(v)]
    return []


def artifact_key(index: ProgramIndex, build_config: Any, lm: LanguageModel) -> str:
    return fingerprint({"program": index.fingerprint, "build": build_config, "model": _model_key(lm),
                        "code": build_code(build_config)})


class LocateArtifacts(Stage):
    outputs = {"location": ArtifactLocation, "missing": bool}

    def __init__(self, root: str, build_config: dict = {}, path: str | None = None):
        self.root, self.build_config, self.path = Path(root), dict(build_config), path

    def run(self, index: ProgramIndex, lm: LanguageModel) -> dict:
        key = artifact_key(index, self.build_config, lm)
        if self.path:
            return {"location": given_location(self.path, key), "missing": False}
        folder = self.root / f"{index.root.name or 'program'}-{key[:8]}"
        clean_stale_partials(self.root)  # folders of builds that were killed half-way
        exists = (folder / "manifest.json").is_file() and (folder / "adapters.npz").is_file()
        if exists:
            problem = folder_problem(folder)
            if problem:  # a cache heals itself: a corrupt entry is removed and rebuilt, never loaded again and again
                log.warning("cached artifacts '%s' are corrupt (%s); removing them and rebuilding", folder, problem)
                discard(folder)
                exists = False
        return {"location": ArtifactLocation(folder, exists, key), "missing": not exists}


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


class StoreArtifacts(Stage):
    outputs = {"stored": ArtifactLocation}

    def __init__(self, build_config: dict = {}):
        self.build_config = dict(build_config)

    def run(self, location: ArtifactLocation, embedding: ProgramEmbedding, adapters: AdapterSet,
            index: ProgramIndex, lm: LanguageModel, bank: dict | None = None) -> dict:
        model = _model_key(lm)
        manifest = {
            "schema_version": SCHEMA_VERSION, "key": location.key, "model_id": lm.model_id,
            "num_layers": model["num_layers"], "d_model": int(lm.model.config.hidden_size),
            "target_shapes": model["shapes"], "targets": adapters.targets, "rank": adapters.rank,
            "embed_dim": embedding.dim, "seed": embedding.seed, "channel_weights": embedding.weights,
            "synth": {"name": adapters.meta.get("synth"),
                      **{k: v for k, v in adapters.meta.items() if k not in ("synth", "curve")}},
            "build_config": self.build_config, "program_root": str(index.root), "commit": git_commit(index.root),
            "file_count": len(index.files), "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "package_version": _version(), "bank_modules": sorted(bank) if bank else [],
            "code": build_code(self.build_config),  # the source fingerprints in the key (what made this folder)
        }
        with publish_dir(location.path) as tmp:
            curve = adapters.meta.get("curve") or []
            if curve:  # the fitted synthesizer's training curve (curve.jsonl, curve.csv, curve.png)
                manifest["synth"]["curve"] = [p.name for p in write_curve(tmp, curve, index.root.name)]
            save_npz(tmp / "embedding.npz", embedding.vectors)
            save_npz(tmp / "adapters.npz", adapters.factors)
            (tmp / "sources.jsonl").write_text("".join(
                json.dumps({"path": r.path, "sha256": r.sha256, "bytes": r.bytes}) + "\n" for r in index.files.values()))
            (tmp / "windows.jsonl").write_text("".join(json.dumps(w.as_dict()) + "\n" for w in index.windows))
            for module, module_adapters in (bank or {}).items():
                (tmp / "bank" / module).mkdir(parents=True)
                save_npz(tmp / "bank" / module / "adapters.npz", module_adapters.factors)
            # what a later run checks before it trusts this folder (a truncated file is rebuilt, not loaded)
            manifest["files"] = {name: file_sha256(tmp / name) for name in ARTIFACT_FILES}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        return {"stored": ArtifactLocation(location.path, True, location.key)}


def _version() -> str:
    try:
        return metadata.version("pca-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


class LoadArtifacts(Stage):
    outputs = {"artifacts": Artifacts}

    def run(self, location: ArtifactLocation, lm: LanguageModel, stored: ArtifactLocation | None = None) -> dict:
        return {"artifacts": load_artifacts(location.path, lm, require_manifest=not location.fixed,
                                            npz=location.adapters_file)}


def load_artifacts(folder: Path, lm: LanguageModel, require_manifest: bool = True, npz: Path | None = None) -> Artifacts:
    """Read an artifact folder (or, with ``npz``, exactly that adapter file) and check it against the model.

    A named file other than the folder's own adapters.npz is read alone: the folder's manifest and embedding
    describe its adapters.npz, not that file."""
    tmap = infer_targets(lm.model)
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
