"""Issue 3: build artifacts, capacity, target plan, mix/unmix exactness, fallback, PEFT export (tiny model)."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from conftest import generation

from pipeline import api
from stages.common.adapters.factors import infer_targets
from stages.common.types import LanguageModel, ProgramIndex, Selection

PROGRAM = {
    "pkg/__init__.py": "from .core import add\n",
    "pkg/core.py": 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n    return a + b\n\n\n'
                   'class Box:\n    """A box of things."""\n\n    def put(self, item):\n        return add(1, 2)\n',
    "pkg/util.py": "from pkg.core import add\n\n\ndef twice(x):\n    return add(x, x)\n",
    "tests/test_core.py": "from pkg.core import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n",
    "README.md": "# pkg\nA tiny package.\n",
}


def run(tmp_path: Path, *overrides: str, pipeline: str = "answer", tag: str = "run"):
    # synth=hashed first (the default mixes no adapter; a test's own synth= comes later and wins)
    args = [f"pipeline={pipeline}", "model=tiny_random", "synth=hashed", f"paths.outputs={tmp_path / 'out'}",
            "decode.max_new_tokens=6", "decode.min_new_tokens=0", *overrides]
    if pipeline == "answer":  # the stage-2 retry would otherwise decode 256 tokens
        args.append("fallback.max_new_tokens_floor=4")
    return api.run(args, run_dir=tmp_path / tag)


@pytest.fixture
def program(tmp_path, make_tree):
    return make_tree(tmp_path / "prog", PROGRAM)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


# --- build graph -------------------------------------------------------------------------------------------

def test_build_writes_readable_artifacts_and_is_deterministic(tmp_path, program):
    (program / ".git" / "refs" / "heads").mkdir(parents=True)
    (program / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (program / ".git" / "refs" / "heads" / "main").write_text("0123456789abcdef0123456789abcdef01234567\n")
    artifacts, result = run(tmp_path, f"program_root={program}", pipeline="build")
    folder = Path(str(artifacts))
    for name in ("embedding.npz", "adapters.npz", "manifest.json", "sources.jsonl", "windows.jsonl"):
        assert (folder / name).is_file(), name
    with np.load(folder / "adapters.npz", allow_pickle=False) as data:
        keys = set(data.files)
        assert {"L0.q_proj.A", "L0.q_proj.B", "L0.q_proj.gate", "L1.down_proj.A"} <= keys
        assert data["L0.q_proj.A"].shape == (64, 12) and data["L0.q_proj.B"].shape == (12, 64)
    with np.load(folder / "embedding.npz", allow_pickle=False) as data:
        assert data["z"].shape == (1536,) and data["z"].dtype == np.float32
        assert {"z_sym", "z_doc", "z_mod", "z_topo", "z_calls", "z_types", "z_tests", "z_text"} <= set(data.files)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rank"] == 12 and manifest["seed"] == 0 and manifest["num_layers"] == 2
    assert manifest["target_shapes"]["k_proj"] == [32, 64]  # GQA: kv_heads * head_dim rows
    assert manifest["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert manifest["file_count"] == len(PROGRAM)
    assert len((folder / "sources.jsonl").read_text().splitlines()) == len(PROGRAM)

    # the same program and config elsewhere -> byte-identical adapters.npz
    other = tmp_path / "second"
    again, _ = run(other, f"program_root={program}", pipeline="build")
    assert (Path(str(again)) / "adapters.npz").read_bytes() == (folder / "adapters.npz").read_bytes()


def test_unchanged_program_is_a_cache_hit_and_a_change_rebuilds(tmp_path, program):
    first, _ = run(tmp_path, f"program_root={program}", pipeline="build")
    second, result = run(tmp_path, f"program_root={program}", pipeline="build", tag="again")
    statuses = {t.node: t.status for t in result.trace}
    assert Path(str(first)) == Path(str(second))
    assert statuses["embed"] == statuses["synth"] == statuses["store"] == "skipped"
    (program / "pkg" / "util.py").write_text("def twice(x):\n    return x * 2\n")
    third, result = run(tmp_path, f"program_root={program}", pipeline="build", tag="changed")
    assert Path(str(third)) != Path(str(first))
    assert {t.node: t.status for t in result.trace}["synth"] == "ok"


def test_the_answer_graph_builds_missing_artifacts_first(tmp_path, program):
    _, result = run(tmp_path, f"program_root={program}", "prompt=how does add work")
    statuses = {t.node: t.status for t in result.trace}
    assert statuses["synth"] == statuses["store"] == statuses["mix"] == statuses["unmix"] == "ok"


# --- capacity ------------------------------------------------------------------------------------------------

def _synthetic_index(modules: int, import_edges: int) -> ProgramIndex:
    graph = nx.MultiDiGraph()
    files = {}
    for i in range(modules):
        graph.add_node(f"file:m{i}.py", kind="file", path=f"m{i}.py")
        graph.add_node(f"mod:m{i}", kind="module", path=f"m{i}.py")
        files[f"m{i}.py"] = type("R", (), {"module": f"m{i}", "path": f"m{i}.py"})()
    for e in range(import_edges):
        graph.add_edge(f"mod:m{e % modules}", f"mod:m{(e + 1) % modules}", type="imports")
    return ProgramIndex(Path("/x"), files, [], [], graph, "fp")


@pytest.mark.parametrize("modules, edges, selected, matched, expected", [
    # P = .5*min(1, log1p(M)/log1p(1000)) + .5*min(1, E/(8M)); S = .5*min(1, deg/(8*sel)) + .5*min(1, sel/M)
    (10, 20, 2, 3, {"program": 0.5 * np.log1p(10) / np.log1p(1000) + 0.5 * 20 / 80,
                    "subgraph": 0.5 * 8 / 16 + 0.5 * 2 / 10, "question": 3 / 24}),
    (2000, 40000, 20, 48, {"program": 0.5 + 0.5, "subgraph": 0.5 * 1.0 + 0.5 * 20 / 2000, "question": 1.0}),
])
def test_entropy_capacity_follows_the_formula(modules, edges, selected, matched, expected):
    from stages.capacity import EntropyCapacity, entropy_components

    index = _synthetic_index(modules, edges)
    files = [f"m{i}.py" for i in range(selected)]
    selection = Selection(files, [f"m{i}" for i in range(selected)], {}, [], matched)
    parts = entropy_components(index, selection)
    assert parts == pytest.approx(expected)
    capacity = EntropyCapacity().run(index, selection)["capacity"]
    score = 0.4 * expected["program"] + 0.4 * expected["subgraph"] + 0.2 * expected["question"]
    assert capacity.entropy["score"] == pytest.approx(score)
    assert capacity.rank == round(8 + score * 24)
    assert capacity.gsub == pytest.approx(0.6 + score * 0.3)


def test_entropy_capacity_is_larger_for_a_larger_program(tmp_path, program, project_index):
    from stages.capacity import EntropyCapacity
    from stages.index import build_index

    small = build_index(str(program), [".git"], 10**6, 80, None)
    small_sel = Selection(list(small.files)[:2], [], {}, [], 1)
    large_sel = Selection(list(project_index.files)[:8], [], {}, [], 20)
    small_cap = EntropyCapacity().run(small, small_sel)["capacity"]
    large_cap = EntropyCapacity().run(project_index, large_sel)["capacity"]
    assert large_cap.rank > small_cap.rank and large_cap.gsub > small_cap.gsub


# --- target plan ---------------------------------------------------------------------------------------------

class _Llama30:
    """Enough of a 30-layer Llama for the target plan (shapes only)."""

    def __init__(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                             num_attention_heads=2, num_key_value_heads=1)
        self.model = LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama30():
    return LanguageModel(_Llama30().model, None, "llama30", "cpu")


def plan(llama30, rank=12, prompt="what", **knobs):
    from stages.common.types import Capacity
    from stages.targets import PlanTargets

    return PlanTargets(**knobs).run(llama30, Capacity(rank, 0.75, 0.1), prompt)["plan"]


def test_layer_rank_tiers_give_keeps_by_third(llama30):
    keeps = plan(llama30, layer_rank_tiers=True).keeps
    assert [keeps[(i, "q_proj")] for i in (0, 15, 29)] == [2, 3, 4]
    assert [keeps[(i, "v_proj")] for i in (0, 15, 29)] == [8, 12, 12]  # 16 capped by rank 12
    assert [keeps[(i, "up_proj")] for i in (0, 15, 29)] == [12, 12, 12]
    assert [keeps[(i, "gate_proj")] for i in (0, 15, 29)] == [6, 8, 8]  # min(8, up/2)


def test_per_target_schedule_and_rank_budget(llama30):
    keeps = plan(llama30, per_target_rank_schedule=True).keeps
    assert {t: keeps[(0, t)] for t in ("o_proj", "up_proj", "down_proj", "gate_proj", "q_proj", "k_proj", "v_proj")} == \
        {"o_proj": 12, "up_proj": 12, "down_proj": 11, "gate_proj": 10, "q_proj": 8, "k_proj": 8, "v_proj": 7}
    budget = plan(llama30, per_target_rank_schedule=True, rank_budget=34).keeps
    row = {t: budget[(0, t)] for t in ("o_proj", "up_proj", "down_proj", "gate_proj", "q_proj", "k_proj", "v_proj")}
    assert row == {"o_proj": 6, "up_proj": 6, "down_proj": 5, "gate_proj": 5, "q_proj": 4, "k_proj": 4, "v_proj": 3}
    assert sum(row.values()) <= 34


def test_weights_schedule_and_question_awareness(llama30):
    p = plan(llama30, target_weights="o_proj=1.15,v_proj", layer_schedule=True, q_aware_weights=True,
             prompt="Why does the argument fail?")
    assert p.weights["o_proj"] == pytest.approx(1.15 * 1.10) and p.weights["v_proj"] == pytest.approx(1.08)
    assert p.weights["up_proj"] == pytest.approx(1.06) and p.weights["q_proj"] == 1.0
    m = p.layer_multipliers
    assert m[0] == pytest.approx(0.95) and m[29] == pytest.approx(1.15)
    assert m[15] == pytest.approx(1.05 + 0.15 * (15 / 29 - 1 / 3))


# --- mix -------------------------------------------------------------------------------------------------------

def test_ablate_attn_zeroes_attention_deltas(tmp_path, program):
    _, result = run(tmp_path, f"program_root={program}", "mix.ablate=[attn]", "prompt=add numbers")
    norms = result.output("mix", "report")["delta_norms"]
    assert all(norms[t] == 0.0 for t in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(norms[t] > 0.0 for t in ("gate_proj", "up_proj", "down_proj"))
    telemetry = json.loads((tmp_path / "run" / "telemetry.json").read_text())
    assert telemetry["delta_norms"] == norms


def test_delta_cap_bounds_every_delta(tmp_path, program):
    _, result = run(tmp_path, f"program_root={program}", "prompt=add", "mix.delta_cap=0.001")
    report = result.output("mix", "report")
    assert report["deltas_capped"] == report["deltas_applied"] > 0
    lm = result.output("model", "lm")
    tmap = infer_targets(lm.model)
    w_norm = float(torch.linalg.vector_norm(tmap.modules[(0, "q_proj")][1].weight))
    assert report["delta_norms"]["q_proj"] <= 0.001 * w_norm * 1.0001 * 2  # mean over 2 layers of capped norms


@pytest.mark.parametrize("mode", ["hooks", "merge"])
def test_mix_handle_restores_bit_for_bit_after_random_mixes_and_failures(mode, tiny_lm):
    """The mix handle itself, 200 times: random settings, remixes, a failure in the middle of an apply (a delta
    whose module raises) and a failure while mixed; the weights and the hooks come back exactly every time. The
    end-to-end version (100 full answers with random knobs and injected failures) is the soak in test_fault_matrix."""
    from stages.common.adapters.mixing import AdapterMix, MixSettings, model_lock
    from stages.common.adapters.synthesis import synthesize

    model, rng = tiny_lm.model, random.Random(7)
    tmap = infer_targets(model)
    base = synthesize(np.random.default_rng(2).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 8, 0)
    sub = synthesize(np.random.default_rng(3).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 8, 1)
    snap, hooks_before = snapshot(model), sum(len(m._forward_hooks) for m in model.modules())
    ids = torch.randint(0, 250, (1, 8))
    failures = 0
    for i in range(200):
        settings = MixSettings(gsub=rng.choice([0.0, 0.5, 1.0]), alpha=rng.choice([0.0, 4.0, 64.0]), rank=8,
                               weights={t: rng.choice([0.0, 1.0, 2.0]) for t in tmap.targets},
                               layer_multipliers=[rng.choice([0.95, 1.2]) for _ in range(tmap.num_layers)],
                               keeps={}, delta_cap=rng.choice([None, 0.01]),
                               ablate=tuple(rng.sample(["attn", "mlp", "q_proj"], rng.randint(0, 2))))
        mix = AdapterMix(tiny_lm, tmap, mode, base, rng.choice([sub, None]), 16.0)
        fail = rng.choice(["none", "apply", "mixed"])
        try:
            if fail == "apply":  # the last target has no module: the apply fails half-way, after the others
                keys = sorted(tmap.modules)
                name, module, rows = tmap.modules[keys[-1]]
                tmap.modules[keys[-1]] = (name, None, rows)
                try:
                    mix.apply(settings)
                finally:
                    tmap.modules[keys[-1]] = (name, module, rows)
            else:
                mix.apply(settings)
                if rng.random() < 0.5:
                    mix.apply(settings)  # a remix replaces the first mix
                with torch.no_grad():
                    model(ids)
                if fail == "mixed":
                    raise RuntimeError("failure while mixed")
        except (RuntimeError, AttributeError):
            failures += 1
        finally:
            mix.restore()
        assert same_weights(model, snap), f"mix {i} ({mode}, {fail}): weights changed"
        assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before, f"mix {i}: a hook was left"
        assert not model_lock(tiny_lm).held, f"mix {i}: the model's lock was left held"
    assert failures > 50


# --- fallback -------------------------------------------------------------------------------------------------

def _citing_generate(lm, prompt, settings, reuse=None):
    """A decode that cites three packed windows, as a model that follows the scaffold would."""
    import re

    spans = re.findall(r"\[ctx\] path: (\S+:\d+-\d+)", prompt.text)
    text = "\n\n".join(f"Claim {i} is shown in {span}." for i, span in enumerate((spans * 3)[:3]))
    return generation(text, 10, 10, 0.01)


def test_fallback_runs_only_when_the_first_check_fails(tmp_path, program, monkeypatch):
    import stages.decode

    # the tiny model's constrained lead cites one window; asking for 99 makes the first check fail
    _, failed = run(tmp_path, f"program_root={program}", "prompt=add numbers", "cite.min_citations=99", tag="fails")
    status = {t.node: t.status for t in failed.trace}
    assert failed.output("cite", "passed") is False
    assert status["remix"] == status["decode_retry"] == status["cite_retry"] == "ok"
    first = json.loads((tmp_path / "fails" / "telemetry.json").read_text())["first_check"]
    assert first["passed"] is False and "99" in first["reason"]  # telemetry says why the retry ran
    monkeypatch.setattr(stages.decode, "generate", _citing_generate)
    _, passed = run(tmp_path, f"program_root={program}", "prompt=add numbers", tag="passes")
    status = {t.node: t.status for t in passed.trace}
    assert passed.output("cite", "passed") is True
    assert status["remix"] == status["scaffold_retry"] == status["decode_retry"] == "skipped"
    telemetry = json.loads((tmp_path / "passes" / "telemetry.json").read_text())
    assert telemetry["retries"] == 0 and telemetry["citations_model"] == 3 and telemetry["fallback_mix"] is None


def test_remix_boosts_top_layers_and_gsub(tmp_path, program):
    _, result = run(tmp_path, f"program_root={program}", "prompt=add numbers", "mix.alpha_warmup=true",
                    "cite.min_citations=99")  # the first check fails: the retry re-mixes
    first, second = result.output("mix", "report"), result.output("remix", "report")
    assert first["alpha"] == 8 and second["alpha"] == 16
    assert second["gsub"] == pytest.approx(min(0.95, 1.1 * 0.75))


# --- PEFT interop ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mixed", "base", "sub"])
def test_peft_export_gives_the_same_logits_as_our_mix(tmp_path, program, which, tiny_lm):
    from peft import PeftModel

    import stages.mix

    out = tmp_path / "peft"
    path, result = api.run(["model=tiny_random", f"paths.outputs={tmp_path / 'out'}", f"program_root={program}",
                            "prompt=add", f"out={out}", f"export_which={which}", "targets=code_recall",
                            "++targets.layer_rank_tiers=true"], run_dir=tmp_path / "run", config_name="export")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    artifacts, capacity = result.output("load_artifacts", "artifacts"), result.output("capacity", "capacity")
    plan_value, sub = result.output("targets", "plan"), result.output("sub", "sub")
    if which == "base":
        sub = None
    mixer = stages.mix.MixAdapters()
    ids = torch.randint(0, 250, (2, 24))
    if which == "sub":
        artifacts = copy.copy(artifacts)
        artifacts.adapters = type(artifacts.adapters)({}, artifacts.adapters.num_layers, artifacts.adapters.shapes)
    mixed = mixer.run(tiny_lm, artifacts, capacity, plan_value, sub)
    try:
        with torch.no_grad():
            ours = tiny_lm.model(ids).logits
    finally:
        mixed["adapter_mix"].restore()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_lm.model), str(out))
    with torch.no_grad():
        theirs = peft_model(ids).logits
        plain = tiny_lm.model(ids).logits
    assert (ours - plain).abs().max() > 1e-4  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_fused_gate_up_is_mixed_by_rows_and_merge_equals_hooks():
    """A model with a fused gate_up_proj (Phi-3): each half gets its own delta; both mix modes agree and restore."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from stages.common.adapters.mixing import AdapterMix, MixSettings
    from stages.common.adapters.synthesis import synthesize

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                       pad_token_id=0)).eval()
    tmap = infer_targets(model)
    assert tmap.modules[(1, "gate_proj")][2] == slice(0, 48) and tmap.modules[(1, "up_proj")][2] == slice(48, 96)
    assert tmap.shapes["gate_proj"] == tmap.shapes["up_proj"] == (48, 32)
    adapters = synthesize(np.random.default_rng(0).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 4, 0)
    settings = MixSettings(0.0, 4.0, 4, {}, [1.0, 1.0], {}, None, ablate=("up_proj",))
    ids = torch.randint(0, 64, (1, 12))
    snap = snapshot(model)
    with torch.no_grad():
        plain = model(ids).logits
    logits = {}
    for mode in ("hooks", "merge"):
        mix = AdapterMix(LanguageModel(model, None, "fused", "cpu"), tmap, mode, adapters, None, 4.0)
        mix.apply(settings)
        try:
            with torch.no_grad():
                logits[mode] = model(ids).logits
            if mode == "merge":  # the gate rows moved, the ablated up rows did not
                fused = model.model.layers[0].mlp.gate_up_proj.weight
                assert not torch.equal(fused[:48], snap["model.layers.0.mlp.gate_up_proj.weight"][:48])
                assert torch.equal(fused[48:], snap["model.layers.0.mlp.gate_up_proj.weight"][48:])
        finally:
            mix.restore()
        assert same_weights(model, snap)
    assert not torch.allclose(logits["hooks"], plain, atol=1e-4)
    assert torch.allclose(logits["hooks"], logits["merge"], atol=1e-5)


def test_merge_mode_reuses_its_workspace_and_a_nested_merge_restores_exactly(tiny_lm):
    from stages.common.adapters.mixing import AdapterMix, MixSettings
    from stages.common.adapters.synthesis import synthesize

    model = tiny_lm.model
    tmap = infer_targets(model)
    adapters = synthesize(np.random.default_rng(1).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 4, 0)
    settings = MixSettings(0.0, 4.0, 4, {}, [1.0] * tmap.num_layers, {}, None)
    ids = torch.randint(0, 250, (1, 10))
    snap = snapshot(model)
    with torch.no_grad():
        hooks = AdapterMix(tiny_lm, tmap, "hooks", adapters, None, 4.0)
        hooks.apply(settings)
        expected = model(ids).logits
        hooks.restore()
        outer = AdapterMix(tiny_lm, tmap, "merge", adapters, None, 4.0)
        outer.apply(settings)
        merged_once = model(ids).logits
        q = model.model.layers[0].self_attn.q_proj
        workspace = q.weight.data_ptr()
        inner = AdapterMix(tiny_lm, tmap, "merge", adapters, None, 4.0)  # a second mix on top of the first
        inner.apply(settings)
        assert q.weight.data_ptr() != workspace  # not written into the outer mix's weights
        inner.restore()
        assert q.weight.data_ptr() == workspace and torch.equal(model(ids).logits, merged_once)
        outer.restore()
        assert same_weights(model, snap)
        outer.apply(settings)  # the next answer writes into the same workspace, no new 400 MB
        assert q.weight.data_ptr() == workspace
        outer.restore()
    assert same_weights(model, snap)
    assert torch.allclose(merged_once, expected, atol=1e-5)
