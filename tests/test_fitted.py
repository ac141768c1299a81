"""Issue 6 on the tiny model: fitted LoRA synthesis (docs/behaviour.md §4b) and the perplexity graph."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import api
from pipeline.engine.errors import PipelineError
from stages.common.adapters.factors import TARGETS, infer_targets, load_npz
from stages.common.adapters.fitting import fit_lora
from stages.common.program.corpus import pieces, segments

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

    import stages.common.adapters.fitting

    clock = {"now": 0.0, "steps": iter([3.0, 1.0, 3.0, 3.0])}  # seconds each training step takes

    def one_step_passes(module, args, output):
        clock["now"] += next(clock["steps"])

    monkeypatch.setattr(stages.common.adapters.fitting, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
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
    import stages.common.adapters.fitting as fitting

    captured = {}
    real_fit = fitting.fit_lora

    def remember(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        captured["factors"] = result.factors  # A already carries the training scale s
        return result

    monkeypatch.setattr("stages.synth.fit_lora", remember)
    _, result = run(tmp_path, f"program_root={program}", *FAST, "prompt=function", "mix.delta_cap=null",
                    pipeline="perplexity")
    trained = copy.deepcopy(tiny_lm.model)
    tmap = infer_targets(trained)
    with torch.no_grad():
        for key, (a, b) in captured["factors"].items():
            tmap.modules[key][1].weight += torch.from_numpy(a) @ torch.from_numpy(b)
    ids = torch.randint(0, 250, (2, 32))
    ours = logits_with_our_mix(tiny_lm, result, ids, sub=None)
    with torch.no_grad():
        reference = trained(ids).logits
    assert torch.allclose(ours, reference, atol=1e-5)
    report = result.output("ppl_report", "report")
    manifest = result.output("load_artifacts", "artifacts").manifest["synth"]
    assert report["mixed"] == pytest.approx(manifest["val_perplexity_fitted"], rel=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # the hashed synth's export on Qwen2: tests/test_model_qwen.py
def test_fitted_artifacts_export_to_peft(tmp_path, program, arch):
    out = tmp_path / "peft"
    _, result = run(tmp_path, f"program_root={program}", f"model.arch={arch}", *FAST, f"out={out}", "prompt=function",
                    "mix.delta_cap=null", config_name="export")
    lm = result.output("model", "lm")  # the shared tiny model of that shape (conftest's `tiny_lm` for llama)
    assert lm.model.config.model_type == arch
    assert_peft_export_matches_our_mix(lm, result, out)


def test_synth_none_mixes_nothing(tmp_path, program):
    _, result = run(tmp_path, f"program_root={program}", "synth=none", "prompt=function", pipeline="perplexity")
    report = result.output("ppl_report", "report")
    assert report["plain"] == report["mixed"] and all(v == 0 for v in report["delta_norms"].values())


@pytest.mark.slow
def test_adapter_ablation_multirun_summarises_perplexity_and_answers(tmp_path, make_tree, capsys):
    """experiment=adapter_ablation: 9 jobs, each with perplexity.json and eval.json, one summary table. The sweep and
    the summary run through their mains in this process (the tiny model stays loaded); tests/test_cli.py and
    tests/test_summary.py run them as real processes."""
    from conftest import call_main

    import pipeline.run as run_app
    from pipeline.summary import main as summary_main

    program = make_tree(tmp_path / "prog", {"numbers.py": SOURCE})
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Return value plus 3.", "path": "numbers.py", "start": 19,
                                     "end": 22}) + "\n")
    sweep = tmp_path / "sweep"
    code, _, err = call_main(run_app.main, [
        "-m", "experiment=adapter_ablation", "model=tiny_random", f"program_root={program}", f"questions={questions}",
        "eval.limit=1", "decode.max_new_tokens=2", "decode.min_new_tokens=0", "fallback.max_new_tokens_floor=2",
        f"paths.outputs={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}"])
    assert code == 0, err[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 9 and all((j / "perplexity.json").is_file() and (j / "eval.json").is_file() for j in jobs)
    assert summary_main([str(sweep), "--metric", "ppl.mixed"]) == 0, capsys.readouterr().err
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 10 and "ppl.mixed" in rows[0] and "ours.citation_hit" in rows[0]
    by_synth = {json.loads((j / "perplexity.json").read_text())["synth"] for j in jobs}
    assert by_synth == {"none", "hashed", "fitted"}


# --- issue 17: held-out files, training data, schedule, curve --------------------------------------------------

MANY = {f"mod_{i}.py": "".join(f"def f{i}_{j}(value):\n    \"\"\"Return value plus {j}.\"\"\"\n    return value + {j}\n\n\n"
                               for j in range(3 * i + 2)) for i in range(12)}


@pytest.fixture
def many_files(tmp_path, make_tree):
    return make_tree(tmp_path / "many", MANY)


def test_held_out_files_are_a_stable_share_and_never_trained_on(many_files, tiny_lm):
    from stages.common.program.corpus import choose_held_out_files, split, training_pieces
    from stages.index import build_index

    index = build_index(str(many_files), [], 10**6, 80, None)
    corpus = split(index, tiny_lm.tokenizer, 64, 5, held_out_files=0.1, seed=0)
    total = sum(len(p.ids) for p in corpus.train + corpus.held_out + corpus.held_out_files)
    share = sum(len(p.ids) for p in corpus.held_out_files) / total
    assert corpus.files and 0.1 <= share <= 0.2 + 1e-9
    assert {p.path for p in corpus.held_out_files} == set(corpus.files)
    for layout in ("segments", "packed"):
        for summaries in (False, True):
            train = training_pieces(corpus, index, tiny_lm.tokenizer, 64, layout, summaries)
            trained_paths = {span[0] for p in train for span in p.spans()}
            assert not trained_paths & set(corpus.files)
            held_lines = {(p.path, n) for p in corpus.held_out for n in range(p.start, p.end + 1)}
            assert not {(path, n) for p in train for path, a, b in p.spans() for n in range(a, b + 1) if a} & held_lines
    # the same choice again, another with another seed; a file alone above twice the share is never chosen
    assert split(index, tiny_lm.tokenizer, 64, 5, 0.1, 0).files == corpus.files
    assert choose_held_out_files({"a.py": 90, "b.py": 10}, 0.1, 0) == ("b.py",)
    assert choose_held_out_files({"a.py": 50, "b.py": 50}, 0.1, 0) == ()
    assert split(index, tiny_lm.tokenizer, 64, 5, 0.0, 0).files == ()


def test_packed_pieces_are_full_and_summaries_name_trained_definitions(many_files, tiny_lm):
    from stages.common.program.corpus import split, training_pieces
    from stages.index import build_index

    index = build_index(str(many_files), [], 10**6, 80, None)
    corpus = split(index, tiny_lm.tokenizer, 64, 5, 0.1, 0)
    packed = training_pieces(corpus, index, tiny_lm.tokenizer, 64, "packed")
    assert all(len(p.ids) == 64 for p in packed[:-1])
    assert sum(len(p.ids) for p in packed) >= sum(len(p.ids) for p in corpus.train)  # + a newline per segment
    text = tiny_lm.tokenizer.decode([t for p in training_pieces(corpus, index, tiny_lm.tokenizer, 64, "packed", True)
                                     for t in p.ids])
    held = {s.name for s in index.symbols if s.path in corpus.files}
    shown = [s for s in index.symbols if f"`{s.path}` defines `{s.signature}`: {s.doc}" in text]
    assert len(shown) > len(index.symbols) // 2 and not {s.path for s in shown} & set(corpus.files)
    assert not any(f"defines `{name}(" in text for name in held)


def test_learning_rate_schedule():
    from stages.common.adapters.fitting import lr_at

    assert lr_at(0, 0.0, 1.0, 10, 100.0, "constant", 0, 0.1) == 1.0
    assert lr_at(0, 0.0, 1.0, 10, 100.0, "cosine", 3, 0.1) == pytest.approx(0.25)  # warm-up: 1/4, 2/4, 3/4
    assert lr_at(5, 0.0, 1.0, 10, 100.0, "cosine", 0, 0.1) == pytest.approx(0.55)  # half way: mid of 1 and 0.1
    assert lr_at(5, 90.0, 1.0, 10, 100.0, "cosine", 0, 0.1) < 0.15  # the budget is nearly spent: anneal by clock
    assert lr_at(10, 0.0, 1.0, 10, 100.0, "cosine", 0, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 0.0, 1.0, 10, 100.0, "cosine", 0, min_lr_ratio=0.5) == pytest.approx(0.5)  # the floor


def test_curve_and_early_stopping_keep_the_best_checkpoint(index, tiny_lm):
    from stages.common.program.corpus import Piece

    train, _ = pieces(index, tiny_lm.tokenizer, seq_len=64, val_every=5)
    tmap = infer_targets(tiny_lm.model)
    noise = np.random.default_rng(0).integers(0, 250, (2, 64))  # text unlike the program: fitting makes it worse
    monitor = {"held_out": [Piece("noise", 1, 1, i, tuple(int(t) for t in row)) for i, row in enumerate(noise)]}
    result = fit_lora(tiny_lm.model, tmap, train, list(TARGETS), rank=4, lr=0.05, batch_size=2, steps=30,
                      time_budget_s=600, seed=0, scale=2.0, progress=False, monitor=monitor, monitor_every=2,
                      early_stop_patience=2)
    curve = result.curve
    assert curve[0]["step"] == 0 and curve[0]["train_loss"] is None and all("ppl_held_out" in r for r in curve)
    assert result.stopped_by == "early_stop" and result.steps < 30  # stopped after 2 checks without a better one
    best = min(curve, key=lambda r: r["ppl_held_out"])
    assert result.best_step == best["step"]
    # the kept factors are the best checkpoint's: scoring them gives the best check's perplexity
    from stages.common.program.corpus import perplexity

    with torch.no_grad():
        deltas = {key: torch.from_numpy(a) @ torch.from_numpy(b) for key, (a, b) in result.factors.items()}
    trained = copy.deepcopy(tiny_lm.model)
    tmap2 = infer_targets(trained)
    with torch.no_grad():
        for key, delta in deltas.items():
            tmap2.modules[key][1].weight += delta
    assert perplexity(trained, monitor["held_out"], 2) == pytest.approx(best["ppl_held_out"], rel=1e-3)


def test_bf16_autocast_trains_float32_factors(index, tiny_lm):
    train, _ = pieces(index, tiny_lm.tokenizer, seq_len=64, val_every=5)
    result = fit_lora(tiny_lm.model, infer_targets(tiny_lm.model), train, ["down_proj"], rank=2, lr=3e-2,
                      batch_size=4, steps=15, time_budget_s=120, seed=0, scale=2.0, progress=False,
                      autocast="bfloat16", schedule="cosine", warmup_steps=2)
    assert all(a.dtype == np.float32 for a, _ in result.factors.values())
    assert np.mean(result.losses[-3:]) < result.losses[0]


def test_dropout_changes_training_only_and_is_seeded(index, tiny_lm):
    """`synth.dropout` drops LoRA inputs while training (seeded: the same factors twice), never in a forward without
    gradients (the mix path and the perplexity checks stay exact)."""
    from stages.common.adapters.mixing import lora_forward_hook

    train, _ = pieces(index, tiny_lm.tokenizer, seq_len=64, val_every=5)

    def fit(dropout):
        torch.manual_seed(0)
        return fit_lora(tiny_lm.model, infer_targets(tiny_lm.model), train, ["down_proj"], rank=2, lr=3e-2,
                        batch_size=4, steps=4, time_budget_s=120, seed=0, scale=2.0, progress=False, dropout=dropout)

    plain, dropped, again = fit(0.0), fit(0.5), fit(0.5)
    key = next(iter(plain.factors))
    assert not np.array_equal(plain.factors[key][0], dropped.factors[key][0])
    assert all(np.array_equal(dropped.factors[k][0], again.factors[k][0]) for k in dropped.factors)
    a, b = torch.randn(3, 2), torch.randn(2, 5)
    hook = lora_forward_hook([(a, b, None, None)], 1.0, dropout=0.9)
    x = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(hook(None, (x,), torch.zeros(4, 3)), (x @ b.T) @ a.T)


def test_perplexity_graph_reports_held_out_files_and_the_build_curve(tmp_path, many_files, monkeypatch):
    # mix.delta_cap=null: the tiny model's fitted delta passes the cap; the real one is far under
    _, result = run(tmp_path, f"program_root={many_files}", *FAST, "synth.curve_every=1", "synth.curve_pieces=2",
                    "prompt=function", "mix.delta_cap=null", pipeline="perplexity")
    report = result.output("ppl_report", "report")
    artifacts = result.output("load_artifacts", "artifacts")
    manifest = artifacts.manifest["synth"]
    assert manifest["held_out_files"] and report["files_plain"] > 0 and report["files_mixed"] > 0
    assert report["files_mixed"] == pytest.approx(manifest["files_perplexity_fitted"], rel=1e-3)
    assert report["files_plain"] == pytest.approx(manifest["files_perplexity_plain"], rel=1e-3)
    rows = [json.loads(line) for line in (Path(str(artifacts.path)) / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all("ppl_held_out_files" in r for r in rows)
    assert (Path(str(artifacts.path)) / "curve.png").stat().st_size > 0 and manifest["curve"][0] == "curve.jsonl"
    # the build's cache key holds the held-out share: another share is another build
    _, other = run(tmp_path, f"program_root={many_files}", *FAST, "corpus.held_out_files=0.2", "prompt=function",
                   pipeline="perplexity", tag="other")
    assert other.output("load_artifacts", "artifacts").path != artifacts.path


def test_perplexity_refuses_files_the_build_trained_on(tmp_path, many_files):
    first, _ = run(tmp_path, f"program_root={many_files}", *FAST)
    with pytest.raises(PipelineError, match="which the build at .* trained on"):
        run(tmp_path, f"program_root={many_files}", *FAST, f"adapters={first}", "perplexity.held_out_files=0.3",
            "prompt=function", pipeline="perplexity", tag="mismatch")


# --- the settings of the fitted synthesizer, the corpus and the perplexity stage --------------------------------

def _fitted(index, lm, **knobs):
    from stages.synth import FittedSynth

    settings = {"steps": 1, "eval_pieces": 2, "seq_len": 64, "progress": False, **knobs}
    return FittedSynth(**settings).run(None, lm, index)["adapters"]


def test_fold_knobs_rescale_the_stored_a_and_keep_the_mixed_model(index, tiny_lm):
    """The stored A carries fold_rank/fold_alpha, so the mix at those knobs adds the same delta."""
    default = _fitted(index, tiny_lm)
    for knobs in ({"fold_alpha": 8.0}, {"fold_rank": 24}):  # fold 12/8 and 24/16: twice the default 12/16
        folded = _fitted(index, tiny_lm, **knobs)
        for key, value in default.factors.items():
            np.testing.assert_allclose(folded.factors[key], (2.0 if key.endswith(".A") else 1.0) * value, rtol=1e-6)
        assert folded.meta["fold"]["factor"] == 1.5
        assert folded.meta["val_perplexity_fitted"] == pytest.approx(default.meta["val_perplexity_fitted"], rel=1e-4)
    for knobs in ({"train_alpha": 64.0}, {"seed": 1}):  # another training scale, another initialisation
        assert not np.array_equal(_fitted(index, tiny_lm, **knobs).factors["L0.q_proj.A"],
                                  default.factors["L0.q_proj.A"]), knobs


def test_corpus_knobs_choose_the_pieces(many_files, tiny_lm):
    from stages.common.program.corpus import split
    from stages.index import build_index

    index = build_index(str(many_files), [".git"], 10**6, 80, None)
    base = split(index, tiny_lm.tokenizer, 64, 5, 0.3, 0)
    assert split(index, tiny_lm.tokenizer, 64, 5, 0.3, 1).files != base.files  # corpus.seed: another stable order
    held = {every: len(split(index, tiny_lm.tokenizer, 64, every, 0.3, 0).held_out) for every in (2, 50)}
    assert held[2] > 2 * held[50]  # corpus.val_every: about one segment in val_every is held out
    assert len(split(index, tiny_lm.tokenizer, 32, 5, 0.3, 0).train) > len(base.train)  # corpus.seq_len


def test_perplexity_split_and_batch_size(index, tiny_lm):
    from stages.perplexity import ProgramPerplexity

    def ppl(**knobs):
        return ProgramPerplexity(seq_len=64, max_pieces=4, **knobs).run(index, tiny_lm)["perplexity"]

    held_out = ppl()
    assert ppl(split="train") != held_out
    assert ppl(batch_size=1) == pytest.approx(held_out, rel=1e-4)  # padding never changes a piece's loss


def logits_with_our_mix(lm, result, ids, sub):
    """``lm``'s logits on ``ids`` with the run's adapters mixed by us (uncapped), the weights restored after."""
    import stages.mix

    mixed = stages.mix.MixAdapters(delta_cap=None).run(
        lm, result.output("load_artifacts", "artifacts"), result.output("capacity", "capacity"),
        result.output("targets", "plan"), sub)
    try:
        with torch.no_grad():
            return lm.model(ids).logits
    finally:
        mixed["adapter_mix"].restore()


def assert_peft_export_matches_our_mix(lm, result, out: Path) -> None:
    """The export run's adapters mixed by us (then restored) and its PEFT folder read by PEFT give the same logits."""
    from peft import PeftModel

    ids = torch.randint(0, 250, (2, 20))
    ours = logits_with_our_mix(lm, result, ids, result.output("sub", "sub"))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(out))(ids).logits
        plain = lm.model(ids).logits
    assert (ours - plain).abs().max() > 1e-4  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-4)
