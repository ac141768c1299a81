"""Build artifacts (docs/behaviour.md §2): locate the folder of (program, build config, model), store it, load it.

A folder is keyed by what made it (``artifact_key``): the program's index fingerprint (its files and the indexing
code), the build config, the model's shapes, and the source fingerprint (pipeline/engine/cache.py) of the code that writes
the folder (this module) and of every stage the build config names with a ``_target_`` (embed, synth): an edit to
synthesis or fitting code is a new key, so a stale adapter is never reused.

`locate` decides whether the build nodes must run (`missing`); `store` writes the folder atomically (a
temporary folder renamed into place, so two builds at once leave one complete folder); `load` reads it back
(the folder's format, check and reading: stages/common/adapters/buildfolder.py).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.engine.cache import clean_stale_partials, discard, fingerprint, publish_dir, source_fingerprint
from pipeline.engine.stage import Stage
from stages.common.adapters.buildfolder import (
    ARTIFACT_FILES,
    SCHEMA_VERSION,
    file_sha256,
    folder_problem,
    git_commit,
    given_location,
    load_artifacts,
)
from stages.common.adapters.curves import write_curve
from stages.common.adapters.factors import AdapterSet, infer_targets, save_npz
from stages.common.types import ArtifactLocation, Artifacts, LanguageModel, ProgramEmbedding, ProgramIndex

log = logging.getLogger(__name__)


def _model_key(lm: LanguageModel) -> dict[str, Any]:
    tmap = infer_targets(lm.skeleton)  # the model's shapes: its weights need not be loaded
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

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        root: str
        build_config: dict = dataclasses.field(default_factory=dict)  # the config that makes a folder: its key
        path: str | None = None  # `adapters=<folder or .npz>`: that one, never rebuilt

    config: Config

    def run(self, index: ProgramIndex, lm: LanguageModel) -> dict:
        c = self.config
        key = artifact_key(index, c.build_config, lm)
        if c.path:
            return {"location": given_location(c.path, key), "missing": False}
        root = Path(c.root)
        folder = root / f"{index.location.name or 'program'}-{key[:8]}"
        clean_stale_partials(root)  # folders of builds that were killed half-way
        exists = (folder / "manifest.json").is_file() and (folder / "adapters.npz").is_file()
        if exists:
            problem = folder_problem(folder)
            if problem:  # a cache heals itself: a corrupt entry is removed and rebuilt, never loaded again and again
                log.warning("cached artifacts '%s' are corrupt (%s); removing them and rebuilding", folder, problem)
                discard(folder)
                exists = False
        return {"location": ArtifactLocation(folder, exists, key), "missing": not exists}


class StoreArtifacts(Stage):
    outputs = {"stored": ArtifactLocation}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        build_config: dict = dataclasses.field(default_factory=dict)

    config: Config

    def run(self, location: ArtifactLocation, embedding: ProgramEmbedding, adapters: AdapterSet,
            index: ProgramIndex, lm: LanguageModel, bank: dict | None = None) -> dict:
        model = _model_key(lm)
        manifest = {
            "schema_version": SCHEMA_VERSION, "key": location.key, "model_id": lm.model_id,
            "num_layers": model["num_layers"], "d_model": int(lm.skeleton.config.hidden_size),
            "target_shapes": model["shapes"], "targets": adapters.targets, "rank": adapters.rank,
            "embed_dim": embedding.dim, "seed": embedding.seed, "channel_weights": embedding.weights,
            "synth": {"name": adapters.meta.get("synth"),
                      **{k: v for k, v in adapters.meta.items() if k not in ("synth", "curve")}},
            "build_config": self.config.build_config, "program_root": str(index.location),
            "commit": None if index.file else git_commit(index.root),  # one file: nothing beside it is read
            "file_count": len(index.files), "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "package_version": _version(), "bank_modules": sorted(bank) if bank else [],
            "code": build_code(self.config.build_config),  # the source fingerprints in the key (what made this folder)
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


