"""The program's own text as language-model pieces (docs/behaviour.md §4b), with two stable held-out splits.

Windows of a file can overlap (the head window and the first defs), so they are first made disjoint: each
window keeps only lines no earlier window took. Each disjoint segment is tokenized and cut into `seq_len`
token pieces. Two things are never trained on:

- held-out segments of trained files: a segment is held out when a stable hash of `(path, start)` is 0 modulo
  `val_every`, so a held-out piece never shares a line with a training piece (in-program generalisation);
- held-out files (`held_out_files`, a share of the program's tokens): whole files taken in the order of a stable
  hash of their path until that share is reached, a file that alone would pass twice the share being skipped
  (generalisation to code the adapter never saw).

Both splits are a pure function of the index, the tokenizer and these knobs, so the synthesizer that trains and
the perplexity stage that scores compute the same ones (`split`).
"""
from __future__ import annotations

import dataclasses

from stages.common.adapters.embedding import stable_hash
from stages.common.tokens import encode_text
from stages.common.types import ProgramIndex

Span = tuple[str, int, int]  # path, first line, last line


@dataclasses.dataclass(frozen=True)
class Piece:
    path: str
    start: int  # first line of the segment the piece comes from
    end: int
    offset: int  # index of the piece within its segment
    ids: tuple[int, ...]
    sources: tuple[Span, ...] = ()  # every segment a packed piece draws on (empty: just path:start-end)

    def spans(self) -> tuple[Span, ...]:
        return self.sources or ((self.path, self.start, self.end),)


@dataclasses.dataclass
class Corpus:
    """The program's text split three ways; only `train` is ever trained on."""

    train: list[Piece]
    held_out: list[Piece]  # held-out segments of trained files
    held_out_files: list[Piece]  # pieces of whole files never trained on
    files: tuple[str, ...]  # the held-out files
    train_segments: list[tuple[str, int, int, list[int]]] = dataclasses.field(default_factory=list, repr=False)

    def evaluation(self, limit: int) -> dict[str, list[Piece]]:
        """The pieces every perplexity figure is computed on: at most `limit` of each split, evenly spread."""
        return {"held_out": spread(self.held_out, limit), "held_out_files": spread(self.held_out_files, limit)}


def segments(index: ProgramIndex) -> list[Span]:
    out = []
    for path in sorted(index.files):
        covered = 0
        for window in sorted(index.windows_of(path), key=lambda w: (w.start, -w.end)):
            start = max(window.start, covered + 1)
            if start <= window.end:
                out.append((path, start, window.end))
                covered = window.end
    return out


def spread(items: list, limit: int) -> list:
    """At most `limit` items taken evenly over the list (all of them when there are fewer)."""
    if len(items) <= limit:
        return list(items)
    return [items[(i * len(items)) // limit] for i in range(limit)]


def choose_held_out_files(tokens: dict[str, int], share: float, seed: int) -> tuple[str, ...]:
    """Whole files, in stable-hash order, until `share` of the tokens is held out (never more than twice it)."""
    if share <= 0:
        return ()
    total = sum(tokens.values())
    goal, chosen, held = share * total, [], 0
    for path in sorted((p for p, n in tokens.items() if n), key=lambda p: (stable_hash(f"held-out-file:{p}", seed), p)):
        if held >= goal:
            break
        if held + tokens[path] > 2 * goal:
            continue
        chosen.append(path)
        held += tokens[path]
    return tuple(sorted(chosen))


def _cut(ids: list[int], seq_len: int, min_tokens: int) -> list[list[int]]:
    return [ids[pos : pos + seq_len] for pos in range(0, len(ids), seq_len) if len(ids[pos : pos + seq_len]) >= min_tokens]


def split(index: ProgramIndex, tokenizer, seq_len: int, val_every: int, held_out_files: float = 0.0, seed: int = 0,
          min_tokens: int = 16) -> Corpus:
    """Every segment tokenized and assigned to train, held-out segments or held-out files (see the module doc)."""
    tokenized = []
    for path, start, end in segments(index):
        text = "\n".join(index.lines(path)[start - 1 : end])
        tokenized.append((path, start, end, encode_text(tokenizer, text)))
    tokens: dict[str, int] = {}
    for path, _, _, ids in tokenized:
        tokens[path] = tokens.get(path, 0) + len(ids)
    files = choose_held_out_files(tokens, held_out_files, seed)
    train: list[Piece] = []
    held_out: list[Piece] = []
    unseen: list[Piece] = []
    train_segments = []
    for path, start, end, ids in tokenized:
        if path in files:
            bucket = unseen
        elif val_every > 0 and stable_hash(f"{path}:{start}", seed) % val_every == 0:
            bucket = held_out
        else:
            bucket = train
            train_segments.append((path, start, end, ids))
        bucket.extend(Piece(path, start, end, offset, tuple(chunk))
                      for offset, chunk in enumerate(_cut(ids, seq_len, min_tokens)))
    return Corpus(train, held_out, unseen, files, train_segments)


def summary_lines(index: ProgramIndex, path: str, spans: list[tuple[int, int]]) -> list[str]:
    """One synthetic line per definition inside the trained spans of `path`: "`path` defines `sig`: doc"."""
    out = []
    for sym in index.symbols_in(path):
        if not sym.is_definition or not any(a <= sym.start <= b for a, b in spans):
            continue
        signature = sym.signature
        if sym.kind == "method" and signature.startswith(sym.name):
            signature = sym.qualname + signature[len(sym.name):]
        out.append(f"`{path}` defines `{signature}`" + (f": {sym.doc}" if sym.doc else ""))
    return out


def training_pieces(corpus: Corpus, index: ProgramIndex, tokenizer, seq_len: int, layout: str = "segments",
                    summaries: bool = False, min_tokens: int = 16) -> list[Piece]:
    """What the synthesizer trains on, built only from the trained segments.

    `segments`: each segment cut on its own (many pieces shorter than `seq_len`, padded in a batch).
    `packed`: each file's trained segments in line order, files one after another, cut into full `seq_len`
    pieces (no padding). `summaries` adds, before a file's code, one synthetic line per definition it trains on.
    """
    by_file: dict[str, list[tuple[int, int, list[int]]]] = {}
    for path, start, end, ids in corpus.train_segments:
        by_file.setdefault(path, []).append((start, end, ids))
    newline = encode_text(tokenizer, "\n")
    units: list[tuple[Span, list[int]]] = []  # (span, ids) in training order
    for path, segs in by_file.items():
        if summaries:
            lines = summary_lines(index, path, [(a, b) for a, b, _ in segs])
            if lines:
                units.append(((path, 0, 0), encode_text(tokenizer, "\n".join(lines))))
        units.extend(((path, a, b), ids) for a, b, ids in segs)
    if layout == "segments":
        if not summaries:
            return list(corpus.train)
        return [Piece(*span, offset, tuple(chunk)) for span, ids in units
                for offset, chunk in enumerate(_cut(ids, seq_len, min_tokens))]
    if layout != "packed":
        raise ValueError(f"unknown layout {layout!r}")
    stream: list[int] = []
    owners: list[int] = []  # which unit each token comes from
    for number, (_, ids) in enumerate(units):
        stream.extend(ids + newline)
        owners.extend([number] * (len(ids) + len(newline)))
    out = []
    for offset, pos in enumerate(range(0, len(stream), seq_len)):
        chunk = stream[pos : pos + seq_len]
        if len(chunk) < min_tokens:
            continue
        spans = tuple(units[n][0] for n in dict.fromkeys(owners[pos : pos + seq_len]))
        out.append(Piece(spans[0][0], spans[0][1], spans[0][2], offset, tuple(chunk), spans))
    return out


def pieces(index: ProgramIndex, tokenizer, seq_len: int, val_every: int, min_tokens: int = 16,
           seed: int = 0, held_out_files: float = 0.0) -> tuple[list[Piece], list[Piece]]:
    """(train, held-out segments): `split` without the held-out files' pieces."""
    corpus = split(index, tokenizer, seq_len, val_every, held_out_files, seed, min_tokens)
    return corpus.train, corpus.held_out


def padded(group: list[Piece]):
    """Token ids of the pieces right-padded with 0, and the attention mask (1 on real tokens)."""
    import torch

    width = max(len(p.ids) for p in group)
    ids = torch.zeros((len(group), width), dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, piece in enumerate(group):
        ids[row, : len(piece.ids)] = torch.tensor(piece.ids)
        mask[row, : len(piece.ids)] = 1
    return ids, mask


def perplexity(model, batch: list[Piece], batch_size: int = 4) -> float:
    """exp(mean next-token loss over every predicted token of the pieces)."""
    import math

    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(batch), batch_size):
            ids, mask = padded(batch[i : i + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:]
            valid = mask[:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total += float(losses[valid].sum())
            count += int(valid.sum())
    return math.exp(total / count) if count else float("nan")
