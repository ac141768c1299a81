"""Shared fixtures of the test suite.

- ``compose(*overrides)``: the project's Hydra config composed with the compose API (no app, no run folder).
- ``make_tree(root, {path: text|bytes})``: write a small program tree.
- ``tiny_lm``: the in-process 2-layer random Llama (``model=tiny_random``), loaded once per session.
- ``project_index``: this project's own source indexed with the ``conf/index/default.yaml`` ignore list.

Tests that name no model run SmolLM2-135M (``TEST_MODEL``), not the default Qwen2.5-Coder-0.5B: `compose`,
`call_main` and `run_cli` add ``model=smollm2`` when the overrides name no model (four times fewer weights: the suite
stays near ten minutes). A test of the default model itself names it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import subprocess
import sys
from pathlib import Path

# One torch thread for this process and (inherited) its CLI subprocesses: the tests weigh the work, not the thread
# pool's contention (under load the fast suite took 305 s with torch's default threads, 178 s with one; on a quiet
# machine the whole suite took 11.1 min pinned, 10.6 min with the default). The slow tests (the real model, the soak) get every core back
# (`_slow_tests_use_every_core`: 181 s on one thread, 146 s on two, quiet). An OMP_NUM_THREADS you set wins.
if not os.environ.get("OMP_NUM_THREADS", "").strip():  # set but empty counts as not set (setdefault keeps "")
    os.environ.pop("OMP_NUM_THREADS", None)
os.environ.setdefault("PCA_TEST_THREADS_GIVEN", os.environ.get("OMP_NUM_THREADS", ""))  # before the pin below
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

import pipeline  # registers the `project_root` resolver
from pipeline.engine import resources

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
PROJECT_ROOT = pipeline.PROJECT_ROOT
CONF_DIR = pipeline.CONF_DIR


@pytest.fixture(autouse=True)
def _slow_tests_use_every_core(request, monkeypatch):
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    pinned = torch.get_num_threads()
    given = os.environ["PCA_TEST_THREADS_GIVEN"]
    if given:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    else:  # the CLI subprocesses too
        monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(int(given) if given else len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(pinned)


TEST_MODEL = "model=smollm2"


def with_test_model(args: list[str] | tuple[str, ...]) -> list[str]:
    """``args`` with `TEST_MODEL` last when no argument chooses a model (`model=...`, `~model`, `+model=...`); last,
    because an override before a flag such as `--cfg job` ends argparse's positionals."""
    chosen = any(a.lstrip("+~").split("=", 1)[0] == "model" for a in args if isinstance(a, str))
    composes_nothing = {"--help", "-h", "--info", "--hydra-help", "--version", "--shell-completion"} & set(args)
    return list(args) if chosen or composes_nothing else [*args, TEST_MODEL]


@functools.cache
def _composed_config(overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=with_test_model(overrides))


def compose_config(*overrides: str):
    """Composed once per set of overrides (~0.2 s each), a fresh copy for each caller: a test may change its own."""
    return copy.deepcopy(_composed_config(overrides))


@pytest.fixture
def compose():
    return compose_config


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


@pytest.fixture(scope="session")
def make_tree():
    return write_tree


def index_tree(root: Path, files: dict[str, str | bytes]):
    """Write ``files`` under ``root`` and index them with the index stage's defaults (no cache)."""
    from stages.common.program.indexing import build_index

    return build_index(str(write_tree(root, files)), [], 1_000_000, 80, None)


@pytest.fixture(scope="session")
def make_index():
    return index_tree


@pytest.fixture(scope="session")
def tiny_lm():
    """The `model=tiny_random` language model, built through its stage (so the test uses the real config)."""
    graph_cfg = compose_config("model=tiny_random")
    from pipeline.engine.graph import build_graph

    graph = build_graph(graph_cfg).instantiate()
    return graph.nodes["model"].stage.run()["lm"]


@pytest.fixture(scope="session")
def project_index(tmp_path_factory):
    """This project's source, indexed by the `index` node of the default config (cache in a temp folder)."""
    from pipeline.engine.graph import build_graph

    cache = tmp_path_factory.mktemp("index-cache")
    cfg = compose_config(f"index.cache_dir={cache}")
    stage = build_graph(cfg).instantiate().nodes["index"].stage
    return stage.run(program_root=str(PROJECT_ROOT))["index"]


@pytest.fixture
def fresh_index_memory():
    """Forget the in-process program indexes before and after a test that counts parses."""
    resources.clear("program-index")
    yield
    resources.clear("program-index")


# Hydra composes the whole config twice a command, once only to read hydra.mode (Hydra.get_mode swallows its errors),
# which only the primary config, hydra.* keys or an experiment set: composed for real once per such set of overrides
_MODES: dict = {}


def _mode_composed_once(real_get_mode):
    def get_mode(self, config_name, overrides):
        keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        key = (config_name, tuple(o for o, k in zip(overrides, keys) if ("hydra" in k or "experiment" in k)
                                  and k not in ("hydra.run.dir", "hydra.sweep.dir")))
        if key not in _MODES:
            _MODES[key] = real_get_mode(self, config_name=config_name, overrides=overrides)
        return _MODES[key]

    return get_mode


def call_main(main, args: list[str], prog: str = "pipeline.run") -> tuple[int, str, str]:
    """`python -m <prog> <args>` in this process (a loaded model stays loaded): exit code, stdout, stderr."""
    from hydra._internal.hydra import Hydra

    argv, sys.argv = sys.argv, [prog, *(with_test_model(args) if prog.startswith("pipeline.") else args)]
    real_get_mode, Hydra.get_mode = Hydra.get_mode, _mode_composed_once(Hydra.get_mode)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        Hydra.get_mode = real_get_mode
    return code, out.getvalue(), err.getvalue()


def run_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline.run <args>` in a subprocess, from the project root."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return subprocess.run([sys.executable, "-m", "pipeline.run", *with_test_model(args)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (SmolLM2), read once from the GGUF and kept as tokenizer files under
    outputs/cache/tokenizers (loading it from the GGUF takes 15-40 s; from the files, well under a second)."""
    import importlib.util

    from transformers import AutoTokenizer

    cfg = compose_config()
    spec = importlib.util.find_spec(cfg.model.package)
    gguf = Path(spec.origin).parent / cfg.model.gguf_file
    saved = PROJECT_ROOT / "outputs" / "cache" / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (saved / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        from pipeline.engine.cache import publish_dir

        with publish_dir(saved) as tmp:
            tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(saved)


KETTLE = {
    "kettle.py": (
        '"""Kettle control."""\n\n\n'
        "def boil_water(litres):\n"
        "    return heat(litres, target=100)\n\n\n"
        "def heat(amount, target):\n"
        "    return amount * target\n\n\n"
        "class Kettle:\n"
        "    def descale(self):\n"
        "        return self\n"
    ),
    "dir with space/cup é.py": "class Cup:\n    \"\"\"A cup.\"\"\"\n\n    def fill(self, water):\n        return water\n",
}


@pytest.fixture(scope="session")
def index_with_windows(tmp_path_factory):
    """A small program (a path with a space and a non-ASCII letter too) and every window of it packed."""
    from stages.common.types import Evidence, PackedWindow

    index = index_tree(tmp_path_factory.mktemp("kettle"), KETTLE)
    windows = [PackedWindow(w.path, w.start, w.end, "\n".join(index.lines(w.path)[w.start - 1:w.end]))
               for w in index.windows if w.kind != "head"]
    return index, Evidence(windows, 0)


def generation(text: str, prompt_tokens: int = 5, generated_tokens: int = 5, seconds: float = 0.0):
    """What `stages.decode.generate` returns (a Draft), for tests that replace the model's decoding with a fixed text."""
    from stages.common.types import Draft

    return Draft(text, prompt_tokens, generated_tokens, seconds, "cpu")


# a small documented program whose questions have one right answer each (retrieval and eval tests)
KETTLE_PROGRAM = {
    "kettle.py": (
        "def boil_water(litres):\n"
        '    """Boil the given litres of water until the kettle whistles."""\n'
        "    temperature = 100\n"
        "    return litres * temperature\n\n\n"
        "def pour_water(cup, amount):\n"
        '    """Pour some water from the kettle into a cup."""\n'
        "    return cup + amount\n\n\n"
        "class Descaler:\n"
        '    """Remove lime scale from the heating element."""\n\n'
        "    def run(self, kettle, vinegar):\n"
        '        """Run one descaling cycle with vinegar."""\n'
        "        return kettle - vinegar\n"
    ),
    "cup.py": (
        "def fill_cup(cup, water):\n"
        '    """Fill the cup with water up to its brim."""\n'
        "    return water\n\n\n"
        "def empty_cup(cup, sink):\n"
        '    """Empty the cup into the sink and rinse it."""\n'
        "    return sink\n"
    ),
    "garden/hose.py": (
        "def water_plants(plants, hose):\n"
        '    """Water every plant in the garden with the hose."""\n'
        "    return [hose(p) for p in plants]\n"
    ),
}


def evaluate(base, program, questions, *overrides, run_dir):
    """The eval graph with the tiny model over ``questions``: (value, RunResult, eval.json)."""
    import json

    from pipeline.api import run

    args = ["pipeline=eval", "model=tiny_random", f"program_root={program}", f"questions={questions}",
            f"paths.outputs={base / 'outputs'}", "eval.progress=false", *overrides]
    value, result = run(args, run_dir=run_dir)
    return value, result, json.loads((run_dir / "eval.json").read_text())
