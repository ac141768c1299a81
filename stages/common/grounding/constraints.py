"""Grounded decoding: what the model may write in a lead slot, a citation or inline code (docs/behaviour.md §5).

A `TokenTrie` holds token-id sequences, each spelling one allowed string (a packed window's `path:A-B]`, an
identifier of the evidence followed by its closing backtick, or a lead `` `name` [path:A-B] ``).
`GroundingProcessor`, a transformers `LogitsProcessor`, applies them inside `generate`:

- lead: the reply starts with one of the lead strings (the model picks which, token by token);
- slots: when the model opens a slot — `[` at the start of a word opens a citation, a backtick opens inline
  code — the next tokens may only spell one of that slot's strings; the string's closing character ends it;
- outside slots, tokens that would open a slot in the middle of a token (`['`, `` `. ``, a code fence) are
  masked, so every citation or inline name goes through its slot.
- outside slots, with a `QuoteGuard` (stages/common/grounding/quoteguard.py), a line that starts as Python code must stay a
  prefix of a line of the evidence.

Everything else passes through untouched, so end of sequence stays reachable outside a slot; inside one the
allowed set is the trie's children, never empty (every string ends at a leaf, and a leaf closes the slot).
Masked tokens get -inf; the processor runs before temperature/top-k/top-p (stages/common/generation/processors.py
orders them) so sampling only ever sees allowed tokens.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from stages.common.grounding.labels import LABEL_NAME
from stages.common.grounding.quoteguard import QuoteGuard
from stages.common.tokens import encode_texts

END = -1
CITATION_OPENER, CODE_OPENER = "[", "`"
LABEL_CHARS = 200  # how far back a `name` label before a citation opener is read
_LABEL_BEFORE = re.compile(rf"`({LABEL_NAME.pattern})`\s*$")  # the label `labels.LABELLED` judges, at the end


def label_before(text: str) -> str:
    """The `name` that ``text`` ends with (spaces after it allowed), '' if none: the label of a citation opened next."""
    if not text.rstrip().endswith(CODE_OPENER):  # the common case, without a regex search over the whole text
        return ""
    match = _LABEL_BEFORE.search(text)
    return match.group(1) if match else ""


class TokenTrie:
    """Token-id sequences as nested dicts; ``END`` marks a complete sequence."""

    def __init__(self, sequences: Iterable[list[int]]):
        self.root: dict = {}
        self.size = 0
        for seq in sequences:
            if not seq:
                continue
            node = self.root
            for token in seq:
                node = node.setdefault(token, {})
            if END not in node:
                node[END] = True
                self.size += 1

    @classmethod
    def of_strings(cls, tokenizer, strings: Iterable[str]) -> TokenTrie:
        """Each string tokenized on its own (byte-level BPE: the ids decode back to exactly the string).
        The strings must be prefix-free (ours all end with a closing character), so a leaf is unambiguous."""
        strings = sorted(set(strings))
        if not strings:
            return cls([])
        return cls(encode_texts(tokenizer, strings))

    def __bool__(self) -> bool:
        return bool(self.root)


def token_texts(tokenizer) -> list[str]:
    """The decoded text of every token id (cached on the tokenizer: ~50k decodes, once per process)."""
    cached = getattr(tokenizer, "_pca_token_texts", None)
    if cached is None or len(cached) != len(tokenizer):
        cached = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        try:
            tokenizer._pca_token_texts = cached
        except AttributeError:  # a tokenizer that refuses attributes: decode again next time
            pass
    return cached


def sneaky_tokens(texts: list[str], openers: Iterable[str]) -> list[int]:
    """Tokens that would open a slot without ending on its opener (`['`, `` `. ``, ```` ``` ````): masked outside
    slots, so that every slot is opened by a token that ends on the opener, where the constraint takes over."""
    openers = tuple(openers)
    return [i for i, text in enumerate(texts)
            if any(ch in text[:-1] for ch in openers) or text.endswith(CODE_OPENER * 2)]


@dataclasses.dataclass
class _Row:
    """Where one sequence of the batch stands."""

    consumed: int = 0
    node: dict | None = None  # current trie node while inside the lead or a slot
    slot: str = ""  # the opener of the open slot ('' for the lead)
    tail: str = ""  # the last characters written (to see what stands before an opener)
    word: str = ""  # the identifier characters written since the last other character
    line: str = ""  # the text written since the last newline (the quote guard's line)
    code_block: bool = False  # the line before `line` was held by the quote guard (a code block goes on)
    recent: str = ""  # the last characters written (to read a `name` label before a citation opener)
    run: int = 0  # citations closed since the last text other than whitespace (a run of citations)
    lead_done: bool = False
    completed: dict[str, int] = dataclasses.field(default_factory=dict)  # opener -> slots closed


class GroundingProcessor:
    """A `LogitsProcessor`: the lead slot first (when given), then slots wherever the model opens one."""

    def __init__(self, tokenizer, prompt_length: int, slots: dict[str, TokenTrie], lead: TokenTrie | None = None,
                 known_words: Iterable[str] | None = None, quotes: QuoteGuard | None = None, before: str = "",
                 labels: dict[str, list[str]] | None = None, max_citation_run: int | None = None):
        self.texts = token_texts(tokenizer)
        self.tokenizer = tokenizer
        self.prompt_length, self.lead = prompt_length, lead
        self.slots = {opener: trie for opener, trie in slots.items() if trie}
        self.masked = sneaky_tokens(self.texts, self.slots) if self.slots else []
        # outside slots, words written like code must be names of the evidence (None: prose is free)
        self.guard = WordGuard(tokenizer, self.texts, known_words) if known_words is not None else None
        # outside slots, a line written as code must stay a prefix of an evidence line (None: code is free)
        self.quotes = quotes if quotes else None
        if self.quotes is not None:
            self.quotes.cites = CITATION_OPENER in self.slots
        self.before = before.rsplit("\n", 1)[-1]  # the reply's line before the first generated token
        # a citation opened right after `name` (a definition) may only name a span where it starts (None: any span)
        self.labels = labels if labels is not None and CITATION_OPENER in self.slots else None
        self.label_tries: dict[str, TokenTrie] = {}
        # at most this many citations in a row (only whitespace between): then no citation opens until other text
        self.max_run = max_citation_run if CITATION_OPENER in self.slots else None
        self.openers = ([i for i, text in enumerate(self.texts) if text.endswith(CITATION_OPENER)]
                        if self.labels is not None or self.max_run is not None else [])
        self.rows: list[_Row] = []
        self._indices: dict[int, tuple[list[int], Any]] = {}  # id(list) -> (the list, its index tensor)

    def update(self, input_ids) -> None:
        """Consume the tokens generated since the last call (generate calls us before each new token, so after
        it returns, call this once more with its output to count a slot closed by the very last token)."""
        if not self.rows:
            self.rows = [_Row(node=self.lead.root if self.lead else None, lead_done=not self.lead, line=self.before,
                              recent=self.before[-LABEL_CHARS:])
                         for _ in range(input_ids.shape[0])]
        for b, row in enumerate(self.rows):
            generated = input_ids[b, self.prompt_length:].tolist()
            for token in generated[row.consumed:]:
                self._consume(row, token)
            row.consumed = len(generated)

    def __call__(self, input_ids, scores):
        self.update(input_ids)
        for b, row in enumerate(self.rows):
            if row.node is not None:
                allowed = [t for t in row.node if t != END]
                keep = scores[b, allowed].clone()
                scores[b] = float("-inf")
                scores[b, allowed] = keep
                continue
            if self.masked:
                scores[b, self._index(self.masked, scores.device)] = float("-inf")
            if self.guard is not None:
                bad = self.guard.bad(row.word)
                if bad:
                    scores[b, self._index(bad, scores.device)] = float("-inf")
            if (self.labels is not None and self.labels.get(label_before(row.recent), True) == []  # no span defines it
                    or self.max_run is not None and row.run >= self.max_run):  # a run of citations is long enough
                scores[b, self._index(self.openers, scores.device)] = float("-inf")
            if self.quotes is not None:
                self.quotes.apply(scores[b], row.line, row.code_block)
        return scores

    def _index(self, ids: list[int], device):
        """``ids`` as an index tensor, made once per list object (the guard caches its lists, and the entry holds the
        list, so its id stays its own); a list of thousands of ids would otherwise be converted at every step."""
        import torch

        key = id(ids)
        hit = self._indices.get(key)
        if hit is None:
            if len(self._indices) > 4096:
                self._indices.clear()
            hit = self._indices[key] = (ids, torch.tensor(ids, dtype=torch.long, device=device))
        return hit[1]

    def _consume(self, row: _Row, token: int) -> None:
        text = self.texts[token] if 0 <= token < len(self.texts) else ""
        before, row.tail = row.tail, (row.tail + text)[-8:]
        recent, row.recent = row.recent, (row.recent + text)[-LABEL_CHARS:]
        *done, row.line = (row.line + text).split("\n")
        if self.quotes is not None:
            for line in done:
                row.code_block = self.quotes.ends_block(line, row.code_block)
        row.word = row.word + text if text and all(ch in _WORD_CHARS for ch in text) else _trailing_word(text)
        if row.node is not None:  # inside the lead or a slot: follow the trie
            row.node = row.node.get(token)
            if row.node is not None and not (END in row.node and len(row.node) == 1):
                return
            if row.lead_done:
                row.completed[row.slot] = row.completed.get(row.slot, 0) + (row.node is not None)
                row.run += row.slot == CITATION_OPENER
            row.lead_done, row.node = True, None  # a token off the trie (impossible under the mask) also frees
            return
        if text.strip() and not (text.endswith(CITATION_OPENER) and CITATION_OPENER in self.slots):
            row.run = 0  # other text ends a run of citations (an opener does not: it starts the next one)
        for opener, trie in self.slots.items():
            if text.endswith(opener):
                prev = (before + text[: -len(opener)])[-1:]  # the character before the opener ('' at the start)
                if opener != CITATION_OPENER or prev == "" or prev.isspace() or prev == "(":
                    row.node, row.slot = self._citation_trie(recent + text[: -len(opener)], trie).root, opener
                return

    def _citation_trie(self, before: str, trie: TokenTrie) -> TokenTrie:
        """The citations allowed after ``before``: after a `name` label, the spans where that definition starts."""
        name = label_before(before)
        spans = self.labels.get(name) if self.labels is not None else None
        if not spans:
            return trie
        hit = self.label_tries.get(name)
        if hit is None:  # made when first needed: the prompt knows hundreds of names, an answer labels a few
            hit = self.label_tries[name] = TokenTrie.of_strings(self.tokenizer, [f"{span}]" for span in spans])
        return hit

    def completed(self, opener: str) -> int:
        return sum(row.completed.get(opener, 0) for row in self.rows)


_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


@dataclasses.dataclass
class _TokenWords:
    """How each token's text splits into identifier characters: the part that continues the word being written
    (`lead`), whether a non-identifier character follows (`breaks`); and, for the code-like words only, those it
    holds whole (`inner`), the one it starts at its end (`trail`), and its lead when code-like on its own."""

    lead: list[str]
    breaks: list[bool]
    inner: list[tuple[int, str]]
    trail: list[tuple[int, str]]
    lead_alone: list[tuple[int, str]]
    by_shape: dict = dataclasses.field(default_factory=dict)  # word shape -> tokens making it code-like


def token_words(tokenizer, texts: list[str]) -> _TokenWords:
    """The split of every token (cached on the tokenizer, computed once per process)."""
    from stages.common.grounding.identifiers import CODE_SHAPE

    cached = getattr(tokenizer, "_pca_token_words", None)
    if cached is not None and len(cached.lead) == len(texts):
        return cached
    lead, breaks, inner, trail, alone = [], [], [], [], []
    code_like = lambda word: bool(word) and CODE_SHAPE.fullmatch(word) is not None  # noqa: E731
    for i, text in enumerate(texts):
        n = 0
        while n < len(text) and text[n] in _WORD_CHARS:
            n += 1
        lead.append(text[:n])
        breaks.append(n < len(text))
        if code_like(text[:n]):
            alone.append((i, text[:n]))
        current = ""
        for ch in text[n:]:
            if ch in _WORD_CHARS:
                current += ch
                continue
            if code_like(current):
                inner.append((i, current))
            current = ""
        if n < len(text) and code_like(current):
            trail.append((i, current))
    cached = _TokenWords(lead, breaks, inner, trail, alone)
    try:
        tokenizer._pca_token_words = cached
    except AttributeError:
        pass
    return cached


def _trailing_word(text: str) -> str:
    n = len(text)
    while n > 0 and text[n - 1] in _WORD_CHARS:
        n -= 1
    return text[n:]


def _shape(word: str) -> str:
    """``word`` as character classes (a: lower, A: upper, 0: digit, _), every run cut to two: the code-shape patterns
    only see classes and count runs up to two, so a word and its shape extend into code-like words alike."""
    out, run_class, run = [], None, 0
    for ch in word:
        cls = "a" if ch.islower() else "A" if ch.isupper() else "0" if ch.isdigit() else ch
        run = run + 1 if cls == run_class else 1
        run_class = cls
        if run <= 2:
            out.append(cls)
    return "".join(out)


class WordGuard:
    """Outside slots, a word written like code (snake_case, camelCase, an inner capital) must be one of ``known``:
    while such a word is being written it must stay a prefix of a known name, and it may end only as a whole one.
    Words that look like prose pass untouched. ``bad(word)`` lists the token ids to mask after ``word``."""

    def __init__(self, tokenizer, texts: list[str], known: Iterable[str]):
        from stages.common.grounding.identifiers import CODE_SHAPE

        self.shape = CODE_SHAPE
        self.words = token_words(tokenizer, texts)
        self.known = {part for name in known for part in name.split(".") if part}
        self.prefixes = {name[:i] for name in self.known for i in range(1, len(name) + 1)}
        self.trie: dict = {}
        for name in self.known:
            node = self.trie
            for ch in name:
                node = node.setdefault(ch, {})
            node[""] = True
        lead, breaks = self.words.lead, self.words.breaks
        self.by_lead: dict[str, list[int]] = {}
        for i, part in enumerate(lead):
            if part:
                self.by_lead.setdefault(part, []).append(i)
        self.longest = max((len(part) for part in self.by_lead), default=0)
        self.continuing = [i for i, part in enumerate(lead) if part]
        self.lead_shapes: dict[str, list[int]] = {}
        for i in self.continuing:
            self.lead_shapes.setdefault(_shape(lead[i]), []).append(i)
        self.opening = set(i for i, part in enumerate(lead) if not part)  # tokens that end the word being written
        # whatever the word being written: a token holding a whole unknown code-like word, or starting one
        self.static = ({i for i, w in self.words.inner if w not in self.known}
                       | {i for i, w in self.words.trail if w not in self.prefixes})
        # between words, a token's lead starts a word of its own
        self.fresh = sorted(self.static | {i for i, w in self.words.lead_alone
                                           if w not in (self.known if breaks[i] else self.prefixes)})
        self.cache: dict[str, list[int]] = {}

    def code_like(self, word: str) -> bool:
        return bool(word) and self.shape.fullmatch(word) is not None

    def unknown_word(self, word: str) -> bool:
        return self.code_like(word) and word not in self.known

    def unknown_prefix(self, word: str) -> bool:
        return self.code_like(word) and word not in self.prefixes

    def code_like_after(self, word: str) -> set[int]:
        """Tokens that make ``word`` + their lead code-like (the same for every word of one shape, and for every token
        of one lead shape: a run-on word of a long generation costs one pattern match per lead shape, not per token)."""
        shape = _shape(word)
        by_shape = self.words.by_shape
        hit = by_shape.get(shape)
        if hit is None:
            if len(by_shape) > 4096:  # a long run of new shapes (garbage words) must not grow it without bound
                by_shape.clear()
            hit = by_shape[shape] = {i for lead, ids in self.lead_shapes.items()
                                     if self.code_like(_shape(shape + lead)) for i in ids}
        return hit

    def known_after(self, word: str) -> set[int]:
        """Tokens whose lead keeps ``word`` a prefix of a known name (or, if the token ends the word, a known name)."""
        node: Any = self.trie  # a nested dict: char -> child ("" -> the token ids that end there)
        for ch in word:
            node = node.get(ch)
            if node is None:
                return set()
        found, stack = set(), [(node, "")]
        while stack:
            node, path = stack.pop()
            for ch, child in node.items():
                if not ch:
                    continue
                grown = path + ch
                for i in self.by_lead.get(grown, ()):
                    if not self.words.breaks[i] or "" in child:
                        found.add(i)
                if len(grown) < self.longest:
                    stack.append((child, grown))
        return found

    def bad(self, word: str) -> list[int]:
        """Token ids to mask when ``word`` is the identifier being written ('' between words)."""
        if not word:
            return self.fresh
        hit = self.cache.get(word)
        if hit is None:
            bad = self.static | (self.code_like_after(word) - self.known_after(word))
            if self.unknown_word(word):  # the word so far may not end here
                bad |= self.opening
            hit = self.cache[word] = sorted(bad)
            if len(self.cache) > 4096:
                self.cache.clear()
        return hit
