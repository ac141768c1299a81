"""The CUDA paths (`model.device=cuda`), on the tiny random Llama: skipped where torch sees no GPU (CI has none).

Run them on a GPU machine with `python -m pytest -q tests/test_cuda.py`. What they hold: every graph that loads the
model runs with it on the GPU (the answer with each synthesizer and mix mode, the fitted build, perplexity, the
closed-book test), the mix restores every weight bit for bit there in float32 and bfloat16, and the candidate
scorer gives on the GPU what a separate forward gives.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import api

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROGRAM = {
    "pkg/__init__.py": "from .core import add\n",
    "pkg/core.py": 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n    return a + b\n\n\n'
                   'class Box:\n    """A box of things."""\n\n    def put(self, item):\n        return add(1, 2)\n',
    "pkg/util.py": "from pkg.core import add\n\n\ndef twice(x):\n    \"\"\"Add a number to itself.\"\"\"\n"
                   "    return add(x, x)\n" + "".join(f"\n\ndef helper_{i}(x):\n    return twice(x) + {i}\n"
                                                   for i in range(40)),
}
CUDA = ["model=tiny_random", "model.device=cuda", "select=question", "decode.max_new_tokens=6", "decode.min_new_tokens=0",
        "fallback.max_new_tokens_floor=4"]
FITTED = ["synth=fitted", "synth.steps=3", "synth.batch_size=2", "synth.progress=false", "corpus.seq_len=32",
          "perplexity.max_pieces=4"]


@pytest.fixture
def program(tmp_path, make_tree):
    return make_tree(tmp_path / "prog", PROGRAM)


def _run(tmp_path: Path, *overrides: str, tag: str = "run"):
    return api.run([f"paths.outputs={tmp_path / 'out'}", *CUDA, *overrides], run_dir=tmp_path / tag)


@pytest.mark.parametrize("synth", ["none", "hashed", "fitted"])
@pytest.mark.parametrize("mode", ["hooks", "merge"])
def test_answer_graph_runs_on_cuda(tmp_path, program, synth, mode):
    extra = FITTED if synth == "fitted" else [f"synth={synth}"]
    value, result = _run(tmp_path, f"program_root={program}", f"mix.mode={mode}", *extra,
                         "prompt=What does add do?")
    assert result.failure is None
    telemetry = json.loads((tmp_path / "run" / "telemetry.json").read_text())
    assert telemetry["device"].startswith("cuda"), telemetry["device"]


def test_fitted_build_and_perplexity_on_cuda_match_the_cpu(tmp_path, program):
    """The fitted build trains on the GPU, and the perplexity graph scores it there; the CPU's numbers agree
    (same data, same seed: only float rounding differs)."""
    scores = {}
    for device in ("cuda", "cpu"):
        _, result = api.run([f"paths.outputs={tmp_path / device}", "model=tiny_random", f"model.device={device}",
                             "select=question", "pipeline=perplexity", f"program_root={program}", *FITTED],
                            run_dir=tmp_path / f"ppl-{device}")
        assert result.failure is None
        scores[device] = json.loads((tmp_path / f"ppl-{device}" / "perplexity.json").read_text())
    for key in ("plain", "mixed"):
        assert np.isfinite(scores["cuda"][key])
        assert scores["cuda"][key] == pytest.approx(scores["cpu"][key], rel=2e-3), key
    assert scores["cuda"]["mixed"] != scores["cuda"]["plain"]  # the fitted delta was mixed in


def test_closed_book_runs_on_cuda(tmp_path, program):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Add two numbers.", "path": "pkg/core.py", "symbol": "add",
                                     "start": 1, "end": 3}) + "\n")
    _, result = _run(tmp_path, "pipeline=closed_book", f"program_root={program}", f"questions={questions}",
                     "synth=hashed", "closed_book.progress=false")
    assert result.failure is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["hooks", "merge"])
def test_mix_restores_bit_for_bit_on_cuda(tiny_lm, mode, dtype):
    import copy

    from stages.common.adapters.factors import infer_targets
    from stages.common.adapters.mixing import AdapterMix, MixSettings
    from stages.common.adapters.synthesis import synthesize
    from stages.common.types import LanguageModel

    lm = LanguageModel(copy.deepcopy(tiny_lm.model).to("cuda", dtype=dtype), tiny_lm.tokenizer, "tiny", "cuda")
    tmap = infer_targets(lm.model)
    base = synthesize(np.random.default_rng(2).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 8, 0)
    snap = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    ids = torch.randint(0, 250, (1, 8), device="cuda")
    with torch.no_grad():
        plain = lm.model(ids).logits
    rng = random.Random(3)
    for _ in range(20):
        settings = MixSettings(gsub=0.0, alpha=rng.choice([4.0, 64.0]), rank=8,
                               weights={t: rng.choice([0.5, 1.0, 2.0]) for t in tmap.targets},
                               layer_multipliers=[1.0] * tmap.num_layers, keeps={}, delta_cap=None, ablate=())
        mix = AdapterMix(lm, tmap, mode, base, None, 16.0)
        try:
            mix.apply(settings)
            with torch.no_grad():
                mixed = lm.model(ids).logits
            assert not torch.equal(mixed, plain)
        finally:
            mix.restore()
        assert all(torch.equal(v, snap[k]) for k, v in lm.model.state_dict().items())
        assert all(v.device.type == "cuda" and v.dtype == snap[k].dtype for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_in_place_reads_back_from_the_file_on_cuda(tmp_path, dtype):
    """A checkpoint loaded onto the GPU: merge writes into its weights and restores them from the file (bit-exact)."""
    from stages.common.adapters.factors import infer_targets
    from stages.common.adapters.mixing import _WORKSPACES, AdapterMix, MixSettings
    from stages.common.adapters.synthesis import synthesize
    from stages.common.adapters.weightfile import weight_file
    from stages.model import HFCheckpoint
    from tests.test_merge_in_place import bits, save_tiny

    folder = save_tiny(tmp_path / "ckpt", dtype)
    lm = HFCheckpoint(id=str(folder), dtype=str(dtype).removeprefix("torch."), device="cuda").run()["lm"]
    tmap = infer_targets(lm.model)
    base = synthesize(np.random.default_rng(2).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 8, 0)
    settings = MixSettings(0.0, 16.0, 8, {}, [1.0] * tmap.num_layers, {}, None)
    before = bits(lm.model)
    q = lm.model.model.layers[0].self_attn.q_proj
    for _ in range(2):
        mix = AdapterMix(lm, tmap, "merge", base, None, 16.0)
        mix.apply(settings)
        assert q.weight.device.type == "cuda" and q not in _WORKSPACES and weight_file(lm.model).written
        assert bits(lm.model) != before
        mix.restore()
        assert bits(lm.model) == before


def test_device_map_places_the_weights_and_the_device_setting_leaves_them(tmp_path):
    from stages.model import HFCheckpoint
    from tests.test_merge_in_place import save_tiny

    folder = save_tiny(tmp_path / "ckpt", torch.float32)
    lm = HFCheckpoint(id=str(folder), device="cpu", device_map="cuda:0").run()["lm"]
    assert lm.device == "cuda:0" and all(p.device.type == "cuda" for p in lm.model.parameters())


def test_candidate_scores_on_cuda_equal_separate_forwards(tiny_lm):
    import copy

    from stages.common.generation.continuations import encode_prefix, score_continuations

    model = copy.deepcopy(tiny_lm.model).to("cuda")
    prompt = [5, 9, 17, 33, 2, 81, 40]
    candidates = [[7], [11, 12, 13], [50, 51], [99, 98, 97, 96]]
    state = encode_prefix(model, prompt)
    scores = score_continuations(model, state, candidates)
    for candidate, got in zip(candidates, scores):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + candidate], device="cuda")).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        want = [float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(candidate)]
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_packed_attention_on_cuda_decodes_like_sdpa(dtype, tol):
    from stages.common.generation.attention import use_attention
    from stages.model import TinyRandomLlama
    from tests.test_precision import _decode_logits

    lm = TinyRandomLlama(seed=3, heads=6, kv_heads=2, hidden=96, device="cuda", dtype=dtype).run()["lm"]
    assert lm.model.config._attn_implementation == "sdpa_packed" and lm.model.device.type == "cuda"
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(1)).cuda()
    packed = _decode_logits(lm.model, ids, 30)
    use_attention(lm.model, "sdpa")
    try:
        plain = _decode_logits(lm.model, ids, 30)
    finally:
        use_attention(lm.model, "sdpa_packed")
    for ours, theirs in zip(packed, plain):
        assert torch.allclose(ours, theirs, atol=tol * float(theirs.abs().max()))
