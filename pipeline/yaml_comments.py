"""One YAML file of conf/ read for the settings reference: its values, and the comments beside its keys."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[^\s:#'\"-][^:#]*?)\s*:(?:\s|$)")


def inline_comment(line: str) -> str:
    """The text after a `#` that starts a comment (outside quotes, after whitespace), or ""."""
    quote, escaped = "", False
    for i, ch in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'" and (i == 0 or line[:i].rstrip()[-1:] in ("", ":", "[", "{", ",", "-")):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[i + 1:].strip()
    return ""


def is_comment(line: str) -> bool:
    text = line.strip()
    return text.startswith("#") and not text.startswith("# @package")


@dataclass
class YamlFile:
    """One option's YAML: its values (``data``: for a `@package _global_` file, its entry for the group), its
    ``defaults`` list, its header comment and the comment of each key."""

    data: dict
    defaults: list
    header: str
    lines: list[str] = field(repr=False)
    indent: str = ""

    @classmethod
    def load(cls, path: Path, group: str) -> YamlFile:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        assert isinstance(loaded, dict)
        lines = path.read_text(encoding="utf-8").splitlines()
        # the header is the file's first comment lines, up to an indented one (an example command or YAML)
        top = itertools.takewhile(lambda ln: ln.startswith("#") and not ln.startswith(("#  ", "# -")), lines)
        header = " ".join(ln[1:].strip() for ln in top if is_comment(ln))
        package = group.split("/")[-1]
        nested = bool(lines) and "@package _global_" in lines[0] and package in loaded
        data = dict(loaded.get(package) or {}) if nested else {k: v for k, v in loaded.items() if k != "defaults"}
        return cls(data, list(loaded.get("defaults") or []), header, lines, "  " if nested else "")

    def comment(self, key: str) -> str:
        """The comment on ``key``'s line, after the comment lines right above it (the file's header excluded)."""
        for number, line in enumerate(self.lines):
            match = KEY_LINE.match(line)
            if not match or match["indent"] != self.indent or match["key"].strip("'\"") != key:
                continue
            above: list[str] = []
            start = number
            while start > 0 and is_comment(self.lines[start - 1]):
                start -= 1
                above.insert(0, self.lines[start].strip()[1:].strip())
            header_end = next((i for i, text in enumerate(self.lines) if not text.strip().startswith("#")), 0)
            if start < header_end:
                above = []  # the header describes the option, not its first key
            return " ".join([*above, inline_comment(line)]).strip()
        return ""

    def entry_comment(self, needle: str) -> str:
        """The inline comment of the defaults entry that mentions ``needle``."""
        return next((inline_comment(ln) for ln in self.lines if needle in ln and ln.lstrip().startswith("-")), "")
