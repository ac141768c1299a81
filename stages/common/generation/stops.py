"""Where a reply ends: after `decode.max_paragraphs` paragraphs or `decode.max_sentences` sentences, when it writes a
line a third time (`decode.stop_at_repeated_line`) or a sequence of `decode.stop_at_repeated_words` words a second
time: a model's loop; the repeats are then dropped from the reply."""
from __future__ import annotations

import re

from stages.common.grounding.badge import last_sentence_end, sentence_ends

LOOP_REPEATS = 3  # a line written this often is a loop: once more than a lead the model restates, then goes on


class ReplyStop:
    """A transformers `StoppingCriteria` over the reply's text: stop once it has ended ``paragraphs`` paragraphs
    (written that many blank lines after some text; the answer form is a lead and a short explanation), and, with
    ``repeated_lines``, once it completes a line for the `LOOP_REPEATS`-th time (a small model's loop: the rest
    would repeat too; one repeat is often the lead restated before the model goes on).
    ``before`` is the reply text the prompt already holds (the scaffold's prefill and the chosen lead)."""

    def __init__(self, texts: list[str], prompt_length: int, paragraphs: int | None, repeated_lines: bool,
                 before: str = "", repeated_words: int | None = None, sentences: int | None = None):
        self.texts, self.prompt_length = texts, prompt_length
        self.paragraphs, self.repeated_lines = paragraphs, repeated_lines
        self.repeated_words, self.sentences = repeated_words, sentences
        self.reply = before  # the whole reply so far (the loop and sentence checks read it)
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
            self.reply += piece
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
            self.repeated |= self.repeated_words is not None and repeats_words(self.reply, self.repeated_words)
        self.consumed = len(new)
        return torch.full((input_ids.shape[0],), self.done, dtype=torch.bool, device=input_ids.device)

    @property
    def done(self) -> bool:
        """The reply has ended: its paragraphs or sentences are written, or it loops."""
        return (self.repeated or (self.paragraphs is not None and self.ended >= self.paragraphs)
                or (self.sentences is not None and self.sentences_written() >= self.sentences))

    def sentences_written(self) -> int:
        """Sentences the reply has ended (a terminator at the very end may still be `os.` of `os.path`)."""
        return sum(end < len(self.reply) for end in sentence_ends(self.reply))


def keep_sentences(text: str, count: int) -> str:
    """``text`` up to the end of its ``count``-th sentence (all of it when it has fewer)."""
    ends = sentence_ends(text)
    return text[:ends[count - 1]] if len(ends) >= count else text


# a word as the loop check counts it: a code span is one, a citation or bracketed marker none
_WORD = re.compile(r"`[^`\n]*`|\[[^\[\]\n]*\]|[A-Za-z0-9_]+(?:['.-][A-Za-z0-9_]+)*")


def words(text: str) -> list[re.Match]:
    """The words of ``text`` the loop check reads, in order (citations left out)."""
    return [m for m in _WORD.finditer(text) if not m.group().startswith("[")]


def first_repeat(text: str, count: int) -> int | None:
    """The index of the first word that starts a sequence of ``count`` words written before; None: no loop."""
    seen: set[tuple[str, ...]] = set()
    found = [m.group() for m in words(text)]
    for at in range(len(found) - count + 1):
        key = tuple(found[at:at + count])
        if key in seen:
            return at
        seen.add(key)
    return None


def repeats_words(text: str, count: int) -> bool:
    """The last ``count`` words of ``text`` were written before, in that order: a loop."""
    found = [m.group() for m in words(text)]
    if len(found) <= count:
        return False
    last = found[-count:]
    return any(found[at:at + count] == last for at in range(len(found) - count))


def drop_repeated_words(text: str, count: int) -> str:
    """``text`` before its first sequence of ``count`` words written before, ended at the last full sentence before
    it (the text before the repeat whole when no sentence ends there)."""
    at = first_repeat(text, count)
    if at is None:
        return text
    kept = text[:words(text)[at].start()]
    end = last_sentence_end(kept)
    return kept[:end] if end is not None else kept.rstrip()


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
