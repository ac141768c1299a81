"""A KV cache that grows into reserved room instead of concatenating.

transformers' `DynamicLayer` appends a token with `torch.cat`: every decoded token copies the whole cache of every
layer into a fresh tensor one position longer (48 MiB a token after a 2,134-token prompt in bfloat16: read, written
and freed again). `ReservedLayer` keeps each layer's keys and values in a buffer with room for `room` more positions
and writes new ones in place; `keys`/`values` are views of the filled part, so attention reads the same values (the
same answers, tested). A buffer that is full is replaced by one with room again (the old one copied once). Cropping
(candidate scoring, `stages/common/generation/continuations.py`) is transformers' own: it slices the views, which
stay views of the buffers.
"""
from __future__ import annotations

import functools
from typing import Any

ROOM = 256  # positions reserved after the filled part: a default answer's decode (<= 256 new tokens) never regrows


def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views into buffers with spare positions."""

        def __init__(self, room: int = ROOM, **kwargs):
            super().__init__(**kwargs)
            self.room = room
            self._keys: Any = None  # the buffers; keys/values are views of their filled positions
            self._values: Any = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.get_seq_length()  # the views' length (cropping shortens them: DynamicLayer.crop slices)
            end = start + key_states.shape[-2]
            if self._keys is None or end > self._keys.shape[-2]:
                self._keys = self._grown(self._keys, key_states, start, end)
                self._values = self._grown(self._values, value_states, start, end)
            self._keys[..., start:end, :] = key_states
            self._values[..., start:end, :] = value_states
            self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
            return self.keys, self.values

        def _grown(self, buffer, states, filled: int, needed: int):
            import torch

            shape = (*states.shape[:-2], needed + self.room, states.shape[-1])
            grown = torch.empty(shape, dtype=states.dtype, device=states.device)
            if filled:
                grown[..., :filled, :] = buffer[..., :filled, :]
            return grown

        def reset(self) -> None:
            self._keys = self._values = None
            super().reset()

        def _rebased(self) -> None:
            """After an operation that replaced ``keys``/``values`` (beam reordering, batch repeat/select): own them."""
            self.keys, self.values = self._keys, self._values = self.keys.contiguous(), self.values.contiguous()

        def reorder_cache(self, beam_idx) -> None:
            super().reorder_cache(beam_idx)
            self._rebased()

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._rebased()

        def batch_select_indices(self, indices) -> None:
            super().batch_select_indices(indices)
            self._rebased()

    return ReservedLayer


@functools.lru_cache(maxsize=1)
def reserved_layer_class():
    """The `ReservedLayer` class (made on first use: importing transformers' cache module is not free)."""
    return _reserved_layer_class()


def reserved_cache(model, room: int = ROOM) -> Any:
    """An empty `DynamicCache` for ``model`` whose full-attention layers are `ReservedLayer`s (sliding-window and
    other layer kinds keep transformers' own)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    layer = reserved_layer_class()
    cache.layers = [layer(room) if type(old) is DynamicLayer else old for old in cache.layers]
    return cache
