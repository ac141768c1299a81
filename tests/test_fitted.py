"""Issue 6 on the tiny model: fitted LoRA synthesis (SPEC §4b) and the perplexity graph."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import api
from stages.common.adapters import TARGETS, infer_targets, load_npz
from stages.common.corpus import pieces, segments
from stages.common.fitting import fit_lora

SOURCE = "\n".join(
    f"def function_{i}(value):\n    \"\"\"Return value plus {i}.\"\"\"\n    total = value + {i}\n    return total\n\n"
    for i in range(60)
)


@pytest.fixture
def program(tmp_path, make_tree):
    return make_tree(tmp_path / "prog", {"numbers.py": SOURCE, "more.py": SOURCE.replace("function_", "helper_")})


@pytest.fixture
def index(program):
    from stages.index import build_index

    return build_index(str(program), [".git"], 10**6, 80, None)


FAST = ["synth=fitted", "synth.steps=3", "synth.eval_pieces=4", "perplexity.max_pieces=4", "synth.progress=false"]


def run(tmp_path, *overrides, pipeline="build", tag="run", config_name="config"):
    args = [f"pipeline={pipeline}", "model=tiny_random", f"paths.outputs={tmp_path / 'out'}", *overrides]
    if config_name != "config":
        args = args[1:]
    return api.run(args, run_dir=tmp_path / tag, config_name=config_name)


def test_train_and_held_out_pieces_never_share_a_line(index, tiny_lm):
    train, held_out = pieces(index, tiny_lm.tokenizer, seq_len=64, val_every=5)
    assert train and held_out
    held_lines = {(p.path, line) for p in held_out for line in range(p.start, p.end + 1)}
    train_lines = {(p.path, line) for p in train for line in range(p.start, p.end + 1)}
    assert not held_lines & train_lines
    spans = segments(index)
    for path in {s[0] for s in spans}:
        ranges = sorted((a, b) for p, a, b in spans if p == path)
        assert all(prev[1] < nxt[0] for prev, nxt in zip(ranges, ranges[1:]))  # disjoint segments


def test_training_lowers_the_loss(index, tiny_lm):
    train, _ = pieces(index, tiny_lm.tokenizer, seq_len=64, val_every=5)
    tmap = infer_targets(tiny_lm.model)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    result = fit_lora(tiny_lm.model, tmap, train, list(TARGETS), rank=4, lr=3e-2, batch_size=4, steps=25,
                      time_budget_s=120, seed=0, scale=2.0, progress=False)
    assert result.steps == 25 and result.stopped_by == "steps"
    assert np.mean(result.losses[-5:]) < result.losses[0] - 0.05
    assert all(torch.equal(v, before[k]) for k, v in tiny_lm.model.state_dict().items())  # model stays frozen


def test_time_budget_stops_training(index, tiny_lm):
    train, _ = pieces(index, tiny_lm.tokenizer, seq_len=64, val_every=5)
    result = fit_lora(tiny_lm.model, infer_targets(tiny_lm.model), train, ["q_proj"], rank=2, lr=1e-3,
                      batch_size=2, steps=10_000, time_budget_s=0.5, seed=0, scale=1.0, progress=False)
    assert result.stopped_by == "time_budget" and 0 < result.steps < 10_000


def test_a_step_that_could_overrun_the_budget_is_not_started(index, tiny_lm, monkeypatch):
    import types

    import stages.common.fitting

    clock = {"now": 0.0, "steps": iter([3.0, 1.0, 3.0, 3.0])}  # seconds each training step takes

    def one_step_passes(module, args, output):
        clock["now"] += next(clock["steps"])

    monkeypatch.setattr(stages.common.fitting, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    hook = tiny_lm.model.register_forward_hook(one_step_passes)
    try:
        train, _ = pieces(index, tiny_lm.tokenizer, seq_len=64, val_every=5)
        result = fit_lora(tiny_lm.model, infer_targets(tiny_lm.model), train, ["q_proj"], rank=2, lr=1e-3,
                          batch_size=2, steps=10, time_budget_s=6.5, seed=0, scale=1.0, progress=False)
    finally:
        hook.remove()
    # after 3 s + 1 s, a third step (up to 3 s, like the first) would end at 7 s > 6.5 s: not started
    assert result.stopped_by == "time_budget" and result.steps == 2 and result.seconds == 4.0


def test_same_program_and_config_give_identical_factors(tmp_path, program):
    first, _ = run(tmp_path, f"program_root={program}", *FAST)
    second, _ = run(tmp_path / "again", f"program_root={program}", *FAST)
    a, b = load_npz(Path(str(first)) / "adapters.npz"), load_npz(Path(str(second)) / "adapters.npz")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    manifest = json.loads((Path(str(first)) / "manifest.json").read_text())["synth"]
    assert manifest["name"] == "fitted" and manifest["steps"] == 3 and manifest["seconds"] > 0
    assert manifest["val_perplexity_plain"] > 0 and manifest["val_perplexity_fitted"] > 0
    assert manifest["fold"]["factor"] == pytest.approx(12 / 16)


def test_stored_fold_makes_the_mix_equal_the_trained_model(tmp_path, program, tiny_lm, monkeypatch):
    """Mix at default knobs adds exactly s·A_trained·B_trained, the delta the training hooks added."""
    import stages.common.fitting as fitting

    captured = {}
    real_fit = fitting.fit_lora

    def remember(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        captured["factors"] = result.factors  # A already carries the training scale s
        return result

    monkeypatch.setattr("stages.synth.fit_lora", remember)
    monkeypatch.setenv("PCA_DELTA_CAP", "off")
    _, result = run(tmp_path, f"program_root={program}", *FAST, "prompt=function", pipeline="perplexity")
    trained = copy.deepcopy(tiny_lm.model)
    tmap = infer_targets(trained)
    with torch.no_grad():
        for key, (a, b) in captured["factors"].items():
            tmap.modules[key][1].weight += torch.from_numpy(a) @ torch.from_numpy(b)
    ids = torch.randint(0, 250, (2, 32))
    import stages.mix

    mixed = stages.mix.MixAdapters(delta_cap=None).run(
        tiny_lm, result.output("load_artifacts", "artifacts"), result.output("capacity", "capacity"),
        result.output("targets", "plan"), None)
    try:
        with torch.no_grad():
            ours = tiny_lm.model(ids).logits
    finally:
        mixed["handle"].restore()
    with torch.no_grad():
        reference = trained(ids).logits
    assert torch.allclose(ours, reference, atol=1e-5)
    report = result.output("ppl_report", "report")
    manifest = result.output("load_artifacts", "artifacts").manifest["synth"]
    assert report["mixed"] == pytest.approx(manifest["val_perplexity_fitted"], rel=1e-3)


def test_fitted_artifacts_export_to_peft(tmp_path, program, tiny_lm):
    from peft import PeftModel

    import stages.mix

    out = tmp_path / "peft"
    _, result = run(tmp_path, f"program_root={program}", *FAST, f"out={out}", "prompt=function",
                    "mix.delta_cap=null", config_name="export")
    ids = torch.randint(0, 250, (1, 20))
    mixed = stages.mix.MixAdapters(delta_cap=None).run(
        tiny_lm, result.output("load_artifacts", "artifacts"), result.output("capacity", "capacity"),
        result.output("targets", "plan"), result.output("sub", "sub"))
    try:
        with torch.no_grad():
            ours = tiny_lm.model(ids).logits
    finally:
        mixed["handle"].restore()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(copy.deepcopy(tiny_lm.model), str(out))(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_synth_none_mixes_nothing(tmp_path, program):
    _, result = run(tmp_path, f"program_root={program}", "synth=none", "prompt=function", pipeline="perplexity")
    report = result.output("ppl_report", "report")
    assert report["plain"] == report["mixed"] and all(v == 0 for v in report["delta_norms"].values())


@pytest.mark.slow
def test_adapter_ablation_multirun_summarises_perplexity_and_answers(tmp_path, make_tree, cli):
    """experiment=adapter_ablation: 9 jobs, each with perplexity.json and eval.json, one summary table."""
    import subprocess
    import sys

    from pipeline import PROJECT_ROOT

    program = make_tree(tmp_path / "prog", {"numbers.py": SOURCE})
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Return value plus 3.", "path": "numbers.py", "start": 19,
                                     "end": 22}) + "\n")
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "experiment=adapter_ablation", "model=tiny_random", f"program_root={program}",
                f"questions={questions}", "eval.limit=1", "decode.max_new_tokens=2", "decode.min_new_tokens=0",
                "fallback.max_new_tokens_floor=2", f"paths.outputs={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 9 and all((j / "perplexity.json").is_file() and (j / "eval.json").is_file() for j in jobs)
    summary = subprocess.run([sys.executable, "-m", "pipeline.summary", str(sweep), "--metric", "ppl.mixed"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 10 and "ppl.mixed" in rows[0] and "ours.citation_hit" in rows[0]
    by_synth = {json.loads((j / "perplexity.json").read_text())["synth"] for j in jobs}
    assert by_synth == {"none", "hashed", "fitted"}
