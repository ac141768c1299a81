"""Defaults live in one place (issue 16, item 1): a stage's YAML and its ``__init__`` cannot disagree.

The rule. Hydra composes our configs in struct mode, so ``group.key=value`` only works for a key the YAML writes:
the YAML of a group option therefore writes every keyword of its ``_target_`` stage (the values a user sees with
``--cfg job`` and overrides), and each value equals the default in the stage's signature, with two exceptions:

- a *variant* (an option whose ``defaults`` include a sibling option with the same ``_target_``, e.g.
  ``decode/sample.yaml`` over ``greedy``) writes only what it changes, and each of those values must differ;
- a value taken from the run's environment (``${paths.…}``, a top-level input such as ``${adapters}``, a whole
  group such as ``${embed}``) is not a default. An interpolation of another stage's key (``${cite.min_citations}``,
  ``${corpus.seq_len}``, ``${oc.select:select.k1}``) is compared after resolving it in the default composition.

Shared numbers are written once: the BM25F weights in ``stages/common/scoring.RELEVANCE`` (select's keyword
defaults and the pack/rescore ``relevance`` default), linked in YAML by ``conf/relevance/select.yaml`` only.
"""
from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, PROJECT_ROOT
from omegaconf import DictConfig, ListConfig, OmegaConf
from test_config_compose import OPTIONS, choices_of, compose_primary, missing_keys, primary_for, supply

from pipeline.engine.graph import resolve_stage

# keywords a graph sets on a node with `with:` (not a user's knob, so not in the group's YAML)
SET_BY_GRAPH = {("closed_book", "reuse_plain")}
REF = re.compile(r"\$\{([^}]*)\}")


@functools.cache
def composed(group: str, option: str) -> DictConfig:
    primary = primary_for(group, option)
    choice = f"{group}={option}" if group in choices_of(primary) else f"+{group}={option}"
    cfg = compose_primary(primary, choice)
    missing = missing_keys(cfg, "")
    return compose_primary(primary, choice, *supply(missing)) if missing else cfg


@functools.cache
def raw(group: str, option: str) -> dict:
    """The option's own YAML (for a `@package _global_` file: its entry for the group)."""
    text = (Path(CONF_DIR) / group / f"{option}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    if "@package _global_" in text.split("\n", 1)[0]:
        return {**(data.get(group.split("/")[-1]) or {}), "defaults": data.get("defaults", [])}
    return data


def siblings_included(group: str, option: str) -> list[str]:
    return [d for d in raw(group, option).get("defaults", []) if isinstance(d, str) and (group, d) in OPTIONS]


def written_in(group: str, option: str, key: str) -> str:
    if key in raw(group, option):
        return f"conf/{group}/{option}.yaml"
    for base in siblings_included(group, option):
        found = written_in(group, base, key)
        if found:
            return found
    return ""


def stage_options() -> list[tuple[str, str]]:
    out = []
    for group, option in OPTIONS:
        if group.split("/")[0] in ("pipeline", "experiment", "relevance"):
            continue
        if "_target_" in (raw(group, option) | {k: 1 for b in siblings_included(group, option) for k in raw(group, b)}):
            out.append((group, option))
    return out


STAGE_OPTIONS = stage_options()
IDS = [f"{g}={o}" for g, o in STAGE_OPTIONS]


def stage_config(group: str, option: str) -> tuple[DictConfig, type]:
    node = composed(group, option)[group.split("/")[0]]
    return node, resolve_stage(str(node._target_), ["stages"], owner=f"conf/{group}/{option}.yaml")


def variant_keys(group: str, option: str, target: str) -> set[str]:
    """Keys a variant writes itself (what it changes); empty for an option that is not a variant."""
    bases = [b for b in siblings_included(group, option) if stage_config(group, b)[0]._target_ == target]
    if not bases:
        return set()
    return set(raw(group, option)) - {"defaults", "_target_"}


def from_environment(node: DictConfig, key: str) -> bool:
    """True when the value is (made only of) interpolations of the run's environment: ``paths.*``, a top-level
    input or a whole group (``${adapters}``, ``${embed}``)."""
    value = node._get_node(key)
    if isinstance(value, (DictConfig, ListConfig)):
        keys = value.keys() if isinstance(value, DictConfig) else range(len(value))
        return len(value) > 0 and all(from_environment(value, k) for k in keys)
    if not OmegaConf.is_interpolation(node, key):
        return False
    refs = [r.split(":", 1)[1].split(",")[0].strip() if r.startswith("oc.select:") else r
            for r in REF.findall(str(value._value()))]
    return bool(refs) and all(r.startswith("paths.") or "." not in r for r in refs)


def same(value, default) -> bool:
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    return value == default


@pytest.mark.parametrize("group,option", STAGE_OPTIONS, ids=IDS)
def test_yaml_values_equal_the_signature_defaults(group, option):
    node, cls = stage_config(group, option)
    params = cls.config_params()
    changed = variant_keys(group, option, node._target_)
    values = OmegaConf.to_container(node, resolve=True)
    problems = []
    for key in node.keys():
        if key == "_target_" or key in changed or key not in params or params[key].default is inspect.Parameter.empty:
            continue
        if from_environment(node, key):
            continue
        default = params[key].default
        if not same(values[key], default):
            where = written_in(group, option, key) or f"conf/{group}/{option}.yaml (via an interpolation or include)"
            problems.append(f"{where}: {key} = {values[key]!r}, but {cls.__module__}.{cls.__qualname__} "
                            f"defaults to {default!r}")
    assert not problems, "YAML and signature disagree (one of them must change):\n" + "\n".join(problems)


@pytest.mark.parametrize("group,option", STAGE_OPTIONS, ids=IDS)
def test_every_keyword_is_written_in_yaml(group, option):
    """Struct mode: a keyword missing from the YAML cannot be set with group.key=value (only with +group.key)."""
    node, cls = stage_config(group, option)
    key = group.split("/")[0]
    absent = [k for k in cls.config_params() if k not in node.keys() and (key, k) not in SET_BY_GRAPH]
    assert not absent, f"conf/{group}/{option}.yaml lacks {cls.__name__}'s keywords {absent}: write them with their defaults"


def test_variants_write_only_what_they_change():
    checked = 0
    for group, option in STAGE_OPTIONS:
        node, _ = stage_config(group, option)
        changed = variant_keys(group, option, node._target_)
        for base in siblings_included(group, option):
            base_values = OmegaConf.to_container(stage_config(group, base)[0], resolve=True)
            values = OmegaConf.to_container(node, resolve=True)
            for key in changed:
                checked += 1
                assert values[key] != base_values.get(key), (
                    f"conf/{group}/{option}.yaml: {key} repeats {group}/{base}'s value {values[key]!r}; drop it")
    assert checked >= 2  # decode/sample, targets/code_recall


def test_a_disagreement_is_caught(monkeypatch):
    """The check fails, naming file and key, when a signature default drifts from the YAML."""
    import dataclasses

    from stages.perplexity import ProgramPerplexity

    drifted = dataclasses.make_dataclass("Config", [("max_pieces", int, dataclasses.field(default=64))],
                                         bases=(ProgramPerplexity.Config,), frozen=True, kw_only=True)
    monkeypatch.setattr(ProgramPerplexity, "Config", drifted)
    with pytest.raises(AssertionError, match=r"conf/perplexity/held_out.yaml: max_pieces = 32.*defaults to 64"):
        test_yaml_values_equal_the_signature_defaults("perplexity", "held_out")


def test_bm25f_weights_are_written_once():
    from stages.common.retrieval.scoring import RELEVANCE
    from stages.pack import PackFunctionFirst, PackWindows
    from stages.rescore import LMRescore
    from stages.select import QuestionSelect

    params = QuestionSelect.config_params()
    assert {k: params[f"{k}_weight" if k not in ("k1", "b") else k].default for k in RELEVANCE} == RELEVANCE
    for cls in (PackWindows, PackFunctionFirst, LMRescore):
        assert cls.config_params()["relevance"].default == RELEVANCE, cls
    # in conf/, only relevance/select.yaml writes the block; every other file includes it
    writers = [p for p in Path(CONF_DIR).rglob("*.yaml") if re.search(r"^relevance:", p.read_text(), re.M)]
    assert writers == [], writers
    block = yaml.safe_load((Path(CONF_DIR) / "relevance" / "select.yaml").read_text())
    assert set(block) == set(RELEVANCE)


def test_no_default_hides_in_an_interpolation_fallback():
    """`${oc.select:key,4.0}` would write a default a second time; a missing key resolves to null (the stage's)."""
    hidden = [f"{p.relative_to(CONF_DIR)}: {m}" for p in Path(CONF_DIR).rglob("*.yaml")
              for m in re.findall(r"\$\{oc\.select:[^,}]+,[^}]*\}", p.read_text())]
    assert not hidden, hidden


def test_relevance_falls_back_to_the_stage_default_without_select_weights():
    from stages.common.retrieval.scoring import RELEVANCE, check_relevance

    node, _ = stage_config("pack", "windows")
    cfg = composed("select", "zoom")
    assert all(v is None for v in OmegaConf.to_container(cfg.pack.relevance, resolve=True).values())
    assert check_relevance("pack", OmegaConf.to_container(cfg.pack.relevance, resolve=True)) == RELEVANCE
    assert OmegaConf.to_container(node.relevance, resolve=True) == RELEVANCE


# --- every `group.key=value` override the README shows still composes (struct mode: the key must exist) ---

README_OVERRIDE = re.compile(r"(?<![\w./$-])([a-z_]+(?:\.[a-z_0-9]+)+)=")
# deliberate mistakes the README shows (its error messages)
README_BAD = {"mix.alpah"}


def readme_overrides() -> list[str]:
    text = (Path(PROJECT_ROOT) / "README.md").read_text()
    found = {m for m in README_OVERRIDE.findall(text) if not m.startswith(("hydra.", "pipeline.nodes."))}
    return sorted(found - README_BAD)


def test_readme_overrides_are_found():
    found = readme_overrides()
    assert "decode.max_new_tokens" in found and "select.zoom_symbol" in found and len(found) > 30


@pytest.mark.parametrize("dotted", readme_overrides())
def test_readme_override_key_exists(dotted):
    """The key exists in the composed config of some option of its group, so `group.key=...` needs no `+`."""
    top, rest = dotted.split(".", 1)
    candidates = [(g, o) for g, o in OPTIONS if g == top] or [(None, None)]
    for group, option in candidates:
        cfg = composed(group, option) if group else default_config()
        if OmegaConf.select(cfg, dotted, default="<absent>", throw_on_missing=False) != "<absent>" or \
                _has_key(cfg, dotted):
            return
    raise AssertionError(f"README shows `{dotted}=…` but no option of '{top}' has that key")


@functools.cache
def default_config() -> DictConfig:
    return compose_primary("config")


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def api_knob_keys() -> list[str]:
    knobs = yaml.safe_load((CONF_DIR / "api.yaml").read_text(encoding="utf-8"))["knobs"]
    return sorted({v if isinstance(v, str) else v["append"] for v in knobs.values()
                   if isinstance(v, str) or "append" in v})


@pytest.mark.parametrize("dotted", api_knob_keys())
def test_api_knob_names_an_existing_setting(dotted):
    """Each keyword of `pipeline.generate_answer` (conf/api.yaml) names a key some option of its group has."""
    test_readme_override_key_exists(dotted)
