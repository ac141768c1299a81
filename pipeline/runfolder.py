"""A run folder as files: its report settings, its JSON result files (a truncated one keeps its complete entries),
its telemetry as the typed record, its config, and the program lines its windows point at (never read outside the
program root).

Used by the report, the chat and the export app; it imports no stage and knows no stage by name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import CONF_DIR
from pipeline.engine.records import Telemetry

MAX_PROGRAM_FILE_BYTES = 4_000_000

CONFIG_ERRORS = (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException)


class ReportError(Exception):
    """A one-line, user-facing problem with the folder given."""


def default_settings() -> dict:
    cfg = OmegaConf.load(CONF_DIR / "report" / "html.yaml")
    cfg.program_root = None
    return OmegaConf.to_container(cfg, resolve=True)


def settings_of(config: DictConfig | None) -> dict:
    """The `report` section of a run's config, completed from the defaults (older runs have none)."""
    settings = default_settings()
    section = config.get("report") if config is not None else None
    if isinstance(section, DictConfig):
        for key in section:
            try:
                value = section[key]
                settings[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) or \
                    OmegaConf.is_list(value) else value
            except OmegaConfBaseException:  # an interpolation that no longer resolves: keep the default
                pass
    if not settings.get("program_root") and config is not None:
        try:
            settings["program_root"] = OmegaConf.select(config, "program_root", throw_on_resolution_failure=True)
        except OmegaConfBaseException:  # e.g. a resolver this process does not know: no code is shown
            settings["program_root"] = None
    return settings


def salvage_object(text: str) -> tuple[dict, int]:
    """The complete top-level entries of a truncated JSON object, and where reading stopped."""
    decoder = json.JSONDecoder()
    out: dict = {}
    pos = text.find("{") + 1
    while True:
        pos = _skip(text, pos, ",")
        try:
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip(text, pos, ":")
            value, pos = decoder.raw_decode(text, pos)
        except (ValueError, IndexError):
            return out, pos
        if isinstance(key, str):
            out[key] = value


def _skip(text: str, pos: int, sep: str) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] == sep):
        pos += 1
    return pos


def read_json(path: Path) -> tuple[Any, str | None]:
    """(data, problem): a missing file is (None, 'missing'); a truncated object keeps its complete entries."""
    if not path.is_file():
        return None, "missing"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return None, f"unreadable ({err.strerror or err})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{"):
            data, stop = salvage_object(text)
            return data, (f"truncated or invalid at character {err.pos} of {len(text)} ({err.msg}); "
                          f"showing the {len(data)} complete entries before it")
        return None, f"not JSON ({err.msg} at character {err.pos})"


def is_run_folder(folder: Path, settings: dict | None = None) -> bool:
    names = (settings or default_settings())["files"].values()
    return any((folder / name).is_file() for name in names) or (folder / ".hydra" / "config.yaml").is_file()


def is_sweep_folder(folder: Path) -> bool:
    return (folder / "multirun.yaml").is_file() or any(
        p.parent.parent != folder for p in folder.glob("*/.hydra/overrides.yaml"))


def interrupt_notes(folder: Path, settings: dict) -> list[str]:
    """What the nodes that still ran after a Ctrl-C put right: the words `after_interrupt` (conf/report/html.yaml)
    gives each node output that is true in the folder's trace."""
    trace, _ = read_json(folder / settings["files"]["trace"])
    rows = trace.get("nodes") if isinstance(trace, dict) else None
    ran = {str(n.get("node")): n.get("outputs") or {} for n in rows or [] if isinstance(n, dict) and n.get("status") == "ok"}
    notes = []
    for node, said in (settings.get("after_interrupt") or {}).items():
        outputs = ran.get(str(node))
        if isinstance(outputs, dict) and isinstance(said, dict):
            notes += [str(words) for output, words in said.items() if outputs.get(output) is True]
    return notes


# ------------------------------------------------------------------------------------------------- a run


@dataclasses.dataclass
class RunFolder:
    folder: Path
    settings: dict
    config: DictConfig | None
    data: dict[str, Any]  # role (telemetry, trace, ...) -> parsed file
    problems: dict[str, str]  # file name -> what is wrong with it
    record: Telemetry | None = None  # the telemetry file read as its record (None: the run wrote none)

    @classmethod
    def load(cls, folder: Path, settings: dict | None = None) -> RunFolder:
        folder = Path(folder)
        if not folder.is_dir():
            raise ReportError(f"'{folder}' is not a folder (pass a run folder such as outputs/runs/<date>/<time>)")
        config, bad_config = None, None
        config_file = folder / ".hydra" / "config.yaml"
        if config_file.is_file():
            try:
                config = OmegaConf.load(config_file)
            except CONFIG_ERRORS as err:  # a broken config is reported, the rest still renders
                bad_config = str(err).splitlines()[0] if str(err) else type(err).__name__
        settings = settings or settings_of(config)
        if not is_run_folder(folder, settings):
            files = ", ".join(settings["files"].values())
            raise ReportError(f"'{folder}' is not a run folder: it has none of {files} and no .hydra/config.yaml")
        data, problems = {}, {}
        for role, name in settings["files"].items():
            value, problem = read_json(folder / name)
            if value is not None and not isinstance(value, dict):
                value, problem = None, f"holds a {type(value).__name__}, not an object"
            if value is not None:
                data[role] = value
            if problem:
                problems[name] = problem
        record = _record(data.get("telemetry"), settings["files"].get("telemetry"), problems)
        if bad_config:
            problems[".hydra/config.yaml"] = f"unreadable ({bad_config})"
        runtime_cwd = _runtime_cwd(folder)
        root = settings.get("program_root")
        if root and runtime_cwd and not Path(root).is_absolute():
            settings = {**settings, "program_root": str(Path(runtime_cwd) / root)}
        return cls(folder, settings, config, data, problems, record)

    @property
    def telemetry(self) -> dict:
        """The telemetry file as it is (older runs may hold keys the record has no field for)."""
        return self.data.get("telemetry") or {}

    @property
    def trace(self) -> dict:
        return self.data.get("trace") or {}

    def grounded(self) -> bool | None:
        """The record's `grounded` when it has one, else whether any citation is valid; None without telemetry."""
        if self.record is None:
            return None
        if self.record.grounded is not None:
            return self.record.grounded
        return any(c.valid for c in self.record.citations)

    def found(self) -> bool | None:
        """Whether the answer rests on the program's code: grounded, or not grounded only for what its text is (cut,
        degenerate, a contradicted claim) while its citations passed; the chat shows such an answer with its why."""
        grounded = self.grounded()
        if grounded or self.record is None:
            return grounded
        return bool(self.record.not_grounded) and "citations" not in self.record.not_grounded


def _record(data: dict | None, name: str | None, problems: dict[str, str]) -> Telemetry | None:
    """The telemetry as its record; an entry of the wrong type is named in ``problems`` and left at its default."""
    if not data:
        return None
    try:
        return Telemetry.from_json(data)
    except ValueError as err:
        shown = name or "telemetry"
        problems[shown] = "; ".join(p for p in (problems.get(shown), str(err)) if p)
        return Telemetry.from_json(data, strict=False)


def _runtime_cwd(folder: Path) -> str | None:
    """The folder the run was started from (relative program roots are relative to it)."""
    hydra_file = folder / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    match = re.search(r"^\s+cwd: (.+)$", hydra_file.read_text(errors="replace"), re.MULTILINE)
    return match.group(1).strip() if match else None


def read_lines(root: str | Path | None, path: str, start: int, end: int,
               sha256: str | None = None) -> tuple[list[str] | None, str]:
    """Lines start..end of a program file and a note, or (None, why not). Only regular files inside the root are
    read. With the file's ``sha256`` at the time of the run, a file changed since then is noted."""
    if not root:
        return None, "the program root is unknown"
    try:
        base = Path(root).resolve(strict=True)
        if base.is_file():  # a one-file program: its file, by the name the index gave it, and nothing beside it
            if path != base.name:
                return None, f"{path} is not the program's one file {base.name}"
            base = base.parent
        target = (base / path).resolve(strict=True)
    except (OSError, RuntimeError):
        return None, f"{path} is not in {root} any more"
    if not target.is_relative_to(base) or not target.is_file():
        return None, f"{path} is not a file inside the program root"
    if target.stat().st_size > MAX_PROGRAM_FILE_BYTES:
        return None, f"{path} is larger than {MAX_PROGRAM_FILE_BYTES} bytes"
    data = target.read_bytes()
    note = ""
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        note = f"{path} changed since the run: these lines may not be the ones the model was shown"
    # lines are counted the way the index counts them (str.splitlines), so windows and citations line up
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start < 1 or start > len(lines):
        return None, f"{path} has {len(lines)} lines now, the window starts at {start}"
    return lines[start - 1:end], note


def artifact_manifests(run: RunFolder) -> list[tuple[Path, dict]]:
    """manifest.json of any folder a node reported (`path` in an output summary), e.g. the build artifacts."""
    found: dict[Path, dict] = {}
    for n in run.trace.get("nodes") or []:
        for out in (n.get("outputs") or {}).values() if isinstance(n, dict) else []:
            path = out.get("path") if isinstance(out, dict) else None
            if isinstance(path, str) and (Path(path) / "manifest.json").is_file() and Path(path) not in found:
                data, _ = read_json(Path(path) / "manifest.json")
                if isinstance(data, dict):
                    found[Path(path)] = data
    return list(found.items())


def source_hashes(run: RunFolder) -> dict[str, str]:
    """path -> sha256 of every program file as the run saw it (the build artifacts' sources.jsonl), if found."""
    for folder, _ in artifact_manifests(run):
        sources = folder / "sources.jsonl"
        if sources.is_file():
            hashes = {}
            for line in sources.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("path"), str):
                    hashes[record["path"]] = str(record.get("sha256", ""))
            return hashes
    return {}
