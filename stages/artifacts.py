"""Build artifacts (SPEC §2): locate the folder of (program, build config, model), store it, load it.

`locate` decides whether the build nodes must run (`missing`); `store` writes the folder atomically (a
temporary folder renamed into place, so two builds at once leave one complete folder); `load` reads it back
with `allow_pickle=False` and checks it against the loaded model.
"""
from __future__ import annotations

import datetime
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import fingerprint, publish_dir
from pipeline.errors import InputError
from pipeline.stage import Stage
from stages.common.adapters import AdapterSet, check_factors, infer_targets, load_npz, save_npz
from stages.common.curves import write_curve
from stages.common.types import ArtifactLocation, Artifacts, LanguageModel, ProgramEmbedding, ProgramIndex

SCHEMA_VERSION = 1


def _model_key(lm: LanguageModel) -> dict[str, Any]:
    tmap = infer_targets(lm.model)
    return {"model": lm.model_id, "num_layers": tmap.num_layers, "shapes": {t: list(s) for t, s in tmap.shapes.items()}}


class LocateArtifacts(Stage):
    outputs = {"location": ArtifactLocation, "missing": bool}

    def __init__(self, root: str, build_config: dict = {}, path: str | None = None):
        self.root, self.build_config, self.path = Path(root), dict(build_config), path

    def run(self, index: ProgramIndex, lm: LanguageModel) -> dict:
        key = fingerprint({"program": index.fingerprint, "build": self.build_config, "model": _model_key(lm),
                           "schema": SCHEMA_VERSION})
        if self.path:
            given = Path(self.path).expanduser()
            folder = given.parent if given.suffix == ".npz" else given
            if not folder.exists():
                raise InputError(f"adapters '{self.path}' does not exist")
            return {"location": ArtifactLocation(folder, True, key, fixed=True), "missing": False}
        folder = self.root / f"{index.root.name or 'program'}-{key[:8]}"
        exists = (folder / "manifest.json").is_file() and (folder / "adapters.npz").is_file()
        return {"location": ArtifactLocation(folder, exists, key), "missing": not exists}


def git_commit(root: Path) -> str | None:
    """The checked-out commit, read from .git without running git (never execute anything of the program)."""
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if not ref.startswith("ref:"):
            return ref or None
        name = ref.split(None, 1)[1]
        ref_file = root / ".git" / name
        if ref_file.is_file():
            return ref_file.read_text().strip()
        packed = root / ".git" / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            if line.endswith(" " + name):
                return line.split()[0]
    except OSError:
        return None
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
            "file_count": len(index.files), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "package_version": _version(), "bank_modules": sorted(bank) if bank else [],
        }
        with publish_dir(location.path) as tmp:
            curve = adapters.meta.get("curve") or []
            if curve:  # the fitted synthesizer's training curve (curve.jsonl, curve.csv, curve.png)
                manifest["synth"]["curve"] = [p.name for p in write_curve(tmp, curve, index.root.name)]
            save_npz(tmp / "embedding.npz", embedding.vectors)
            save_npz(tmp / "adapters.npz", adapters.factors)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            (tmp / "sources.jsonl").write_text("".join(
                json.dumps({"path": r.path, "sha256": r.sha256, "bytes": r.bytes}) + "\n" for r in index.files.values()))
            (tmp / "windows.jsonl").write_text("".join(json.dumps(w.as_dict()) + "\n" for w in index.windows))
            for module, module_adapters in (bank or {}).items():
                (tmp / "bank" / module).mkdir(parents=True)
                save_npz(tmp / "bank" / module / "adapters.npz", module_adapters.factors)
        return {"stored": ArtifactLocation(location.path, True, location.key)}


def _version() -> str:
    try:
        return metadata.version("pca-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


class LoadArtifacts(Stage):
    outputs = {"artifacts": Artifacts}

    def run(self, location: ArtifactLocation, lm: LanguageModel, stored: ArtifactLocation | None = None) -> dict:
        return {"artifacts": load_artifacts(location.path, lm, require_manifest=not location.fixed)}


def load_artifacts(folder: Path, lm: LanguageModel, require_manifest: bool = True) -> Artifacts:
    tmap = infer_targets(lm.model)
    manifest_file = folder / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_file.is_file():
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
    arrays = load_npz(folder / "adapters.npz")
    empty_by_design = (manifest.get("synth") or {}).get("name") == "none"  # synth=none stores no factors
    adapters = check_factors(arrays, tmap.shapes, tmap.num_layers, str(folder / "adapters.npz"), empty_by_design)
    adapters.meta = dict(manifest.get("synth") or {"synth": "external"})
    adapters.meta["synth"] = adapters.meta.pop("name", adapters.meta.get("synth"))
    embedding = None
    if (folder / "embedding.npz").is_file():
        vectors = load_npz(folder / "embedding.npz")
        if "z" in vectors:
            embedding = ProgramEmbedding(vectors, int(vectors["z"].shape[0]), int(manifest.get("seed", 0)),
                                         dict(manifest.get("channel_weights", {})))
    return Artifacts(folder, manifest, embedding, adapters)
