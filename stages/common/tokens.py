"""Token ids of text that may hold untrusted text (program text, file names, the question): the one place in
`stages/` that calls a tokenizer (tests/test_special_tokens.py keeps it so).

A tokenizer parses its special tokens out of any text it is given, so a docstring or a question holding
`<|im_start|>`, `<|endoftext|>` or `[SEP]` would become a real control token (a forged chat turn, an early end of
text). Here every text is data: its special tokens are split into plain text. Only a chat template's own markers
are real special tokens (`encode_chat`). For text holding no special token the ids are the tokenizer's own
(`tokenizer(text, add_special_tokens=False)`, `apply_chat_template(..., tokenize=True)`), so ordinary prompts keep
their ids.
"""
from __future__ import annotations

import re
from typing import Any

from pipeline.engine.errors import ConfigError


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """The ids of ``text`` as data: no special token parsed from it, none added around it."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`encode_text` of each text, in one batched call."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_padded(tokenizer: Any, texts: list[str], max_tokens: int) -> Any:
    """A sentence encoder's batch: each text as data between the encoder's own framing tokens (`[CLS] … [SEP]`),
    cut at ``max_tokens``, padded, as torch tensors (``input_ids``, ``attention_mask``, …)."""
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt",
                     split_special_tokens=True)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], reply: str = "") -> tuple[str, list[int]]:
    """The chat-template text of ``messages`` with the generation prompt (then ``reply``, text the reply starts
    with), and its ids: the template's own special tokens real, every message content and ``reply`` data.

    The template is rendered with a placeholder per content, so what the template itself writes is known. Its
    special tokens cut the text into runs; each run (template text and contents together) is tokenized as data.
    A special token is a hard boundary for the tokenizer too, so for contents without special tokens the ids
    equal the tokenizer's ids of the whole text.
    """
    marks = [f"\uE000pca{i}\uE001" for i in range(len(messages))]
    rendered = tokenizer.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                             tokenize=False, add_generation_prompt=True)
    pieces: list[tuple[bool, str]] = []  # (written by the template, text)
    cursor = 0
    for message, mark in zip(messages, marks):
        at = rendered.find(mark, cursor)
        if at < 0:
            raise ConfigError("the model's chat template changes message contents; cannot keep program text as data")
        pieces += [(True, rendered[cursor:at]), (False, message["content"])]
        cursor = at + len(mark)
    pieces += [(True, rendered[cursor:]), (False, reply)]
    return "".join(text for _, text in pieces), _encode_runs(tokenizer, pieces)


def _encode_runs(tokenizer: Any, pieces: list[tuple[bool, str]]) -> list[int]:
    specials = {t.content: (i, t) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    marker = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
    ids: list[int] = []
    run, strip_start = "", False
    for trusted, text in pieces:
        at = 0
        for found in (marker.finditer(text) if trusted and marker else ()):
            token_id, token = specials[found.group()]
            run += text[at:found.start()]
            run = run.lstrip() if strip_start else run
            ids += encode_text(tokenizer, run.rstrip() if token.lstrip else run)  # what the tokenizer strips, we strip
            ids.append(token_id)
            run, strip_start, at = "", bool(token.rstrip), found.end()
        run += text[at:]
    return ids + encode_text(tokenizer, run.lstrip() if strip_start else run)
