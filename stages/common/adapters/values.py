"""Value types on the edges of the build graph: the program vector, the artifact folder, capacity and targets."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from stages.common.adapters.factors import AdapterSet


@dataclasses.dataclass
class ProgramEmbedding:
    """§3: the program vector ``z`` and its per-channel vectors (all float32, length ``dim``)."""

    vectors: dict[str, Any]  # "z", "z_sym", ... -> np.ndarray
    dim: int
    seed: int
    weights: dict[str, float]

    @property
    def z(self):
        return self.vectors["z"]

    def summary(self) -> dict[str, Any]:
        return {"dim": self.dim, "seed": self.seed}


@dataclasses.dataclass
class ArtifactLocation:
    """Where the build artifacts of (program, build config) live, and whether they are there already."""

    path: Path
    exists: bool
    key: str
    fixed: bool = False  # given by the user (adapters=...), never rebuilt
    adapters_file: Path | None = None  # the npz the user named (adapters=/d/mine.npz); None: path/adapters.npz

    @property
    def npz(self) -> Path:
        return self.adapters_file or self.path / "adapters.npz"

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "exists": self.exists, "adapters": str(self.npz)}


@dataclasses.dataclass
class Capacity:
    rank: int
    gsub: float
    beta: float
    entropy: dict[str, float] | None = None  # score and components (entropy-aware capacity)

    def summary(self) -> dict[str, Any]:
        return {"rank": self.rank, "gsub": round(self.gsub, 4), "entropy": self.entropy}


@dataclasses.dataclass
class TargetPlan:
    """Per-target weights, per-layer multipliers and per-(layer, target) rank keeps."""

    weights: dict[str, float]
    layer_multipliers: list[float]
    keeps: dict[tuple[int, str], int]
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"weights": self.weights, "keeps": len(self.keeps), "notes": self.notes}


@dataclasses.dataclass
class Artifacts:
    """A loaded build-artifact folder (§2), checked against the loaded model."""

    path: Path
    manifest: dict[str, Any]
    embedding: ProgramEmbedding | None
    adapters: AdapterSet

    def __str__(self) -> str:
        return str(self.path)

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "rank": self.adapters.rank, "synth": self.manifest.get("synth", {}).get("name")}
