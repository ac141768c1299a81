"""The retirement rule: every setting of every stage option is varied by some test or bench row, or it goes.

A setting counts as varied where a test or bench file sets it: an override ``group.key=``, a keyword ``key=`` of a
call, or the key as a string (a dict of settings, a parametrized name). Settings made only of interpolations of the
run's paths and inputs (``cache_dir: ${paths.cache}``), copies of another setting (``split_seed: ${corpus.seed}``)
and settings the graph sets are not knobs of their own. What this
does not show: that the test checks the setting's effect (that is each test's own job).
"""
from __future__ import annotations

import ast
import re

from conftest import PROJECT_ROOT
from omegaconf import OmegaConf
from test_config_defaults import SET_BY_GRAPH, STAGE_OPTIONS, from_environment, stage_config

SOURCES = sorted((PROJECT_ROOT / "tests").glob("*.py")) + sorted((PROJECT_ROOT / "bench").rglob("*.py"))
GENERIC = {"test_settings_varied.py", "test_config_defaults.py", "test_docs.py"}  # they name every key by design


def mentions() -> tuple[str, set[str], set[str]]:
    """All text, every keyword argument and every string constant of the test and bench files."""
    texts, keywords, strings = [], set(), set()
    for path in SOURCES:
        if path.name in GENERIC:
            continue
        source = path.read_text(encoding="utf-8")
        texts.append(source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.keyword) and node.arg:
                keywords.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return "\n".join(texts), keywords, strings


def unvaried() -> list[str]:
    text, keywords, strings = mentions()
    missing, seen = [], set()
    for group, option in STAGE_OPTIONS:
        node, cls = stage_config(group, option)
        top = group.split("/")[0]
        for key in cls.config_params():
            if (top, key) in seen or (top, key) in SET_BY_GRAPH:
                continue
            seen.add((top, key))
            if key in node and (from_environment(node, key) or OmegaConf.is_interpolation(node, key)):
                continue  # the run's paths and inputs, or another setting (varied where that one is)
            if re.search(rf"(?<![\w.]){re.escape(top)}\.{re.escape(key)}=", text) or key in keywords or key in strings:
                continue
            missing.append(f"{top}.{key} ({cls.__module__}.{cls.__qualname__})")
    return missing


def test_every_setting_is_varied_by_a_test_or_a_bench_row():
    missing = unvaried()
    assert not missing, ("settings no test or bench row varies (add a test that checks the effect, or retire the "
                         "setting and say why in docs/decisions.md):\n" + "\n".join(missing))


def test_the_rule_sees_a_setting_nobody_sets(monkeypatch):
    """A key that no file names is reported (else the test above could pass by finding everything)."""
    import dataclasses

    node, cls = stage_config(*STAGE_OPTIONS[0])
    extended = dataclasses.make_dataclass("Config", [("zz_unvaried_knob", int, dataclasses.field(default=1))],
                                          bases=(cls.Config,), frozen=True, kw_only=True)
    monkeypatch.setattr(cls, "Config", extended)
    assert any("zz_unvaried_knob" in line for line in unvaried())
