"""LoRA factor sets in the original tool's key scheme, their safe npz I/O, and the model's target map.

Keys: ``L{i}.{t}.A`` (d_out x r), ``L{i}.{t}.B`` (r x d_in), ``L{i}.{t}.gate`` (0-d), optional ``L{i}.{t}.bias``.
Files are read by stages.common.npzsafe: an object array is refused, never unpickled.
"""
from __future__ import annotations

import dataclasses
import io
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engine.errors import InputError
from stages.common.npzsafe import MemberCheck, NpzRefused, NpzUnreadable, read_npz

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
KEY = re.compile(r"^L(\d+)\.(\w+)\.(A|B|gate|bias)$")


@dataclasses.dataclass
class AdapterSet:
    """LoRA factors for every (layer, target) of a model."""

    factors: dict[str, np.ndarray]
    num_layers: int
    shapes: dict[str, tuple[int, int]]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return [t for t in TARGETS if f"L0.{t}.A" in self.factors] + sorted(
            {m.group(2) for k in self.factors if (m := KEY.match(k)) and m.group(2) not in TARGETS})

    @property
    def rank(self) -> int:
        ranks = [v.shape[1] for k, v in self.factors.items() if k.endswith(".A")]
        return max(ranks) if ranks else 0

    def pair(self, layer: int, target: str) -> tuple[np.ndarray, np.ndarray] | None:
        a = self.factors.get(f"L{layer}.{target}.A")
        b = self.factors.get(f"L{layer}.{target}.B")
        return None if a is None or b is None else (a, b)

    def bias(self, layer: int, target: str) -> np.ndarray | None:
        return self.factors.get(f"L{layer}.{target}.bias")

    def summary(self) -> dict[str, Any]:
        return {"layers": self.num_layers, "rank": self.rank, "targets": self.targets, "source": self.meta.get("synth")}


def shipped_or_path(name: str, folder: Path, knob: str, what: str, known: list[str]) -> Path:
    """The .npz file a config key names: a file shipped in ``folder`` by its stem (``known``: the choices, for the
    error), or a path (anything with a '/' or ending in .npz); a one-line InputError naming ``knob`` if neither."""
    if "/" not in name and not name.endswith(".npz"):
        path = folder / f"{name}.npz"
        if not path.is_file():
            raise InputError(f"{knob} '{name}' is not a shipped {what} (known: {', '.join(sorted(known)) or 'none'}) "
                             f"nor a path to an .npz file")
        return path
    path = Path(name).expanduser()
    if not path.is_file():
        raise InputError(f"{knob} '{name}' is not a file")
    return path


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Deterministic npz (sorted keys, fixed zip timestamps): same arrays -> same bytes."""
    Path(path).write_bytes(npz_bytes(arrays))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes `save_npz` writes (for a caller that writes them atomically)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def load_npz(path: Path, check: MemberCheck | None = None) -> dict[str, np.ndarray]:
    """Every array of a user's npz, read by stages.common.npzsafe (each member's header passes its limits and
    ``check`` before any data is read; never unpickled); any problem is an InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"adapter file '{path}' does not exist")
    try:
        return read_npz(path, check)
    except NpzUnreadable as err:
        raise InputError(f"'{path}' is not a readable npz ({err})") from err
    except NpzRefused as err:
        raise InputError(f"'{path}': {err}") from err
    except OSError as err:
        raise InputError(f"'{path}' is not a readable npz ({type(err).__name__}: {err.strerror or err})") from err


def factor_check(shapes: dict[str, tuple[int, int]], num_layers: int) -> MemberCheck:
    """A member check for adapters.npz: only keys, dtypes and shapes this model can take (rank at most the
    smaller side of the target's weight), so a bomb is refused from its header."""

    def check(key: str, shape: tuple, dtype: np.dtype) -> str | None:
        problem = key_problem(key, shapes, num_layers)
        if problem:
            return problem
        if dtype.kind != "f":
            return f"has dtype {dtype}, expected floats"
        return shape_problem(key, shape, shapes)

    return check


def key_problem(key: str, shapes: dict[str, tuple[int, int]], num_layers: int) -> str | None:
    match = KEY.match(key)
    if not match:
        return "is not an adapter key (expected L<i>.<target>.A|B|gate|bias)"
    layer, target = int(match.group(1)), match.group(2)
    if layer >= num_layers:
        return f"names layer {layer} but the model has {num_layers} layers"
    if target not in shapes:
        return f"names target '{target}' the model lacks; model targets: {', '.join(shapes)}"
    return None


def shape_problem(key: str, shape: tuple, shapes: dict[str, tuple[int, int]]) -> str | None:
    """Why a factor of this shape cannot belong to this model (``key`` already checked by ``key_problem``)."""
    _, target, part = KEY.match(key).groups()  # type: ignore[union-attr]  # key_problem checked it
    d_out, d_in = shapes[target]
    if part == "A" and (len(shape) != 2 or shape[0] != d_out):
        return f"has shape {shape}, the model needs ({d_out}, r)"
    if part == "B" and (len(shape) != 2 or shape[1] != d_in):
        return f"has shape {shape}, the model needs (r, {d_in})"
    if part in ("A", "B"):
        rank = shape[1] if part == "A" else shape[0]
        if rank > min(d_out, d_in):
            return f"has rank {rank}, more than the {min(d_out, d_in)} a {d_out}x{d_in} weight can take"
    if part == "bias" and tuple(shape) != (d_out,):
        return f"has shape {shape}, the model needs ({d_out},)"
    if part == "gate" and math.prod(shape) > 1:
        return f"has shape {shape}, a gate is one number"
    return None


def check_factors(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], num_layers: int,
                  origin: str, allow_empty: bool = False) -> AdapterSet:
    """Validate keys, shapes and values against the model; the message names the file and the key."""
    if not arrays and not allow_empty:
        raise InputError(f"{origin}: no adapter arrays")
    for key, value in arrays.items():
        problem = key_problem(key, shapes, num_layers)
        if problem:
            raise InputError(f"{origin}: key '{key}' {problem}")
        if not np.issubdtype(value.dtype, np.floating):
            raise InputError(f"{origin}: '{key}' has dtype {value.dtype}, expected floats")
        if not np.all(np.isfinite(value)):
            raise InputError(f"{origin}: '{key}' contains NaN or Inf")
        problem = shape_problem(key, value.shape, shapes)
        if problem:
            raise InputError(f"{origin}: '{key}' {problem}")
    for key in arrays:
        layer, target, part = KEY.match(key).groups()  # type: ignore[union-attr]  # checked above
        if part in ("A", "B"):
            other = f"L{layer}.{target}.{'B' if part == 'A' else 'A'}"
            if other not in arrays:
                raise InputError(f"{origin}: '{key}' has no matching '{other}'")
            if part == "A" and arrays[key].shape[1] != arrays[other].shape[0]:
                raise InputError(f"{origin}: rank of '{key}' ({arrays[key].shape[1]}) differs from '{other}' ({arrays[other].shape[0]})")
    return AdapterSet({k: v.astype(np.float32, copy=False) for k, v in arrays.items()}, num_layers, dict(shapes))


@dataclasses.dataclass
class TargetMap:
    """Where each (layer, target) lives in a loaded model: the Linear module and, for fused MLPs, its rows."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]
    modules: dict[tuple[int, str], tuple[str, Any, slice | None]]  # (layer, target) -> (name, module, rows)

    @property
    def targets(self) -> list[str]:
        return [t for t in TARGETS if t in self.shapes]


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def infer_targets(model) -> TargetMap:
    """Infer target shapes and layer count from the model's modules (q/k/v/o, gate/up/down, fused gate_up)."""
    import torch

    modules: dict[tuple[int, str], tuple[str, Any, slice | None]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name + ".")
        if not match or not isinstance(module, torch.nn.Linear):
            continue
        layer, leaf = int(match.group(1)), name.rsplit(".", 1)[-1]
        d_out, d_in = module.weight.shape
        if leaf in TARGETS:
            modules[(layer, leaf)] = (name, module, None)
            shapes.setdefault(leaf, (d_out, d_in))
        elif leaf == "gate_up_proj":  # fused MLP: gate rows first, then up rows
            half = d_out // 2
            modules[(layer, "gate_proj")] = (name, module, slice(0, half))
            modules[(layer, "up_proj")] = (name, module, slice(half, d_out))
            shapes.setdefault("gate_proj", (half, d_in))
            shapes.setdefault("up_proj", (half, d_in))
    if not modules:
        raise InputError("the model has no q/k/v/o/gate/up/down projection layers to adapt")
    num_layers = 1 + max(layer for layer, _ in modules)
    return TargetMap(num_layers, shapes, modules)
