"""The walls of docs/architecture.md, checked on the source (an import contract, as import-linter keeps it).

1. `pipeline/engine/` is the engine: it imports nothing of the product (the rest of `pipeline/`) and no stage.
2. `pipeline/` (engine and product) never imports `stages` and names no node of the graph files nor a stage's
   result; what it must know of them is data in `conf/` (graph files, `api.yaml`, `summary.yaml`, `eval` refs).
3. A stage module imports only the engine's contract (`CONTRACT`) and `stages.common`, never another stage;
   `stages/common` imports no stage either.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline import CONF_DIR, PROJECT_ROOT
from pipeline.engine.records import Telemetry

# what a stage may import from the framework: the stage contract, its errors, atomic cache writes, the
# process-wide resources (the shared model handle) and the records it writes (telemetry)
CONTRACT = {"pipeline.engine.stage", "pipeline.engine.errors", "pipeline.engine.cache", "pipeline.engine.resources",
            "pipeline.engine.records"}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``source`` (function-level ones too; relative ones resolved)."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            # `from pipeline import resources` imports the module pipeline.engine.resources
            found += [(node.lineno, name if name in CONTRACT or name.startswith("stages.") else base) for name in names]
    return found


def wall_violations(path: Path, source: str | None = None) -> list[str]:
    rel = path.relative_to(PROJECT_ROOT)
    module = ".".join(rel.with_suffix("").parts)
    source = path.read_text(encoding="utf-8") if source is None else source
    problems = []
    for line, name in imported_modules(source, module):
        where = f"{rel}:{line} imports {name}"
        if rel.parts[0] == "pipeline" and (name == "stages" or name.startswith("stages.")):
            problems.append(f"{where}: the framework never imports a stage")
        if rel.parts[:2] == ("pipeline", "engine") and (name == "pipeline" or name.startswith("pipeline.")) \
                and not (name == "pipeline.engine" or name.startswith("pipeline.engine.")):
            problems.append(f"{where}: the engine imports nothing of the product")
        if rel.parts[0] == "stages":
            if (name == "pipeline" or name.startswith("pipeline.")) and name not in CONTRACT:
                problems.append(f"{where}: a stage imports only {sorted(CONTRACT)} of the framework")
            other = name.split(".")[1] if name.startswith("stages.") and name.count(".") >= 1 else None
            own = rel.parts[1] if len(rel.parts) > 2 else rel.stem
            if other and other not in ("common", own) and other != "__init__":
                problems.append(f"{where}: a stage never imports another stage (shared code goes to stages/common)")
            if rel.parts[1] == "common" and other and other != "common":
                problems.append(f"{where}: stages/common is below every stage")
    return problems


def graph_names() -> tuple[set[str], set[str]]:
    """Every node of the graph files, and every `node.port` they wire."""
    nodes, refs = set(), set()
    for path in (CONF_DIR / "pipeline").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for name, node in (spec.get("nodes") or {}).items():
            nodes.add(name)
            refs.update(str(v) for v in ((node or {}).get("in") or {}).values())
        if spec.get("result"):
            refs.add(str(spec["result"]))
    return nodes, {r for r in refs if not r.startswith("inputs.")}


def stage_results() -> set[str]:
    """The stages' result names the framework shows (conf/summary.yaml), which it must not spell itself."""
    data = yaml.safe_load((CONF_DIR / "summary.yaml").read_text(encoding="utf-8"))
    names = {c for c in data["key_columns"] + data["preferred_metrics"] if "*" not in c and c not in ("status",)}
    return names | set(data["sources"])


def naming_violations(path: Path, source: str | None = None) -> list[str]:
    rel = path.relative_to(PROJECT_ROOT)
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    nodes, refs = graph_names()
    # the framework's own trace, and the fields of the typed telemetry record (the contract both sides read)
    fields = {f.name for f in dataclasses.fields(Telemetry)}
    results = stage_results() - {"trace.seconds"} - fields
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and ast.get_docstring(n, clean=False) is not None}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "output":
            if node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in nodes:
                problems.append(f"{rel}:{node.lineno} reads node '{node.args[0].value}' by name")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text in refs or (re.fullmatch(r"\w+\.\w+", text) and text.split(".")[0] in nodes - {"report"}
                                and not text.endswith((".json", ".yaml", ".html", ".csv", ".png"))):
                problems.append(f"{rel}:{node.lineno} names the port '{text}'")
            elif text in results:
                problems.append(f"{rel}:{node.lineno} names the stage result '{text}' (belongs in conf/summary.yaml)")
    return problems


FRAMEWORK = sorted((PROJECT_ROOT / "pipeline").rglob("*.py"))
STAGES = sorted((PROJECT_ROOT / "stages").rglob("*.py"))


@pytest.mark.parametrize("path", FRAMEWORK + STAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_imports_keep_the_walls(path):
    assert wall_violations(path) == []


@pytest.mark.parametrize("path", FRAMEWORK, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_framework_names_no_node_and_no_stage_result(path):
    assert naming_violations(path) == []


def test_the_checks_catch_what_they_forbid():
    """Each rule flags a planted violation (else the two tests above could pass by checking nothing)."""
    framework, stage, common = (PROJECT_ROOT / p for p in ("pipeline/app.py", "stages/decode.py", "stages/common/program/text.py"))
    assert wall_violations(framework, "def f():\n    from stages.decode import Decode\n")
    assert wall_violations(framework, "import stages.common.program.text\n")
    assert wall_violations(stage, "from pipeline.app import run_config\n")
    assert wall_violations(stage, "from pipeline import api\n")
    assert wall_violations(stage, "from stages.cite import CheckCitations\n")
    assert wall_violations(common, "from stages.pack import PackEvidence\n")
    assert wall_violations(common, "from ...cite import X\n")
    assert wall_violations(stage, "from pipeline import resources\n")
    assert not wall_violations(stage, "from pipeline.engine import resources\nfrom stages.common.program.text import x\n")
    engine = PROJECT_ROOT / "pipeline/engine/execute.py"
    assert wall_violations(engine, "from pipeline.report import write_run_report\n")
    assert wall_violations(engine, "from pipeline import CONF_DIR\n")
    assert wall_violations(engine, "def f():\n    from ..app import run_config\n")
    assert not wall_violations(engine, "from pipeline.engine.errors import ConfigError\nfrom .stage import Stage\n")
    assert not wall_violations(stage, "from pipeline.engine.stage import Stage\nfrom .common import text\n")
    assert naming_violations(framework, 'sel = result.output("rescore", "selection")\n')
    assert naming_violations(framework, 'ref = "rescore.selection"\n')
    assert naming_violations(framework, 'cols = ["ppl.mixed"]\n')
    assert not naming_violations(framework, '"""rescore.selection in a docstring is prose"""\nx = "trace.json"\n')


def test_retrieve_api_reads_its_graph_and_refs_from_conf(tmp_path, make_tree):
    """pipeline.retrieve runs the graph conf/api.yaml names and returns what its `selection` ref points at."""
    import pipeline

    program = make_tree(tmp_path / "prog", {"kettle.py": "def boil_water(litres):\n    return litres * 4.2\n",
                                            "cup.py": "class Cup:\n    def fill(self, water):\n        return water\n"})
    found = pipeline.retrieve(str(program), "how is water boiled", model_id="tiny_random",
                              overrides=[f"paths.outputs={tmp_path / 'out'}", "select=question"])
    assert found["files_selected"][0] == "kettle.py"
    assert any(span["path"] == "kettle.py" for span in found["windows_packed"]), found["windows_packed"]
    assert "pack" in found["timings"]


def test_one_lora_path_for_mixing_and_fitting():
    """Fitting trains its factors through the mix's own hook (what it stores is what the mix computes): every forward
    hook the stages register is `mixing.lora_forward_hook`, and the mix, the fitting and the encoder adapter's fitting
    (stages/common/retrieval/encoder_fit.py) register one."""
    registering = {}
    for path in STAGES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith(
                    "register_forward"):
                hook = node.args[0] if node.args else None
                name = hook.func.id if isinstance(hook, ast.Call) and isinstance(hook.func, ast.Name) else ast.dump(hook)
                registering.setdefault(path.name, set()).add(name)
    assert registering == {"mixing.py": {"lora_forward_hook"}, "fitting.py": {"lora_forward_hook"},
                           "encoder_fit.py": {"lora_forward_hook"}}


STAGE_FILE_LINES, MODULE_LINES = 250, 400


def test_stage_files_read_as_contracts_and_modules_stay_small():
    """A stage file holds its stage's contract and calls into a subsystem; no module grows into a room of its own."""
    tools = sorted((PROJECT_ROOT / "tools").rglob("*.py")) + sorted((PROJECT_ROOT / "bench").rglob("*.py"))
    long = [f"{p.relative_to(PROJECT_ROOT)}: {n} lines" for p in FRAMEWORK + STAGES + tools
            if (n := p.read_text(encoding="utf-8").count("\n")) > (STAGE_FILE_LINES if p.parent.name == "stages"
                                                                    else MODULE_LINES)]
    assert not long, f"stage files over {STAGE_FILE_LINES} lines or modules over {MODULE_LINES}:\n" + "\n".join(long)
