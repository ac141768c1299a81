"""Grounded decoding: what the model may write in a lead slot, a citation or inline code (SPEC §5).

A `TokenTrie` holds token-id sequences, each spelling one allowed string (a packed window's `path:A-B]`, an
identifier of the evidence followed by its closing backtick, or a lead `` `name` [path:A-B] ``).
`GroundingProcessor`, a transformers `LogitsProcessor`, applies them inside `generate`:

- lead: the reply starts with one of the lead strings (the model picks which, token by token);
- slots: when the model opens a slot — `[` at the start of a word opens a citation, a backtick opens inline
  code — the next tokens may only spell one of that slot's strings; the string's closing character ends it;
- outside slots, tokens that would open a slot in the middle of a token (`['`, `` `. ``, a code fence) are
  masked, so every citation or inline name goes through its slot.

Everything else passes through untouched, so end of sequence stays reachable outside a slot; inside one the
allowed set is the trie's children, never empty (every string ends at a leaf, and a leaf closes the slot).
Masked tokens get -inf; the processor runs before temperature/top-k/top-p (stages/decode.py orders them) so
sampling only ever sees allowed tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

END = -1
CITATION_OPENER, CODE_OPENER = "[", "`"


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
    def of_strings(cls, tokenizer, strings: Iterable[str]) -> "TokenTrie":
        """Each string tokenized on its own (byte-level BPE: the ids decode back to exactly the string).
        The strings must be prefix-free (ours all end with a closing character), so a leaf is unambiguous."""
        strings = sorted(set(strings))
        if not strings:
            return cls([])
        encoded = tokenizer(strings, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return cls(encoded)

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
    lead_done: bool = False
    completed: dict[str, int] = dataclasses.field(default_factory=dict)  # opener -> slots closed


class GroundingProcessor:
    """A `LogitsProcessor`: the lead slot first (when given), then slots wherever the model opens one."""

    def __init__(self, tokenizer, prompt_length: int, slots: dict[str, TokenTrie], lead: TokenTrie | None = None):
        self.texts = token_texts(tokenizer)
        self.prompt_length, self.lead = prompt_length, lead
        self.slots = {opener: trie for opener, trie in slots.items() if trie}
        self.masked = sneaky_tokens(self.texts, self.slots) if self.slots else []
        self.rows: list[_Row] = []

    def update(self, input_ids) -> None:
        """Consume the tokens generated since the last call (generate calls us before each new token, so after
        it returns, call this once more with its output to count a slot closed by the very last token)."""
        if not self.rows:
            self.rows = [_Row(node=self.lead.root if self.lead else None, lead_done=not self.lead)
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
            elif self.masked:
                scores[b, self.masked] = float("-inf")
        return scores

    def _consume(self, row: _Row, token: int) -> None:
        text = self.texts[token] if 0 <= token < len(self.texts) else ""
        before, row.tail = row.tail, (row.tail + text)[-8:]
        if row.node is not None:  # inside the lead or a slot: follow the trie
            row.node = row.node.get(token)
            if row.node is not None and not (END in row.node and len(row.node) == 1):
                return
            if row.lead_done:
                row.completed[row.slot] = row.completed.get(row.slot, 0) + (row.node is not None)
            row.lead_done, row.node = True, None  # a token off the trie (impossible under the mask) also frees
            return
        for opener, trie in self.slots.items():
            if text.endswith(opener):
                prev = (before + text[: -len(opener)])[-1:]  # the character before the opener ('' at the start)
                if opener != CITATION_OPENER or prev == "" or prev.isspace() or prev == "(":
                    row.node, row.slot = trie.root, opener
                return

    def completed(self, opener: str) -> int:
        return sum(row.completed.get(opener, 0) for row in self.rows)
