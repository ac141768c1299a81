"""Python API (docs/behaviour.md §7): keyword knobs -> Hydra overrides -> the same graph the CLI runs.

The knob table lives in `conf/api.yaml` (data, not code), so the framework still names no stage.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline import CONF_DIR
from pipeline.answer import Answer, answer_of
from pipeline.app import result_value, run_config
from pipeline.callbacks import folders_to_make
from pipeline.cli import keyless, text_override_value
from pipeline.engine.errors import ConfigError
from pipeline.engine.execute import RunResult
from pipeline.runfolder import settings_of

_COMPOSE = threading.Lock()

def _literal(value: Any) -> str:
    """A value in Hydra's override grammar (strings quoted, so commas and spaces survive)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in value.items()) + "}"
    # a prompt about OmegaConf ("what does ${x} do?") is text, not an interpolation; quotes and backslashes too
    return text_override_value(str(value))


def knob_overrides(knobs: dict[str, Any], table: dict | None = None) -> list[str]:
    """Translate docs/behaviour.md §7 keywords into Hydra overrides; an unknown keyword is a ConfigError listing the known."""
    table = table or OmegaConf.to_container(OmegaConf.load(CONF_DIR / "api.yaml"), resolve=False)
    spec = table["knobs"]
    overrides: list[str] = []
    appended: dict[str, list] = {}
    for name, value in knobs.items():
        if name not in spec:
            raise ConfigError(f"unknown keyword '{name}'; known: {', '.join(sorted(spec))}")
        rule = spec[name]
        if isinstance(rule, str):
            overrides.append(f"++{rule}={_literal(value)}")
        elif "group" in rule:
            values = {str(k).lower(): v for k, v in (rule.get("values") or {}).items()}
            key = str(value).lower() if isinstance(value, bool) else str(value)
            if isinstance(value, bool) and key not in values:
                continue  # e.g. function_first=False: leave the default choice
            overrides.append(f"{rule['group']}={values.get(key, value)}")
        elif "append" in rule:
            appended.setdefault(rule["append"], [])
            if value:
                appended[rule["append"]].append(rule["value"])
    for key, items in appended.items():
        overrides.append(f"++{key}={_literal(items)}")
    return overrides


def model_overrides(model_id: str | None, table: dict | None = None) -> list[str]:
    table = table or OmegaConf.to_container(OmegaConf.load(CONF_DIR / "api.yaml"), resolve=False)
    if not model_id:
        return []
    if model_id in table["models"]:
        return [f"model={table['models'][model_id]}"]
    local = table["local_model"]
    return [f"{local['group']}={local['option']}", f"++{local['key']}={_literal(str(model_id))}"]


def compose(overrides: list[str], config_name: str = "config"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    problem = keyless(overrides)
    if problem:
        raise ConfigError(problem)
    with _COMPOSE:  # Hydra keeps one GlobalHydra per process: threads take turns
        outer = GlobalHydra.instance().hydra
        # whatever app is running (the user's own @hydra.main, or ours), compose *our* config beside it
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                return hydra_compose(config_name, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(str(err).splitlines()[0]) from err
        finally:
            GlobalHydra.instance().hydra = outer


def run(overrides: list[str], run_dir: str | Path | None = None, verbose: bool = False,
        config_name: str = "config") -> tuple[Any, RunResult]:
    """Compose the config with ``overrides`` and run its graph; returns (result value, RunResult)."""
    value, result, _ = run_composed(compose(overrides, config_name), overrides, run_dir, verbose)
    return value, result


def run_composed(cfg: Any, overrides: list[str], run_dir: str | Path | None = None,
                 verbose: bool = False) -> tuple[Any, RunResult, Path]:
    """Run the graph of the composed ``cfg``; returns (result value, RunResult, run folder). A run folder made here
    that is still empty when the run fails (it failed before any node ran) is removed, with the folders made for it."""
    made: list[Path] = []
    if run_dir is None:
        base = Path(str(cfg.paths.outputs)) / "api"
        made = folders_to_make(str(base))
        base.mkdir(parents=True, exist_ok=True)
        run_dir = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base)
        made.insert(0, Path(run_dir))
    logging.getLogger("pipeline").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        result = run_config(cfg, run_dir, overrides)
    except BaseException:
        for folder in made:  # deepest first; one that holds anything (a node ran, another run) stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return result_value(cfg, result), result, Path(run_dir)


def _check_arg(name: str, value: Any, what: str, required: bool = False) -> None:
    """A one-line ConfigError for an argument of the wrong kind (a list as model_id, None as the prompt)."""
    if value is None and not required:
        return
    ok = isinstance(value, str) if name == "prompt" else isinstance(value, (str, os.PathLike))
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigError(f"{name} must be {what}, got {type(value).__name__} {shown}")


def generate_answer(model_id: str | None = None, adapters_npz: str | None = None, program_root: str | None = None,
                    prompt: str | None = None, *, overrides: Sequence[str] = (), verbose: bool = False,
                    **knobs: Any) -> Answer:
    """Answer ``prompt`` about the program at ``program_root``; every docs/behaviour.md §7 knob is a keyword.

    Returns an `Answer` (pipeline/answer.py): ``str(answer)`` is the text; its citations carry their code.
    ``model_id``: "qwen_coder_0_5b", "smollm2", "tiny_random", a local checkpoint folder or a .gguf file; None: the
    config's model (Qwen2.5-Coder-0.5B).
    ``adapters_npz``: an artifact folder (or its adapters.npz); None builds or reuses the cached one.
    ``overrides``: any further Hydra overrides, e.g. ["synth=fitted"].
    """
    _check_arg("model_id", model_id, "a short name (qwen_coder_1_5b, qwen_coder_0_5b, smollm2, tiny_random), a local folder or a .gguf path")
    _check_arg("adapters_npz", adapters_npz, "an artifact folder or an .npz path")
    _check_arg("program_root", program_root, "a folder path")
    _check_arg("prompt", prompt, "the question, a string", required=True)
    args = model_overrides(None if model_id is None else str(model_id))
    if adapters_npz:
        args.append(f"adapters={_literal(str(adapters_npz))}")
    if program_root is not None:
        args.append(f"program_root={_literal(str(program_root))}")
    if prompt is not None:
        args.append(f"prompt={_literal(prompt)}")
    args += knob_overrides(knobs) + list(overrides)
    cfg = compose(args)
    value, _, run_dir = run_composed(cfg, args, verbose=verbose)
    return answer_of(value, run_dir, settings_of(cfg))


def retrieve(program_root: str, prompt: str, *, model_id: str | None = None, overrides: Sequence[str] = (),
             **knobs: Any) -> dict[str, Any]:
    """The retrieval graph only (selection and packing, no decoding): files, packed windows and per-node timings."""
    _check_arg("program_root", program_root, "a folder path", required=True)
    _check_arg("prompt", prompt, "the question, a string", required=True)
    _check_arg("model_id", model_id, "a short name (qwen_coder_1_5b, qwen_coder_0_5b, smollm2, tiny_random), a local folder or a .gguf path")
    model_id = None if model_id is None else str(model_id)
    table = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "api.yaml"), resolve=False)
    graph = table["retrieve"]
    args = [f"pipeline={graph['graph']}", *model_overrides(model_id, table), f"program_root={_literal(str(program_root))}",
            f"prompt={_literal(prompt)}", *knob_overrides(knobs, table), *overrides]
    evidence, result = run(args)
    selection = result.output(*str(graph["selection"]).split(".", 1))
    return {
        "files_selected": list(selection.files),
        "windows_packed": [w.span() for w in evidence.windows],
        "timings": {t.node: t.seconds for t in result.trace if t.status == "ok"},
    }
