"""Sweeps (docs/behaviour.md §8) in-process: the model is loaded once and reused by every job; the experiment presets compose."""
from __future__ import annotations

import itertools

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from pipeline import CONF_DIR, PROJECT_ROOT
from pipeline.app import run_config
from pipeline.engine import resources
from pipeline.engine.graph import build_graph


def compose(overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra)


def test_jobs_of_a_sweep_share_one_loaded_model(tmp_path, make_tree):
    # a small program: select=hybrid embeds every window cold (~10 s on one thread for this project's pipeline/)
    program = make_tree(tmp_path / "prog", {f"pkg/m{i}.py": f"def add_{i}(a, b):\n    return a + b + {i}\n"
                                            for i in range(10)})
    jobs = [["rerank=heuristic", "select.top_k=4"], ["rerank=none", "select.top_k=4"],
            ["rerank=heuristic", "select.top_k=8"], ["rerank=none", "pack=heads"]]
    before = resources.stats("model")
    models = []
    for number, job in enumerate(jobs):
        overrides = ["pipeline=retrieve", "model=tiny_random", f"program_root={program}", "prompt=how does add work",
                     f"paths.outputs={tmp_path / 'out'}", *job]
        result = run_config(compose(overrides), tmp_path / str(number), overrides)
        models.append(result.output("model", "lm"))
        assert (tmp_path / str(number) / "trace.json").is_file()
    after = resources.stats("model")
    assert all(lm is models[0] for lm in models)  # the very same object in every job
    assert after["misses"] - before["misses"] <= 1  # built at most once (not at all if an earlier test built it)
    assert after["hits"] - before["hits"] >= len(jobs) - 1


def sweep_choices(params: dict) -> list[list[str]]:
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        override = parser.parse_overrides([f"{key}={value}"])[0]
        axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
    return [list(combo) for combo in itertools.product(*axes)]


def test_ablations_preset_is_a_36_job_grid_of_valid_graphs():
    cfg = compose(["experiment=ablations"], hydra=True)
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == {"mix.ablate", "rerank", "pack", "capacity"}
    assert len(sweep_choices(params)) == 36
    for axis in params:  # every value of every axis composes and validates (nothing runs, no model loads)
        for (choice,) in sweep_choices({axis: params[axis]}):
            graph = build_graph(compose(["experiment=ablations", choice]))
            assert "mix" in graph.nodes and "pack" in graph.nodes
    ablated = compose(["experiment=ablations", "mix.ablate=[attn]", "capacity=entropy"])
    assert list(ablated.mix.ablate) == ["attn"] and ablated.capacity._target_.endswith("EntropyCapacity")


def test_experiment_presets_can_override_the_defaults():
    plain = compose([])
    assert plain.pipeline.name == "answer"
    grid = compose(["experiment=retrieval_grid"], hydra=True)
    assert grid.pipeline.name == "eval" and grid.eval.mode == "retrieval"
    assert set(grid.hydra.sweeper.params) == {"rerank", "select.top_k", "pack.second_window_weight"}
    for job in sweep_choices(dict(grid.hydra.sweeper.params)):
        build_graph(compose(["experiment=retrieval_grid", *job]))


def test_optuna_preset_returns_a_float_metric():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose(["experiment=tune_retrieval"], hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.hydra.sweeper.storage is None  # in-memory study
    graph = build_graph(cfg)
    assert graph.result == ("report", "metric") and graph.nodes["report"].stage_cls.outputs["metric"] is float


def _answer(tmp_path, name: str, *job: str, sweep: bool = True):
    overrides = ["model=tiny_random", "synth=hashed", "select=question", f"program_root={PROJECT_ROOT / 'pipeline'}",
                 f"paths.outputs={tmp_path}", "prompt=How is a stage run?", "decode.max_new_tokens=4",
                 "decode.min_new_tokens=4", "fallback.max_new_tokens_floor=4", *job]
    result = run_config(compose(overrides), tmp_path / name, overrides, sweep=sweep)
    return result.output("decode", "draft")


def test_a_sweep_over_decoding_reuses_the_prompt_cache_of_the_job_before(tmp_path):
    """Jobs that differ only in how they decode (same model, same mix, same prompt) take the first job's prompt
    cache and lead scores; the drafts are the ones each job writes when it encodes the prompt itself."""
    resources.clear("prompt-prefill")
    first = _answer(tmp_path, "a", "decode.repetition_penalty=1.1")
    second = _answer(tmp_path, "b", "decode.repetition_penalty=1.3")
    third = _answer(tmp_path, "c", "decode.repetition_penalty=1.3", "decode.reuse_prefill=false")
    alone = _answer(tmp_path, "d", "decode.repetition_penalty=1.3", sweep=False)
    assert first.lead["prefill_reused"] is False and second.lead["prefill_reused"] is True
    assert third.lead["prefill_reused"] is False and alone.lead["prefill_reused"] is False
    assert second.text == third.text == alone.text and second.lead == {**third.lead, "prefill_reused": True}
    assert resources.stats("prompt-prefill")["hits"] == 1


@pytest.mark.parametrize("change", ["mix.alpha=4", "prompt=How is a graph validated?", "synth=none"])
def test_a_job_with_other_weights_or_another_prompt_encodes_its_own(tmp_path, change):
    resources.clear("prompt-prefill")
    _answer(tmp_path, "a")
    draft = _answer(tmp_path, "b", change)
    assert draft.lead["prefill_reused"] is False


@pytest.mark.parametrize("lead", ["likelihood", "greedy"])  # the prompt encoded by choose_lead / before generate
def test_a_prompt_encoded_in_chunks_writes_the_same_answer(tmp_path, lead):
    whole = _answer(tmp_path, "a", f"decode.lead={lead}", "decode.prefill_chunk=null", sweep=False)
    chunked = _answer(tmp_path, "b", f"decode.lead={lead}", "decode.prefill_chunk=16", sweep=False)
    assert whole.prompt_tokens > 3 * 16
    assert chunked.text == whole.text and chunked.lead.get("lead") == whole.lead.get("lead")
