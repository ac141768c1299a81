"""Grounded decoding: what the model may write inside a citation or a lead slot (SPEC §5 grounded decoding).

A `TokenTrie` holds token-id sequences, each spelling one allowed string (a packed window's `path:A-B]`, or a
lead `` `name` [path:A-B] ``). `GroundingProcessor`, a transformers `LogitsProcessor`, applies them inside
`generate`:

- lead: the reply starts with one of the lead strings (the model picks which, token by token);
- citations: outside code, after the model opens a citation with `[` at the start of a word, the next tokens
  may only spell one of the allowed `path:A-B]` strings; the closing `]` ends the citation.

Only the constrained rows change: everywhere else the scores pass through untouched, so end of sequence stays
reachable outside a citation, and inside one the allowed set is the trie's children, never empty (every string
ends at a leaf, and a leaf ends the constrained phase). Masked tokens get -inf; the processor must run before
temperature/top-p so that sampling only ever sees allowed tokens (stages/decode.py orders them so).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

END = -1


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
        The strings must be prefix-free (ours all end with a closing marker), so a leaf is unambiguous."""
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


@dataclasses.dataclass
class _Row:
    """Where one sequence of the batch stands: consumed tokens, lead/citation trie node, code state."""

    consumed: int = 0
    node: dict | None = None  # current trie node while constrained
    text_tail: str = ""  # the last few characters (to see where a `[` stands)
    backticks: int = 0  # inline-code parity outside fences
    fences: int = 0  # ``` parity
    citations: int = 0  # citations completed under the constraint
    lead_done: bool = False


class GroundingProcessor:
    """A `LogitsProcessor`: lead slot first (when given), then citations constrained wherever they open."""

    def __init__(self, tokenizer, prompt_length: int, citations: TokenTrie, lead: TokenTrie | None = None,
                 opener: str = "["):
        self.texts = token_texts(tokenizer)
        self.prompt_length, self.citations, self.lead = prompt_length, citations, lead
        self.opener = opener
        self.rows: list[_Row] = []
        self.events: list[str] = []  # what the constraint did, for telemetry

    def update(self, input_ids) -> None:
        """Consume the tokens generated since the last call (generate calls us before each new token, so after
        it returns, call this once more with its output to count a citation closed by the very last token)."""
        if not self.rows:
            self.rows = [_Row(node=self.lead.root if self.lead else None, lead_done=not self.lead)
                         for _ in range(input_ids.shape[0])]
        for b, row in enumerate(self.rows):
            generated = input_ids[b, self.prompt_length:].tolist()
            for token in generated[row.consumed:]:
                self._consume(row, token)
            row.consumed = len(generated)

    def __call__(self, input_ids, scores):
        import torch

        self.update(input_ids)
        for b, row in enumerate(self.rows):
            if row.node is not None:
                allowed = [t for t in row.node if t != END]
                mask = torch.full_like(scores[b], float("-inf"))
                mask[allowed] = 0.0
                scores[b] = scores[b] + mask
        return scores

    def _consume(self, row: _Row, token: int) -> None:
        text = self.texts[token] if 0 <= token < len(self.texts) else ""
        if row.node is not None:  # constrained: follow the trie
            row.node = row.node.get(token)
            if row.node is None:  # cannot happen while the mask is applied; be safe: release
                self.events.append("left the trie")
            elif END in row.node and len(row.node) == 1:
                row.node = None
                if row.lead_done:
                    row.citations += 1
                else:
                    row.lead_done = True
            row.text_tail = (row.text_tail + text)[-8:]
            return
        before = row.text_tail
        row.text_tail = (row.text_tail + text)[-8:]
        fences = text.count("```")
        row.fences += fences
        if row.fences % 2 == 0:
            row.backticks += text.count("`") - 3 * fences
        if row.fences % 2 or row.backticks % 2 or not self.citations:
            return
        if text.endswith(self.opener):
            prev = (before + text[: -len(self.opener)])[-1:]  # the character before the opener ('' at the start)
            if prev == "" or prev.isspace() or prev == "(":
                row.node = self.citations.root

    @property
    def constrained_citations(self) -> int:
        return sum(row.citations for row in self.rows)
