"""A low-rank (LoRA) weight delta for the MiniLM sentence encoder of `select=hybrid` (`select.encoder_adapter`).

all-MiniLM-L6-v2 was trained on pairs of sentences, not on a sentence and the code it describes. The shipped
adapter was fitted (stages.common.retrieval.encoder_fit, by `python -m tools.fit_encoder_adapter`) to put a docstring's
first sentence next to the window of code it documents, on programs other than the ones docs/results.md evaluates. It is merged into the encoder's linear layers
when the encoder's weights are loaded (``W += scale · B @ A``): questions and windows are both embedded with it,
so the dense cache is keyed on the adapter's contents as well.

File format (npz, read with ``allow_pickle=False``): for each adapted linear layer ``<module>.A`` (rank × in) and
``<module>.B`` (out × rank), float, finite; ``scale`` (a float scalar); ``meta`` (a JSON string: the recipe).
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.engine.cache import write_atomic
from pipeline.engine.errors import InputError
from stages.common.adapters.factors import load_npz, npz_bytes, shipped_or_path

SHIPPED = Path(__file__).resolve().parents[2] / "data"
SUFFIX = ".npz"
KNOB = "select.encoder_adapter"
# the linear layers of a BERT encoder block that the adapter may change (attention and feed-forward)
TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


def resolve(name: str) -> Path:
    """A shipped adapter's name (`minilm_code_search_lora`) or a path to an .npz file."""
    return shipped_or_path(name, SHIPPED, KNOB, "adapter", [p.stem for p in SHIPPED.glob(f"*_lora{SUFFIX}")])


class EncoderAdapter:
    """The pairs (A, B) per module and the scale of one adapter file; ``key`` identifies its contents."""

    def __init__(self, path: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], scale: float, key: str):
        self.path, self.pairs, self.scale, self.key = path, pairs, scale, key

    def check(self, model) -> dict:
        """Every adapted module exists in ``model`` as a linear layer of matching shape (an InputError if not); the
        model's modules by name."""
        import torch

        modules = dict(model.named_modules())
        for name, (a, b) in self.pairs.items():
            module = modules.get(name)
            if not isinstance(module, torch.nn.Linear):
                raise InputError(f"{KNOB} file '{self.path}': '{name}' is not a linear layer of the sentence encoder")
            if tuple(module.weight.shape) != (b.shape[0], a.shape[1]):
                raise InputError(f"{KNOB} file '{self.path}': '{name}' adapts a {b.shape[0]}x{a.shape[1]} weight, the "
                                 f"encoder's is {tuple(module.weight.shape)[0]}x{tuple(module.weight.shape)[1]}")
        return modules

    def merge(self, model) -> None:
        """``W += scale · B @ A`` for every adapted layer (the model is a fresh copy, loaded for one encode call)."""
        import torch

        modules = self.check(model)
        with torch.no_grad():
            for name, (a, b) in self.pairs.items():
                weight = modules[name].weight
                weight += self.scale * (torch.from_numpy(b) @ torch.from_numpy(a)).to(weight.dtype)


def load(name: str) -> EncoderAdapter:
    path = resolve(name)
    stat = path.stat()
    return _load(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int, size: int) -> EncoderAdapter:
    try:
        arrays = load_npz(Path(path))  # no unpickling; a member declaring too many bytes is refused from its header
    except InputError as err:
        raise InputError(f"{KNOB} file '{path}' is not a readable npz file ({err})") from err
    where = f"{KNOB} file '{path}'"
    if "scale" not in arrays or arrays["scale"].size != 1 or arrays["scale"].dtype.kind != "f":
        raise InputError(f"{where} has no float 'scale' scalar")
    scale = float(arrays["scale"].reshape(()))
    if not np.isfinite(scale):
        raise InputError(f"{where}: 'scale' is {scale}")
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in arrays:
        if key in ("scale", "meta"):
            continue
        module, _, part = key.rpartition(".")
        if part not in ("A", "B") or not module.endswith(TARGETS):
            raise InputError(f"{where}: unexpected array '{key}' (expected <module>.A / <module>.B of "
                             f"{', '.join(TARGETS)})")
        if module in pairs:
            continue
        if f"{module}.A" not in arrays or f"{module}.B" not in arrays:
            raise InputError(f"{where}: '{module}' needs both '{module}.A' and '{module}.B'")
        a, b = arrays[f"{module}.A"], arrays[f"{module}.B"]
        if a.dtype.kind != "f" or b.dtype.kind != "f" or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"{where}: '{module}' needs float A (rank x in) and B (out x rank), got "
                             f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise InputError(f"{where}: '{module}' holds NaN or inf")
        pairs[module] = (a.astype(np.float32), b.astype(np.float32))
    if not pairs:
        raise InputError(f"{where} adapts no layer")
    # the cache key of the adapted encoder's vectors: what was read (not a second read of a file that may change)
    digest = hashlib.blake2b(repr(scale).encode(), digest_size=12)
    for module in sorted(pairs):
        for array in pairs[module]:
            digest.update(module.encode())
            digest.update(array.tobytes())
    return EncoderAdapter(Path(path), pairs, scale, digest.hexdigest())


def write(path: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], scale: float, meta: dict) -> None:
    """Write an adapter file atomically (the format ``load`` reads; same contents give the same bytes)."""
    arrays: dict[str, np.ndarray] = {"scale": np.array(float(scale)), "meta": np.array(json.dumps(meta, sort_keys=True))}
    for module, (a, b) in pairs.items():
        arrays[f"{module}.A"] = np.asarray(a, dtype=np.float32)
        arrays[f"{module}.B"] = np.asarray(b, dtype=np.float32)
    write_atomic(path, npz_bytes(arrays))
