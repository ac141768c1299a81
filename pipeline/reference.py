"""`python -m pipeline.reference [--check]`: write docs/reference.md, the settings reference, from conf/ and the stages.

Every config group, its options, the stage each `_target_` names (imported by that dotted path at run time: this
product module imports no stage) and each setting: name, type and bounds (``Stage.config_params`` / ``config_hints``),
the value the option's YAML writes and the YAML's comment on it; graphs, presets and groups without a stage from their
YAML alone. The output depends only on conf/ and the stages' code (sorted; no clock, no machine path), so a test can
compare docs/reference.md with it.
"""
from __future__ import annotations

import argparse
import collections.abc
import inspect
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from pipeline import CONF_DIR, PROJECT_ROOT
from pipeline.engine.graph import resolve_stage
from pipeline.engine.stage import NonFinite, Range, Stage, type_name
from pipeline.yaml_comments import YamlFile

OUT = PROJECT_ROOT / "docs" / "reference.md"
COMMAND = "python -m pipeline.reference"
# groups listed apart from the stage groups: graphs, presets, and Hydra's own groups
GRAPHS, PRESETS, HYDRA = "pipeline", "experiment", "hydra"
MAX_VALUE = 120


class Setting(typing.NamedTuple):
    name: str
    type: str
    value: str
    comment: str


@dataclass
class Option:
    file: YamlFile
    values: dict
    comments: dict[str, str]
    also: list[str]
    target: str = ""
    bases: list[str] = field(default_factory=list)


def load_option(group: str, option: str) -> Option:
    """An option's values with those of the sibling options its ``defaults`` include (theirs first), the config
    groups it includes at a key, and the other choices it makes (``override /group: option``)."""
    file = YamlFile.load(CONF_DIR / group / f"{option}.yaml", group)
    values: dict = {}
    comments: dict[str, str] = {}
    also: list[str] = []
    bases: list[str] = []
    target = ""
    for entry in file.defaults:
        if isinstance(entry, str) and entry != "_self_" and (CONF_DIR / group / f"{entry}.yaml").exists():
            base = load_option(group, entry)
            values.update(base.values)
            comments.update(base.comments)
            also += base.also
            bases.append(entry)
            target = base.target
        elif isinstance(entry, dict):
            for key, choice in entry.items():
                key = str(key)
                if key.startswith("override "):
                    name = key.split()[1].lstrip("/").split("@")[0]
                    also.append(f"{name}={choice}")
                elif key.startswith("/") and "@" in key:
                    included, package = key.lstrip("/").split("@", 1)
                    values[package] = YamlFile.load(CONF_DIR / included / f"{choice}.yaml", included).data
                    comments[package] = file.entry_comment(key)
    for key, value in file.data.items():
        values[key] = value
        comments[key] = file.comment(key) or comments.get(key, "")
    target = str(values.pop("_target_", "") or target)
    comments.pop("_target_", None)
    return Option(file, values, comments, also, target, bases)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def groups() -> list[str]:  # every folder of conf/ that holds options (nested ones as a/b)
    return sorted({p.parent.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*/*.yaml")})


def default_choices() -> dict[str, str]:
    """group -> the option conf/config.yaml chooses."""
    loaded = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    assert isinstance(loaded, dict)
    return {str(k): str(v) for entry in loaded.get("defaults") or [] if isinstance(entry, dict)
            for k, v in entry.items() if v is not None}


# --- formatting ---------------------------------------------------------------------------------------------------

def value_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def code(text: str) -> str:
    """``text`` as an inline code span that survives a table cell."""
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE - 1] + "…"
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def prose(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def type_text(annotation: Any) -> str:
    """A settings type as a reader says it: ``Annotated[float, Range(ge=0)] | None`` is "float (>= 0) or null"."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        text = type_text(args[0])
        for extra in args[1:]:
            if isinstance(extra, Range):
                bounds = [f"{word} {bound:g}" for word, bound in
                          ((">=", extra.ge), (">", extra.gt), ("<=", extra.le), ("<", extra.lt)) if bound is not None]
                text += f" ({', '.join(bounds)})"
            elif isinstance(extra, NonFinite):
                text += " (nan and inf allowed)"
        return text
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in kept)
        return text + (" or null" if len(kept) < len(args) else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(value_text(a) for a in args)
    if origin in (list, tuple, set, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "(" + ", ".join(type_text(a) for a in args) + ")"
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    return {type(None): "null", dict: "mapping"}.get(annotation) or type_name(annotation)


def yaml_type(value: Any) -> str:
    kinds = ((type(None), "null"), (bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"))
    return next((word for kind, word in kinds if isinstance(value, kind)), "mapping")


def table(settings: list[Setting]) -> list[str]:
    if not settings:
        return ["No settings.", ""]
    rows = ["| setting | type | default | what it does |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {prose(s.type)} | {s.value} | {prose(s.comment)} |" for s in settings]
    return [*rows, ""]


# --- the page -----------------------------------------------------------------------------------------------------

def stage_settings(option: Option, stage: type[Stage]) -> list[Setting]:
    params, hints = stage.config_params(), stage.config_hints()
    settings = []
    for name, param in params.items():
        if name in option.values:
            value = option.values[name]
            shown = "required (`???`)" if value == "???" else code(value_text(value))
        elif param.default is inspect.Parameter.empty:
            shown = "required"
        else:
            shown = code(value_text(param.default)) + " (set by a graph)"
        settings.append(Setting(name, type_text(hints.get(name, Any)), shown, option.comments.get(name, "")))
    for name, value in option.values.items():  # a key the stage does not take fails validation; shown all the same
        if name not in params:
            settings.append(Setting(name, "not taken by the stage", code(value_text(value)), option.comments.get(name, "")))
    return settings


def ports_line(stage: type[Stage]) -> str:
    inputs = [f"`{p.name}` ({type_text(p.type)}{'' if p.required else ', optional'})"
              for p in stage.input_ports().values()]
    outputs = [f"`{name}` ({type_text(t)})" for name, t in stage.outputs.items()]
    return f"Inputs: {', '.join(inputs) or 'none'}. Outputs: {', '.join(outputs) or 'none'}."


def stage_group(group: str, default: str | None) -> list[str]:
    out = [f"### {group}", ""]
    for name in options(group):
        option = load_option(group, name)
        out += [f"#### {group}={name}" + (" (default)" if name == default else ""), ""]
        if option.file.header:
            out += [prose(option.file.header), ""]
        if option.target:
            stage = resolve_stage(option.target, [], owner=f"conf/{group}/{name}.yaml")
            doc = inspect.cleandoc(vars(stage).get("__doc__") or "")  # its own docstring, not its parent's
            first = doc.splitlines()[0].rstrip(".") if doc else ""
            out += [f"Stage: `{option.target}`" + (f": {prose(first)}" if first else "") + ".",
                    "", ports_line(stage), ""]
            if option.bases:
                changed = [k for k in option.file.data if k != "_target_"]
                out += [f"Builds on `{group}={', '.join(option.bases)}`"
                        + (f", changing {', '.join(f'`{k}`' for k in changed)}" if changed else "") + ".", ""]
            if option.also:
                out += ["Also selects: " + ", ".join(f"`{a}`" for a in option.also) + ".", ""]
            out += table(stage_settings(option, stage))
        else:
            out += table([Setting(k, yaml_type(v), code(value_text(v)), option.comments.get(k, ""))
                          for k, v in option.values.items()])
    return out


def graph_nodes(name: str) -> tuple[dict, list[str]]:
    """The nodes of a graph with those of the graphs it includes (theirs first), and the included graphs."""
    file = YamlFile.load(CONF_DIR / GRAPHS / f"{name}.yaml", GRAPHS)
    nodes: dict = {}
    included: list[str] = []
    for entry in file.defaults:
        if isinstance(entry, str) and entry != "_self_":
            inner, deeper = graph_nodes(entry)
            nodes.update(inner)
            included += [*deeper, entry]
    for node, spec in (file.data.get("nodes") or {}).items():
        nodes[node] = {**nodes.get(node, {}), **(spec or {})}
    return nodes, included


def graphs() -> list[str]:
    out = ["## Graphs (`pipeline=`)", "",
           "Each graph is a file of `conf/pipeline/`; a node's stage is the `_target_` of the config group of the same "
           "name (or of `config:`), unless the node names a `stage:`. See [concepts](concepts.md#graph-authoring).", ""]
    for name in options(GRAPHS):
        file = YamlFile.load(CONF_DIR / GRAPHS / f"{name}.yaml", GRAPHS)
        nodes, included = graph_nodes(name)
        out += [f"### pipeline={name}", ""]
        if file.header:
            out += [prose(file.header), ""]
        if included:
            out += ["Includes: " + ", ".join(f"`{g}`" for g in dict.fromkeys(included)) + ".", ""]
        result = file.data.get("result")
        inputs = ", ".join(f"`{k}`" for k in file.data.get("inputs") or {})
        out += [(f"Graph inputs: {inputs}. " if inputs else "") + (f"Result: `{result}`." if result else "No result."), "",
                "| node | stage | runs |", "|---|---|---|"]
        for node, spec in nodes.items():
            stage = f"`{spec['stage']}`" if spec.get("stage") else f"group `{spec.get('config') or node}`"
            runs = ([f"when `{spec['when']}`"] if spec.get("when") else []) + (
                ["always (after a failure too)"] if spec.get("always") else []) + (
                ["after " + ", ".join(f"`{a}`" for a in spec["after"])] if spec.get("after") else [])
            out.append(f"| `{node}` | {stage} | {'; '.join(runs) or '-'} |")
        out.append("")
    return out


def presets() -> list[str]:
    out = ["## Presets (`experiment=`)", "",
           "Files of `conf/experiment/` (`# @package _global_`), selected with `-m experiment=<name>`.", ""]
    for name in options(PRESETS):
        file = YamlFile.load(CONF_DIR / PRESETS / f"{name}.yaml", PRESETS)
        out += [f"### experiment={name}", "", prose(file.header), ""]
        params = ((file.data.get(HYDRA) or {}).get("sweeper") or {}).get("params") or {}
        if params:
            out += ["| swept | values |", "|---|---|"]
            out += [f"| `{k}` | {code(value_text(v))} |" for k, v in params.items()] + [""]
    return out


def launchers(group: str) -> list[str]:
    return [f"## Launcher presets (`{group}=`)", "", *(
        f"- `{group}={name}`: {prose(YamlFile.load(CONF_DIR / group / f'{name}.yaml', group).header)}"
        for name in options(group)), ""]


def top_level() -> list[str]:
    out = ["## Top-level keys", "", "Keys of the primary configs (`conf/*.yaml`) outside any group.", ""]
    for path in sorted(CONF_DIR.glob("*.yaml")):
        file = YamlFile.load(path, "")
        if not file.defaults:
            continue  # a data file of the product (api.yaml, summary.yaml), not a Hydra app's config
        rows = []
        for key, value in file.data.items():
            if key == HYDRA:
                continue
            if isinstance(value, dict) and path.stem == "config":  # fallback.*, paths.*
                rows += [Setting(f"{key}.{k}", yaml_type(v), code(value_text(v)), file.comment(key))
                         for k, v in value.items()]
            else:
                rows.append(Setting(key, yaml_type(value), code(value_text(value)), file.comment(key)))
        if rows:
            out += [f"### conf/{path.name}", "", prose(file.header), "", *table(rows)]
    return out


def render() -> str:
    chosen = default_choices()
    found = groups()
    stage_groups: list[str] = []
    plain_groups: list[str] = []
    for group in found:
        if group.split("/")[0] in (GRAPHS, PRESETS, HYDRA):
            continue
        has_stage = any(load_option(group, name).target for name in options(group))
        (stage_groups if has_stage else plain_groups).append(group)
    lines = [
        "# Settings reference",
        "",
        f"Generated by `{COMMAND}` from `conf/` and the stages' typed `Config`; do not edit by hand (a test compares "
        "this page with the generator's output). Set any setting with `<group>.<setting>=<value>` on the command "
        "line and swap an option with `<group>=<option>` ([how-to](howto/own-program.md)). A default is the value "
        "the option's YAML writes; `${...}` is an interpolation resolved when the config is composed.",
        "",
        "## Stage groups",
        "",
        " ".join(f"[{g}](#{g.replace('/', '')})" for g in stage_groups),
        "",
    ]
    for group in stage_groups:
        lines += stage_group(group, chosen.get(group))
    lines += ["## Groups without a stage", "",
              "Values that stages receive through interpolations or a graph's `with:`, or that the product reads.", ""]
    for group in plain_groups:
        lines += stage_group(group, chosen.get(group))
    lines += graphs() + presets()
    lines += [line for group in found if group.startswith(HYDRA + "/") for line in launchers(group)]
    lines += top_level()
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/reference.md is not what it would write")
    text = render()  # the check compares, the plain command writes
    if parser.parse_args(argv).check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        print("" if current == text else f"docs/reference.md is out of date: run {COMMAND}", end="", file=sys.stderr)
        return int(current != text)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(PROJECT_ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
