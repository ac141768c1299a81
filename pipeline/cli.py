"""The command line around every Hydra app: questions as typed, our usage, Hydra's errors as one line, exit 2.

- A free-text value (`prompt="What's new in f(x), and why?"`) is quoted for Hydra's override grammar before Hydra
  parses the command line, and escaped so that OmegaConf never reads `${...}` in it as an interpolation.
- `--help` is a short usage of ours (the knobs people change first); `--help-config` is Hydra's own help.
- A mistyped override (`mix.alpah=3`, `selct=zoom`, `select=zom`) or any other error Hydra raises while composing
  gets one line, `error: ... (did you mean ...?)`, and exit code 2, like the errors of our own graphs;
  `hydra.verbose=true` (or HYDRA_FULL_ERROR=1) shows the traceback instead.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

# config keys whose value is what a person typed (a question), never Hydra grammar or an interpolation
FREE_TEXT_KEYS = ("prompt",)
# how a value is left to Hydra as it is: null (the key's "unset"), and values already quoted for Hydra
_KEEP = {"null"}


def escape_interpolation(value: str) -> str:
    """``value`` as an OmegaConf string that resolves to itself: ``${`` is escaped (a run of backslashes
    right before it is doubled, since OmegaConf reads ``\\\\${`` as a backslash then an interpolation)."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)


def hydra_quoted(value: str) -> str:
    """``value`` as a single-quoted string of Hydra's override grammar that parses back to ``value``:
    a quote becomes ``\\'``, and a run of backslashes right before a quote or the end is doubled."""
    body = re.sub(r"(\\*)('|\Z)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{body}'"


def text_override_value(text: str) -> str:
    """What to put after ``key=`` so that the config holds exactly ``text`` (a question, a message)."""
    return hydra_quoted(escape_interpolation(text))


def _free_text_key(arg: str) -> str | None:
    key = arg.split("=", 1)[0].lstrip("+")
    return key if "=" in arg and key in FREE_TEXT_KEYS and not arg.startswith("~") else None


def _already_quoted(value: str) -> list[str] | None:
    """The texts of a value the user already quoted for Hydra ('a' or 'a','b' for a sweep), else None."""
    if value[:1] not in ("'", '"'):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, QuotedString
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_override(f"key={value}")
    except HydraException:
        return None
    value = parsed.value()  # a quoted string (unquoted now), or a sweep whose items keep their quotes
    items = value.list if isinstance(value, ChoiceSweep) else [value]
    texts = [item.text if isinstance(item, QuotedString) else item for item in items]
    return texts if all(isinstance(t, str) for t in texts) else None


def prepare_argv(argv: Iterable[str]) -> list[str]:
    """Quote free-text values for Hydra. A value already quoted for Hydra ('q1','q2' sweeps two questions)
    keeps its meaning but is re-escaped, so that no question is ever interpolated."""
    out = []
    for arg in argv:
        key = _free_text_key(arg)
        if key is None:
            out.append(arg)
            continue
        head, value = arg.split("=", 1)
        if value in _KEEP:
            out.append(arg)
            continue
        quoted = _already_quoted(value)
        texts = quoted if quoted is not None else [value]
        out.append(f"{head}=" + ",".join(text_override_value(t) for t in texts))
    return out


# flags of ours that stand for an override (Hydra's own parser knows neither)
SHORTHANDS = {"--json": "output=json", "-v": "hydra.verbose=true", "--verbose": "hydra.verbose=true"}


def shorthands(argv: Iterable[str]) -> list[str]:
    """``argv`` with our flags (``--json``, ``-v``) replaced by the overrides they stand for."""
    return [SHORTHANDS.get(arg, arg) for arg in argv]


def keyless(overrides: Iterable[str]) -> str | None:
    """The first override with an empty key (``=3``, ``~=3``, ``+=3``, ``@pkg=3``, ``~``), as one line; None if every
    override names a key (Hydra's own checks of these end in a ValueError deep in its defaults list)."""
    for arg in overrides:
        if arg.startswith("-"):  # --multirun, --cfg, ...
            continue
        key = arg.split("=", 1)[0]
        key = key[2:] if key.startswith("++") else key[1:] if key.startswith(("+", "~")) else key
        if not key.split("@", 1)[0].strip():
            return f"the override '{arg}' has no key: write key=value (e.g. select.top_k=3 or select=question)"
    return None


def _verbose(argv: list[str]) -> bool:
    flags = [a.split("=", 1)[1].strip().lower() for a in argv if a.lstrip("+").startswith("hydra.verbose=")]
    return any(f not in ("false", "null", "[]", "") for f in flags) or os.environ.get("HYDRA_FULL_ERROR") == "1"


def _overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def _config_keys(config_name: str, overrides: list[str]) -> list[str]:
    """Every dotted key of the config composed with the group choices that parse (for suggestions)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pipeline import CONF_DIR

    groups = [o for o in overrides if "=" in o and not o.startswith(("+", "~")) and "." not in o.split("=", 1)[0]
              and (CONF_DIR / o.split("=", 1)[0]).is_dir()]
    GlobalHydra.instance().clear()
    cfg = None
    for attempt in (groups, []):
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name, overrides=attempt, return_hydra_config=True)
            break
        except (HydraException, OmegaConfBaseException):  # a choice that does not compose: use the defaults
            GlobalHydra.instance().clear()
    GlobalHydra.instance().clear()
    if cfg is None:
        return []
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for key in node.keys() if isinstance(node, DictConfig) else []:
            name = f"{prefix}{key}"
            keys.append(name)
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not OmegaConf.is_missing(node, key):
                walk(child, f"{name}.")

    walk(cfg, "")
    keys += [p.name for p in CONF_DIR.iterdir() if p.is_dir()]  # groups with no default choice
    return sorted(set(keys))


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' with the closest candidate, or ''."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not close:  # a wrong last segment of a right prefix: compare among the siblings only
        parent, _, leaf = name.rpartition(".")
        siblings = [c.rpartition(".")[2] for c in candidates if c.rpartition(".")[0] == parent]
        close = [f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)]
    return f" (did you mean {close[0]}?)" if close else ""


def explain(err: BaseException, config_name: str, overrides: list[str]) -> str:
    """One line for an error Hydra raised while parsing or composing the command line."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(err)
    cause = err.__cause__
    key_match = re.search(r"full_key: (\S+)", str(cause)) if cause is not None else None
    override_match = re.match(r"Could not override '([^']+)'", text)
    if key_match and override_match:
        key = override_match.group(1)
        return f"unknown config key '{key}'{suggest(key, _config_keys(config_name, overrides))}"
    if isinstance(err, MissingConfigException):
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
        listed = text.split("Available options in", 1)[-1].split("Config search path", 1)[0]
        options = [line.strip() for line in listed.splitlines()[1:] if line.startswith("\t")] \
            if "Available options in" in text else []
        if found:
            group, option = found.groups()
            hint = suggest(option, options).replace("did you mean ", f"did you mean {group}=")
            return f"{group}={option}: no option '{option}' in group '{group}'{hint}; options: {', '.join(options) or '(none)'}"
        return text.splitlines()[0]
    if isinstance(err, OverrideParseException):
        found = re.match(r"Error parsing override '(.*)'", text.splitlines()[0])
        culprit = found.group(1) if found else text.splitlines()[0]
        return (f"cannot parse the override '{culprit}' (quote a value that has spaces or symbols: key='a value'; "
                "see Hydra's override grammar)")
    line = " ".join(part.strip() for part in text.splitlines() if part.strip() and not part.startswith("See http"))
    if cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in line:
        line += f": {str(cause).splitlines()[0]}"
    return line or type(err).__name__


def launch(main: Callable[[], Any], usage: str, config_name: str) -> None:
    """Run the ``@hydra.main`` function ``main`` as a command: argv prepared, --help ours first, errors one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.callbacks import remove_unused_sweep_folder
    from pipeline.question_text import argv_problem

    not_text = argv_problem(sys.argv[1:], FREE_TEXT_KEYS)
    if not_text:  # bytes that are not UTF-8: neither Hydra's grammar nor the saved config nor the report can hold them
        print(f"error: {not_text}", file=sys.stderr)
        sys.exit(2)
    argv = prepare_argv(shorthands(sys.argv[1:]))
    if "--help-config" in argv:  # Hydra's own help: every group, its options and the composed config
        argv = ["--help" if a == "--help-config" else a for a in argv]
    elif "--help" in argv or "-h" in argv:
        print(usage.strip())
        return
    verbose = _verbose(argv)
    problem = keyless(_overrides(argv))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own report and exiting 1
    saved_argv, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        main()
    except KeyboardInterrupt:  # anywhere outside a run (loading, composing, the report): one line, no traceback
        remove_unused_sweep_folder()  # a sweep interrupted before its first job began leaves nothing behind
        if verbose or previous == "1":
            raise
        print(("\n" if sys.stderr.isatty() else "") + "error: interrupted", file=sys.stderr)  # after the ^C's line
        sys.exit(130)
    except (HydraException, OmegaConfBaseException, OSError) as err:
        # composing, or Hydra's own files (run folder, log, saved config); our stages' errors the app reported
        remove_unused_sweep_folder()  # a sweep whose first job did not compose leaves nothing behind
        if previous == "1":  # the user asked Hydra for the raw exception
            raise
        if verbose:
            traceback.print_exc()
            sys.exit(1)
        message = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else \
            explain(err, config_name, _overrides(argv))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001 - what Hydra would do: the traceback, exit 1 (our own errors exit 2 before this)
        if previous == "1":
            raise
        traceback.print_exc()
        sys.exit(1)
    finally:
        sys.argv = saved_argv
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


# the knobs people change first, in this order, as `key=value  what it does`: `{options}` lists a group's options and
# `{default}` a key's default (read from conf/); --help shows those of an app's groups (and those of every app); a
# third item names the group a flag goes with
KNOBS = (
    ("program_root=<folder>", "the program (source tree) to ask about; default: this project"),
    ('prompt="<question>"', "the question as you would say it; required unless program_root is this project"),
    ("decode.max_new_tokens=<n>", "the longest answer in tokens (default {default}); lower it on a slow machine"),
    ("model={options}", "the model; hf model.id=<folder or .gguf> for your own"),
    ("decode.engine=llamacpp", "llama.cpp decodes (faster; with synth=none; ./setup.sh --engines builds it)"),
    ("select={options}", "how evidence is chosen (zoom: select.zoom_symbol=<name>)"),
    ("pack.context_tokens=<n>", "tokens of evidence shown to the model (default {default})"),
    ("synth={options}", "the adapter made from the program's text (fitted: trained, slower)"),
    ("mix.alpha=<x>", "how strongly the adapter is mixed in (default {default})"),
    ("pipeline={options}", "the graph to run (eval: questions=<set.jsonl>, docs/howto/evaluate.md)"),
    ("--json", "stdout: one JSON object (answer, citations with their code, checks, timings)", "prompt"),
    ("-v", "verbose: tracebacks and the log lines (hydra.verbose=true)"),
)
_EVERY_APP = ("program_root", "-v")


def _head(knob: str) -> str:
    return re.split(r"[.=]", knob, maxsplit=1)[0]


def _options(group: str) -> str:
    from pipeline import CONF_DIR

    return "|".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def _default(key: str) -> Any:
    """The default of ``group.key`` in conf/: the key in the group's default option of conf/config.yaml."""
    from omegaconf import OmegaConf

    from pipeline import CONF_DIR

    group, _, rest = key.partition(".")
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", []))
    option = next((d[group] for d in defaults if isinstance(d, dict) and group in d), None)
    if option is None or not (CONF_DIR / group / f"{option}.yaml").is_file():
        return "?"
    return OmegaConf.select(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), rest, default="?")


def usage(command: str, what: str, examples: list[str], groups: Iterable[str] = ()) -> str:
    """A short usage: the command, the knobs people change first (those of ``groups``, "prompt" among them when the
    app takes one question), the other groups with their options (read from conf/), and where Hydra's full help is."""
    groups = list(groups)
    lines = [f"usage: {command} [key=value ...] [group=option ...] [-m for a sweep]", "", what, ""]
    shown = set()
    for knob, text, *owner in KNOBS:
        head = owner[0] if owner else _head(knob)
        if head not in groups and head not in _EVERY_APP:
            continue
        shown.add(head)
        key = knob.split("=", 1)[0]
        knob = knob.replace("{options}", _options(head))
        text = text.replace("{default}", str(_default(key))) if "{default}" in text else text
        lines.append(f"  {knob:<28}{text}" if len(knob) < 28 else f"  {knob}\n  {'':<28}{text}")
    for group in groups:
        if group not in shown and _options(group):
            lines.append(f"  {group}={_options(group)}")
    lines += ["", "  --cfg job                   print the composed config (every key); -m a,b sweeps a key",
              "  --help-config               Hydra's full help: every config group and the composed config",
              "", "examples:"]
    lines += [f"  {example}" for example in examples]
    return "\n".join(lines)
