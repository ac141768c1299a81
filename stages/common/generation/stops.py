"""Where a reply ends: after `decode.max_paragraphs` paragraphs, or (`decode.stop_at_repeated_line`) when it writes
a line a third time, a small model's loop; the repeated lines are then dropped from the reply."""
from __future__ import annotations

LOOP_REPEATS = 3  # a line written this often is a loop: once more than a lead the model restates, then goes on


class ReplyStop:
    """A transformers `StoppingCriteria` over the reply's text: stop once it has ended ``paragraphs`` paragraphs
    (written that many blank lines after some text; the answer form is a lead and a short explanation), and, with
    ``repeated_lines``, once it completes a line for the `LOOP_REPEATS`-th time (a small model's loop: the rest
    would repeat too; one repeat is often the lead restated before the model goes on).
    ``before`` is the reply text the prompt already holds (the scaffold's prefill and the chosen lead)."""

    def __init__(self, texts: list[str], prompt_length: int, paragraphs: int | None, repeated_lines: bool,
                 before: str = ""):
        self.texts, self.prompt_length = texts, prompt_length
        self.paragraphs, self.repeated_lines = paragraphs, repeated_lines
        self.written, self.consumed, self.ended = "", 0, 0
        self.line = ""
        self.lines: dict[str, int] = {}  # line key -> times written
        for key in filter(None, map(line_key, before.split("\n"))):
            self.lines[key] = self.lines.get(key, 0) + 1
        self.repeated = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[0, self.prompt_length:].tolist()
        for token in new[self.consumed:]:
            piece = self.texts[token] if 0 <= token < len(self.texts) else ""
            self.written += piece
            while "\n\n" in self.written:
                before, _, self.written = self.written.partition("\n\n")
                self.ended += bool(before.strip())
            self.line += piece
            while "\n" in self.line:
                done, _, self.line = self.line.partition("\n")
                key = line_key(done)
                if key:
                    self.lines[key] = self.lines.get(key, 0) + 1
                    self.repeated |= self.repeated_lines and self.lines[key] >= LOOP_REPEATS
        self.consumed = len(new)
        return torch.full((input_ids.shape[0],), self.done, dtype=torch.bool, device=input_ids.device)

    @property
    def done(self) -> bool:
        """The reply has ended: its paragraphs are written, or it loops."""
        return self.repeated or (self.paragraphs is not None and self.ended >= self.paragraphs)


def line_key(line: str) -> str:
    """A line as the loop check compares it; short lines (a fence, a brace, "Example:") may repeat freely."""
    key = " ".join(line.split())
    return key if len(key) >= 12 else ""


def drop_repeated_lines(text: str) -> str:
    """``text`` without the lines that repeat an earlier one (each line's first writing stays)."""
    seen, kept = set(), []
    for line in text.split("\n"):
        key = line_key(line)
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(line)
    return "\n".join(kept)
