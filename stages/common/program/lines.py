"""Line numbers as editors, Python's tokenizer and our citations count them: only \\n, \\r\\n and \\r end a line.

``str.splitlines`` also breaks at form feed, vertical tab, \\x1c-\\x1e, \\x85, U+2028 and U+2029, so a form feed in
a comment would shift every later line shown in a ``[ctx]`` block against the numbers in its header. Every
line count of the index, the windows, packing and citation checks goes through these two functions.
"""
from __future__ import annotations


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` without their endings; a final line ending adds no empty line."""
    if not text:
        return []
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def count_lines(text: str) -> int:
    return len(split_lines(text))
