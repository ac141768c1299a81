"""The program's own text as language-model pieces (SPEC §4b), with a stable train / held-out split.

Windows of a file can overlap (the head window and the first defs), so they are first made disjoint: each
window keeps only lines no earlier window took. Each disjoint segment is tokenized and cut into `seq_len`
token pieces; a segment is held out when a stable hash of `(path, start)` is 0 modulo `val_every`, so a
held-out piece never shares a line with a training piece.
"""
from __future__ import annotations

import dataclasses

from stages.common.embedding import stable_hash
from stages.common.types import ProgramIndex


@dataclasses.dataclass(frozen=True)
class Piece:
    path: str
    start: int  # first line of the segment the piece comes from
    end: int
    offset: int  # index of the piece within its segment
    ids: tuple[int, ...]


def segments(index: ProgramIndex) -> list[tuple[str, int, int]]:
    out = []
    for path in sorted(index.files):
        covered = 0
        for window in sorted(index.windows_of(path), key=lambda w: (w.start, -w.end)):
            start = max(window.start, covered + 1)
            if start <= window.end:
                out.append((path, start, window.end))
                covered = window.end
    return out


def pieces(index: ProgramIndex, tokenizer, seq_len: int, val_every: int, min_tokens: int = 16,
           seed: int = 0) -> tuple[list[Piece], list[Piece]]:
    train: list[Piece] = []
    held_out: list[Piece] = []
    for path, start, end in segments(index):
        text = "\n".join(index.lines(path)[start - 1 : end])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        held = stable_hash(f"{path}:{start}", seed) % val_every == 0 if val_every > 0 else False
        for offset, pos in enumerate(range(0, len(ids), seq_len)):
            chunk = ids[pos : pos + seq_len]
            if len(chunk) < min_tokens:
                continue
            (held_out if held else train).append(Piece(path, start, end, offset, tuple(chunk)))
    return train, held_out


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
