"""A loaded model ready for answers (frozen, on its device, quantized when asked, with its attention kernel), shared
by every answer of the process, with its weights loaded now or at their first read."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pipeline.engine import resources
from pipeline.engine.errors import ConfigError
from stages.common.adapters.weightfile import remember
from stages.common.generation.attention import Attention, use_attention
from stages.common.generation.precision import Quantize, quantize_int8, quiet_torchao_import, torch_dtype
from stages.common.types import LanguageModel

log = logging.getLogger(__name__)
Device = Literal["cpu", "cuda", "auto"]
Dtype = Literal["float32", "float16", "bfloat16"]
Weights = Literal["eager", "on_demand"]  # on_demand: the tokenizer now, the weights at their first use


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda but no CUDA device is available; use device=cpu or auto")
    return device


def ready(model, device: str, device_map: str | None, quantize: Quantize = "none",
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


def padded(tokenizer):
    """The tokenizer with a pad token (its end-of-sequence token when it has none)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def finish(model, tokenizer, model_id: str, device: str, device_map: str | None,
           quantize: Quantize = "none", attention: Attention = "sdpa") -> LanguageModel:
    model, where = ready(model, device, device_map, quantize, attention)
    return LanguageModel(model, padded(tokenizer), model_id, where)


def on_demand(tokenizer, model_id: str, device: str, load_model: Callable[[], tuple[Any, str]],
              gguf: Path | None = None, architecture: Callable[[], Any] | None = None) -> LanguageModel:
    """A LanguageModel with its tokenizer now and its weights at the first read of ``.model`` (``architecture``:
    its config, for the weightless ``.skeleton``)."""
    return LanguageModel(None, padded(tokenizer), model_id, device, loader=load_model, gguf=gguf,
                         architecture=architecture)


def shared_lm(key: tuple, factory: Callable[[], LanguageModel], weights: str) -> LanguageModel:
    """The process-wide model for ``key``; `weights=eager` loads the weights now, `on_demand` at their first use."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr would break the CLI's one-line errors
    lm = resources.shared("model", key, factory)
    if weights == "eager":
        lm.model  # noqa: B018 - reading it loads the weights, so a load failure belongs to the model node
    return lm


def folder_on_demand(path: Path, dtype: str, device: str, device_map: str | None, quantize: Quantize,
                     attention: Attention) -> LanguageModel:
    """A local transformers checkpoint folder: its tokenizer now, its weights at their first read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def load():
        quiet_torchao_import()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), device_map=device_map)
        remember(model, path)  # copied privately: merge mode reads written weights back from the copy
        return ready(model, device, device_map, quantize, attention)

    return on_demand(AutoTokenizer.from_pretrained(path), path.name, device, load,
                     architecture=lambda: AutoConfig.from_pretrained(path))
