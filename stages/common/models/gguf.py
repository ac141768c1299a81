"""A GGUF model through a float32 safetensors copy of it, converted once.

Loading a GGUF makes transformers de-quantize every tensor (~20-30 s for SmolLM2), so the first load saves a float32
copy (safetensors) under the model cache, and a copy in the asked dtype beside it; later loads read that copy in well
under a second with identical logits.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.engine.cache import discard, fingerprint, publish_dir
from stages.common.adapters.weightfile import remember
from stages.common.generation.attention import Attention
from stages.common.generation.precision import Quantize, quiet_torchao_import, torch_dtype
from stages.common.models.checkpoint import checked_copy, digest_problem, dtype_copy, record_digests
from stages.common.models.loading import finish, on_demand
from stages.common.types import LanguageModel

log = logging.getLogger(__name__)


def _converted_dir(gguf_path: Path, cache_dir: Path | None) -> Path | None:
    return None if cache_dir is None else cache_dir / _converted_name(gguf_path)


def _converted_name(gguf_path: Path) -> str:
    st = gguf_path.stat()
    return f"{gguf_path.stem}-{fingerprint([gguf_path.name, st.st_size, st.st_mtime_ns], 12)}"


def gguf_header(gguf_path: Path, cache_dir: Path | None) -> Path:
    """A folder with the GGUF's tokenizer and config.json: the converted copy when there is one, else the header read
    once into ``<name>-header`` beside it (reading a GGUF's header takes ~8 s for Qwen, the folder 0.5 s); without a
    cache, the GGUF's own folder."""
    converted = _converted_dir(gguf_path, cache_dir)
    if converted is None:
        return gguf_path.parent
    if (converted / "config.json").is_file():
        return converted
    folder = converted.with_name(converted.name + "-header")
    if folder.exists():
        problem = digest_problem(folder) or (None if (folder / "config.json").is_file() else "no config.json")
        if problem:  # a cache heals itself
            log.warning("the model header cache '%s' is corrupt (%s); reading the GGUF again", folder, problem)
            discard(folder)
    if not folder.exists():
        with publish_dir(folder) as tmp:
            _save_header(gguf_path, tmp)
            record_digests(tmp)
    return folder


def _save_header(gguf_path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)
    AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)


def gguf_tokenizer(gguf_path: Path, cache_dir: Path | None):
    """The tokenizer alone, from the converted copy or the header folder (fast after the first read)."""
    from transformers import AutoTokenizer

    header = gguf_header(gguf_path, cache_dir)
    if header == gguf_path.parent:
        return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return AutoTokenizer.from_pretrained(header)


def gguf_architecture(gguf_path: Path, cache_dir: Path | None):
    """The model's transformers config (its layers and shapes), without reading a weight."""
    from transformers import AutoConfig

    header = gguf_header(gguf_path, cache_dir)
    if header == gguf_path.parent:
        return AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return AutoConfig.from_pretrained(header)


def gguf_on_demand(gguf_path: Path, cache_dir: Path | None, dtype: str, device: str, device_map: str | None,
                   model_id: str, quantize: Quantize = "none", attention: Attention = "sdpa") -> LanguageModel:
    def load() -> tuple[Any, str]:
        lm = load_gguf_converted(gguf_path, cache_dir, dtype, device, device_map, model_id, quantize, attention)
        return lm.model, lm.device

    return on_demand(gguf_tokenizer(gguf_path, cache_dir), model_id, device, load, gguf_path,
                     functools.partial(gguf_architecture, gguf_path, cache_dir))


def load_gguf_converted(gguf_path: Path, cache_dir: Path | None, dtype: str, device: str, device_map: str | None,
                        model_id: str, quantize: Quantize = "none", attention: Attention = "sdpa") -> LanguageModel:
    """Load a GGUF, going through (and creating) a float32 safetensors copy under ``cache_dir``.

    The copy is a cache that heals: a copy that fails its checks (truncated safetensors, broken JSON, a file whose
    sha256 is not the one recorded when it was written) or does not load is removed with a warning naming it and
    converted again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_torchao_import()
    if cache_dir is None:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        return finish(model, tokenizer, model_id, device, device_map, quantize, attention)
    convert = functools.partial(convert_gguf, gguf_path)

    def copy() -> Path:  # only the folder loaded (or read to make it) has every file checked against its digest
        float32 = functools.partial(converted_copy, gguf_path, cache_dir, convert)
        return dtype_copy(float32(deep=dtype == "float32"), dtype, verified=float32)

    converted = copy()
    try:
        model, tokenizer = _load_converted(converted, dtype, device_map)
    except Exception as err:  # noqa: BLE001 - not hidden: remade once, and a second failure is raised
        log.warning("the converted model '%s' does not load (%s: %s); removing it and converting again",
                    converted, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        discard(converted)
        converted = copy()
        model, tokenizer = _load_converted(converted, dtype, device_map)
    return finish(model, tokenizer, model_id, device, device_map, quantize, attention)


def _load_converted(folder: Path, dtype: str, device_map: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_torchao_import()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), device_map=device_map)
    remember(model, folder)  # copied privately: merge mode reads written weights back from the copy
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


def converted_copy(gguf_path: Path, cache_dir: Path, convert: Callable[[Path], None], deep: bool = True) -> Path:
    """The folder of the converted copy of ``gguf_path`` under ``cache_dir``: checked (``deep``: its content digests
    too), made when missing or corrupt (``convert(tmp)`` writes it; it is published atomically), and half-written
    folders of killed conversions removed."""
    return checked_copy(cache_dir / _converted_name(gguf_path), convert, deep)
