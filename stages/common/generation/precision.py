"""How the model computes: weight dtype, int8 dynamic quantization of its linear layers, CPU threads.

- ``model.dtype=bfloat16`` halves the bytes read per token (decoding on a CPU is bound by memory bandwidth) and
  uses the AVX-512 BF16 instructions where the CPU has them; mixing stays exact (stages/common/adapters/mixing.py computes
  every delta in float32 and casts once, and restores the original tensors).
- ``model.quantize=int8``: torchao's int8 dynamic quantization (int8 weights, activations quantized per token at
  run time) of every ``nn.Linear`` of the decoder and the LM head; the adapter is then mixed with forward hooks
  only (``mix.mode=merge`` cannot add a float delta to int8 weights and is refused).
- ``model.threads``: torch's intra-op threads for this process (0 = leave torch's default, which follows
  ``OMP_NUM_THREADS``). On a machine whose cores are busy with other work, fewer threads than cores can be much
  faster: OpenMP workers spin-wait for each other at every matmul.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

from pipeline.engine.errors import ConfigError

log = logging.getLogger(__name__)
Quantize = Literal["none", "int8"]


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


QUANTIZE_INSTALL = "pip install 'pca-pipeline[quantize]' (torchao==0.18.0)"


def require_quantizer(quantize: str) -> None:
    """At config time, before any weights load: ``model.quantize=int8`` needs torchao, an optional extra (installed,
    transformers imports it at every model load and it logs warnings about GPU kernels this CPU machine lacks)."""
    import importlib.util

    if quantize == "int8" and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"model.quantize=int8 needs torchao, which is not installed: {QUANTIZE_INSTALL}, "
                          "or model.quantize=none")


def quantize_int8(model: Any) -> int:
    """Quantize the model's linear layers in place (int8 weights, dynamic int8 activations); returns how many."""
    import torch

    try:
        with _quiet("torchao"), _quiet("torch.utils._pytree"):
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise ConfigError(f"model.quantize=int8 needs torchao: {QUANTIZE_INSTALL}, or model.quantize=none") from None
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        # tied: the LM head gets its own tensor, so the embedding lookup keeps the float table
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    count = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, name: isinstance(m, torch.nn.Linear))
    return count


def is_plain_float(weight: Any) -> bool:
    """A plain floating-point tensor (not a quantized tensor subclass): one that W + AB can be written into."""
    import torch

    return type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.is_floating_point()


def dequantized(weight: Any) -> Any:
    """The float values a (possibly quantized) weight stands for."""
    return weight.dequantize() if not is_plain_float(weight) and hasattr(weight, "dequantize") else weight


def weight_bytes(model: Any) -> int:
    """Bytes of the weights as stored (an int8 tensor counts its int8 data and its scales)."""
    total = 0
    seen = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += _tensor_bytes(param)
    return total


def _tensor_bytes(tensor: Any) -> int:
    if is_plain_float(tensor) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(tensor, name)) for name in names)


def quiet_torchao_import() -> None:
    """When torchao is installed (the optional `quantize` extra), transformers imports it with its modeling code
    (transformers.modeling_utils -> quantizers), and torchao logs warnings about GPU kernel libraries a CPU machine
    lacks (plus torch's pytree deprecations). Do that import first, quietly; a no-op without torchao."""
    import importlib.util
    import sys

    if "torchao" not in sys.modules and importlib.util.find_spec("torchao") is not None:
        with _quiet("torchao"), _quiet("torch.utils._pytree"):
            import torchao  # noqa: F401
            import transformers.modeling_utils  # noqa: F401


@contextlib.contextmanager
def _quiet(name: str):
    """torchao logs a warning per optional GPU kernel library it cannot load on a CPU-only machine."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
