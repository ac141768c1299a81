"""Each setting of the adapter stages (embed, synth=hashed, sub, capacity, remix) changes what it says it changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.common.adapters.deltas import MixSettings
from stages.common.adapters.factors import AdapterSet, infer_targets, save_npz
from stages.common.adapters.mixing import AdapterMix
from stages.common.adapters.synthesis import synthesize
from stages.common.types import Artifacts, Capacity, LanguageModel, Selection, TargetPlan
from tests.test_adapters import PROGRAM, _Llama30, _synthetic_index


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, make_index):
    return make_index(tmp_path_factory.mktemp("settings") / "prog", PROGRAM)


@pytest.fixture(scope="module")
def embedding(indexed):
    from stages.embed import EmbedProgram

    return EmbedProgram().run(indexed)["embedding"]


def _a(adapters: AdapterSet) -> np.ndarray:
    return adapters.factors["L0.q_proj.A"]


def test_embed_settings(indexed, embedding):
    from stages.embed import EmbedProgram

    def z(**knobs):
        return EmbedProgram(**knobs).run(indexed)["embedding"].z

    base = embedding.z
    assert np.array_equal(z(), base) and z(dim=64).shape == (64,)
    for knobs in ({"seed": 1}, {"channel_weights": "sym=0"}, {"include_text": True}):
        assert not np.array_equal(z(**knobs), base), knobs
    assert np.array_equal(z(include_text=True, text_max_bytes=0), base)  # no text read: the text channel is empty


def test_hashed_synth_settings(indexed, embedding, tiny_lm):
    from stages.synth import HashedSynth

    def synth(**knobs):
        return HashedSynth(**knobs).run(embedding, tiny_lm, indexed)

    base = synth()
    assert base["adapters"].rank == 12 and synth(rank=4)["adapters"].rank == 4
    assert not np.array_equal(_a(synth(seed=1)["adapters"]), _a(base["adapters"]))
    linear = synth(layer_gate="linear")["adapters"].factors
    assert float(linear["L0.q_proj.gate"]) == 0.0 and float(linear["L1.q_proj.gate"]) == 1.0  # gate = i/(L-1)
    capped = synth(map_cap=0.05)["adapters"].factors
    assert np.linalg.norm(_a(base["adapters"])) > 0.05
    assert all(np.linalg.norm(v) <= 0.05 * 1.0001 for k, v in capped.items() if k.endswith((".A", ".B")))
    bank = synth(bank=True)["bank"]
    assert base["bank"] == {} and {"pkg.core", "pkg.util"} <= set(bank) <= set(indexed.modules)  # one per module
    assert all(b.rank == 12 for b in bank.values())


def test_subgraph_adapter_settings(indexed, embedding, tiny_lm, tmp_path):
    from stages.sub import SubgraphAdapter
    from stages.synth import HashedSynth

    selection = Selection(["pkg/core.py", "pkg/util.py"], ["pkg.core", "pkg.util"], {}, [], 2)
    tmap = infer_targets(tiny_lm.model)
    artifacts = Artifacts(tmp_path, {}, None, AdapterSet({}, tmap.num_layers, dict(tmap.shapes)))

    def sub(**knobs):
        return SubgraphAdapter(**knobs).run(indexed, selection, Capacity(6, 0.75, 0.1), tiny_lm, artifacts)["sub"]

    base = sub()
    assert base.rank == 6
    for knobs in ({"seed": 2}, {"dim": 64}, {"embed_seed": 1}, {"channel_weights": "sym=0"}, {"include_text": True}):
        assert not np.array_equal(_a(sub(**knobs)), _a(base)), knobs
    assert float(sub(layer_gate="linear").factors["L0.q_proj.gate"]) == 0.0
    assert np.linalg.norm(_a(sub(map_cap=0.05))) <= 0.05 * 1.0001 < np.linalg.norm(_a(base))
    rounded = _a(sub(round_lora=True))
    assert len(np.unique(np.abs(rounded))) == 2  # 0 and the median magnitude
    assert (_a(sub(round_lora=True, round_threshold=2.0)) == 0).mean() > (rounded == 0).mean()

    bank = HashedSynth(bank=True).run(embedding, tiny_lm, indexed)["bank"]
    for folder in (tmp_path / "bank", tmp_path / "elsewhere"):  # the artifacts' own bank, and adapters_bank
        for module, adapters in bank.items():
            (folder / module).mkdir(parents=True)
            save_npz(folder / module / "adapters.npz", adapters.factors)
    own = sub(mixture_m=1)
    assert own.meta["mixture"] == ["pkg.core"] and own.rank == 6 + 12
    two = sub(mixture_m=2, adapters_bank=str(tmp_path / "elsewhere"))
    assert two.meta["mixture"] == ["pkg.core", "pkg.util"] and two.rank == 6 + 2 * 12


def test_capacity_settings():
    from stages.capacity import EntropyCapacity, FixedCapacity

    index = _synthetic_index(10, 20)
    selection = Selection(["m0.py", "m1.py"], ["m0", "m1"], {}, [], 3)
    assert FixedCapacity(rank=4, gsub=0.5, beta=0.3).run(index, selection)["capacity"] == Capacity(4, 0.5, 0.3)
    pinned = EntropyCapacity(rank_min=5, rank_max=5, gsub_min=0.7, gsub_max=0.7, beta=0.2).run(index, selection)
    assert (pinned["capacity"].rank, pinned["capacity"].gsub, pinned["capacity"].beta) == (5, 0.7, 0.2)
    wide = EntropyCapacity(rank_min=1, rank_max=101, gsub_min=0.0, gsub_max=1.0).run(index, selection)["capacity"]
    assert wide.rank == round(1 + 100 * wide.entropy["score"]) and wide.gsub == pytest.approx(wide.entropy["score"])
    question = EntropyCapacity(entropy_weights="question=2").run(index, selection)["capacity"]
    assert question.entropy["score"] == pytest.approx(3 / 24)  # the question term alone, renormalised


def test_capacity_beta_weighs_an_adapter_bias(tiny_lm, tmp_path):
    from stages.capacity import FixedCapacity
    from stages.mix import MixAdapters

    tmap = infer_targets(tiny_lm.model)
    d_out, d_in = tmap.shapes["o_proj"]
    factors = {"L0.o_proj.A": np.zeros((d_out, 1), np.float32), "L0.o_proj.B": np.zeros((1, d_in), np.float32),
               "L0.o_proj.bias": np.ones(d_out, np.float32)}
    artifacts = Artifacts(tmp_path, {}, None, AdapterSet(factors, tmap.num_layers, dict(tmap.shapes)))
    plan = TargetPlan({}, [1.0] * tmap.num_layers, {})
    ids = torch.randint(0, 250, (1, 8))

    def logits(beta=None):
        if beta is None:
            with torch.no_grad():
                return tiny_lm.model(ids).logits
        capacity = FixedCapacity(beta=beta).run(None, None)["capacity"]
        mix = MixAdapters().run(tiny_lm, artifacts, capacity, plan)["adapter_mix"]
        try:
            return logits()
        finally:
            mix.restore()

    plain = logits()
    assert torch.equal(logits(0.0), plain) and not torch.allclose(logits(0.5), plain)


def test_remix_boosts_by_layer_third_and_raises_gsub():
    from stages.mix import BoostedRemix

    lm = LanguageModel(_Llama30().model, None, "llama30", "cpu")
    tmap = infer_targets(lm.model)
    base = synthesize(np.random.default_rng(0).standard_normal(64), tmap.num_layers, tmap.shapes, tmap.targets, 4, 0)
    mix = AdapterMix(lm, tmap, "hooks", base, base, 8.0)
    mix.apply(MixSettings(0.5, 4.0, 4, {}, [1.0] * tmap.num_layers, {}, None))
    try:
        BoostedRemix(low=0.5, mid=2.0, top=3.0, gsub_factor=1.5, gsub_max=0.9).run(mix)
        multipliers = mix.settings.layer_multipliers
        assert (multipliers[0], multipliers[15], multipliers[29]) == (0.5, 2.0, 3.0)
        assert mix.settings.gsub == 0.75 and mix.settings.alpha == 8.0  # min(gsub_max, 1.5 × 0.5), full alpha
        BoostedRemix(gsub_factor=1.5, gsub_max=0.8).run(mix)
        assert mix.settings.gsub == 0.8  # capped: 1.5 × 0.75 > 0.8
    finally:
        mix.restore()
