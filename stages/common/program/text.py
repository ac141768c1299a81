"""Tokens for matching prompts against code: identifiers split on snake/camel case, lower-cased."""
from __future__ import annotations

import re

STOP_WORDS = frozenset(
    """a an and are as at be by can could do does did for from has have how i if in into is it its
    me my of on or our so than that the their them then there these this those to was we what when where
    which who why will with would you your code program file files function functions method class
    please tell explain show about use used using work works defined define""".split()
)

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def split_identifier(word: str) -> list[str]:
    parts: list[str] = []
    for piece in word.split("_"):
        parts.extend(p.lower() for p in _CAMEL.findall(piece))
    return [p for p in parts if p]


def words(text: str) -> list[str]:
    """The identifiers and numbers of ``text``, as written: what `tokens` splits, one word at a time."""
    return _WORD.findall(text)


def tokens(text: str, keep_stop_words: bool = False) -> list[str]:
    """Lower-cased sub-tokens of every identifier/word in ``text`` (plus the whole identifier when split)."""
    out: list[str] = []
    for word in words(text):
        parts = split_identifier(word)
        low = word.lower()
        if len(parts) > 1 and low.strip("_"):
            out.append(low.strip("_"))
        out.extend(parts)
    if keep_stop_words:
        return [t for t in out if len(t) > 1]
    return [t for t in out if len(t) > 1 and t not in STOP_WORDS]


def token_set(text: str) -> set[str]:
    return set(tokens(text))
