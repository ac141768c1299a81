"""What a question may be, checked on every way in (command line, chat, Python API, the eval's questions) before a
graph is built or any model loads: UTF-8 text, no control character but tab and line breaks, and at most
``max_question_tokens`` tokens (conf/config.yaml), bounded here by ``MAX_CHARS_PER_TOKEN`` characters a token until
the model's tokenizer counts the tokens (the `scaffold` stage). Each refusal is one line (docs/faults.md).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pipeline.engine.errors import ConfigError, InputError

# the bound before a tokenizer is there: ordinary text averages 3-5 characters a token, never 8
MAX_CHARS_PER_TOKEN = 8
# lone surrogates (os.fsdecode's stand-ins for bytes that are not UTF-8), control characters but \t, \n and \r
_BAD = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\ud800-\udfff\x00-\x1f\x7f-\x9f]")  # and tab and line breaks: a preview is one line
_WHO = "the question (prompt)"


def _describe(found: re.Match[str]) -> str:
    """One bad character as words: ``is not UTF-8 text (byte 0xff at character 2)``."""
    code, where = ord(found.group()), found.start() + 1
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte it stands for
        return f"is not UTF-8 text (byte 0x{code - 0xDC00:02x} at character {where})"
    if 0xD800 <= code <= 0xDFFF:
        return f"is not UTF-8 text (a lone surrogate U+{code:04X} at character {where})"
    return f"holds the control character U+{code:04X} at character {where} (only tabs and line breaks may appear)"


def _escaped(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code > 0xFF else f"\\x{code:02x}"


def text_problem(text: str) -> str | None:
    """Why ``text`` is not text a person typed (its first byte that is not UTF-8 or control character), or None."""
    found = _BAD.search(text)
    return None if found is None else _describe(found)


def limit_of(max_tokens: Any) -> int:
    """``max_question_tokens`` as a whole number >= 1 (a ConfigError naming the key otherwise)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"max_question_tokens must be a whole number >= 1, got {max_tokens!r}")
    return max_tokens


def question_problem(text: str, max_tokens: int) -> str | None:
    """Why ``text`` cannot be asked (its bytes, a control character, more characters than ``max_tokens`` tokens can
    hold), or None. The tokens themselves are counted where the tokenizer is."""
    problem = text_problem(text)
    if problem is not None:
        return f"{_WHO} {problem}"
    chars = max_tokens * MAX_CHARS_PER_TOKEN
    if len(text) > chars:
        return (f"{_WHO} is {len(text):,} characters; a question may have max_question_tokens={max_tokens} tokens "
                f"(at most {chars:,} characters): ask a shorter one")
    return None


def check_question(text: str, max_tokens: Any) -> None:
    """Refuse ``text`` as a question with one InputError line."""
    problem = question_problem(text, limit_of(max_tokens))
    if problem is not None:
        raise InputError(problem)


def check_config(cfg: Any) -> None:
    """The composed config's question (top-level ``prompt``), when it has one, against ``max_question_tokens``."""
    from omegaconf import OmegaConf

    prompt = OmegaConf.select(cfg, "prompt", default=None, throw_on_missing=False)
    limit = OmegaConf.select(cfg, "max_question_tokens", default=None, throw_on_missing=False)
    if isinstance(prompt, str) and limit is not None:
        check_question(prompt, limit)


def argv_problem(argv: Iterable[str], free_text_keys: Iterable[str]) -> str | None:
    """The first command-line argument that is not UTF-8 text (the OS hands such bytes over as surrogates), as one
    line: Hydra, the saved config and the report could not carry it."""
    free = set(free_text_keys)
    for arg in argv:
        found = _SURROGATE.search(arg)
        if found is None:
            continue
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in free:
            return f"{_WHO} {text_problem(value)}"
        return f"the argument {preview(arg)} {_describe(found)}"
    return None


def preview(text: str, width: int = 60) -> str:
    """``text`` quoted on one short printable line: bytes that are not UTF-8 and control characters escaped
    (``\\xff``), cut at ``width`` characters with its length."""
    shown = _UNPRINTABLE.sub(lambda m: _escaped(m.group()), text[: width * 2])
    if len(shown) > width or len(text) > width * 2:
        return f"'{shown[:width]}…' ({len(text):,} characters)"
    return f"'{shown}'"


def _default_prompt() -> Any:
    """The question of conf/config.yaml: the one asked when ``prompt=`` is left out (about this project)."""
    from omegaconf import OmegaConf

    from pipeline import CONF_DIR

    return OmegaConf.load(CONF_DIR / "config.yaml").get("prompt")


def check_prompt_given(cfg: Any, overrides: Iterable[str]) -> None:
    """Refuse a run of a graph that asks one question (``prompt`` among its inputs, no question set) about an existing
    program outside this project when ``prompt=`` was left out: the default question is about this project."""
    from pathlib import Path

    from omegaconf import OmegaConf

    inputs = OmegaConf.select(cfg, "pipeline.inputs", default=None, throw_on_missing=False)
    if inputs is None or "prompt" not in inputs or "questions" in inputs:
        return
    if any(o.split("=", 1)[0].lstrip("+~") == "prompt" for o in overrides):
        return
    prompt = OmegaConf.select(cfg, "prompt", default=None, throw_on_missing=False)
    root = OmegaConf.select(cfg, "program_root", default=None, throw_on_missing=False)
    project = OmegaConf.select(cfg, "paths.root", default=None, throw_on_missing=False)
    if not isinstance(root, str) or not isinstance(project, str) or prompt != _default_prompt():
        return
    where = Path(root).expanduser().absolute()
    if not where.exists() or where.resolve().is_relative_to(Path(project).resolve()):
        return  # a missing folder is the index's one line; this project (or a part of it) has the default question
    raise ConfigError(f'prompt=... is required when asking about {root}: the default question is about this '
                      f'project; ask yours, e.g. prompt="Where are config files parsed?"')
