"""`select.encoder_adapter`: a LoRA delta of the MiniLM sentence encoder (stages/common/retrieval/encoder_lora.py), the
shipped adapter, and its fitting (stages/common/retrieval/encoder_fit.py; tools/fit_encoder_adapter.py runs it)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from pipeline import PROJECT_ROOT
from pipeline.engine.errors import InputError
from stages.common.retrieval import dense, encoder_lora
from stages.common.retrieval.encoder_fit import EVALUATED, PHRASINGS, LoRA, ProgramTexts, embed, fit, mine, recall
from stages.select import HybridSelect

PROGRAM = {
    "kettle.py": "def boil_water(kettle):\n    kettle.heat(100)\n    return kettle\n\n\n"
                 "def pour_tea(cup):\n    cup.fill('tea')\n",
    "cup.py": "def rinse_cup(cup):\n    cup.wash('sink')\n",
}
LAYER = "encoder.layer.0.attention.self.query"


def _write(path, pairs, scale=1.0):
    encoder_lora.write(path, pairs, scale, {})
    return str(path)


def _tiny_bert(seed: int = 0):
    """A small random BERT with MiniLM's vocabulary (its tokenizer works with it)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    return BertModel(config).eval()


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dense.model_dir(), local_files_only=True)


def test_the_shipped_adapter_fits_minilm_and_was_trained_on_no_evaluated_program():
    adapter = encoder_lora.load("minilm_code_search_lora")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(dense.model_dir(), local_files_only=True)
    adapter.check(model)  # every adapted layer exists with its shape
    assert len(adapter.pairs) == 36 and all(np.isfinite(b).all() and np.abs(b).max() > 0 for _, b in adapter.pairs.values())
    with np.load(encoder_lora.resolve("minilm_code_search_lora"), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"].reshape(-1)[0]))  # npz_bytes stores a 0-d array as 1-d
    assert meta["programs"] and not set(meta["programs"]) & EVALUATED and meta["phrasings"] == list(PHRASINGS)


BAD_ADAPTERS = [
    ("not a zip", lambda p: p.write_bytes(b"garbage"), "is not a readable npz file"),
    ("no scale", lambda p: np.savez(p, **{f"{LAYER}.A": np.ones((2, 4)), f"{LAYER}.B": np.ones((4, 2))}),
     "has no float 'scale' scalar"),
    ("scale inf", lambda p: np.savez(p, scale=np.array(np.inf)), "'scale' is inf"),
    ("foreign array", lambda p: np.savez(p, scale=np.array(1.0), weights=np.ones(2)), "unexpected array 'weights'"),
    ("A without B", lambda p: np.savez(p, scale=np.array(1.0), **{f"{LAYER}.A": np.ones((2, 4))}),
     f"'{LAYER}' needs both"),
    ("ranks differ", lambda p: np.savez(p, scale=np.array(1.0), **{f"{LAYER}.A": np.ones((2, 4)),
                                                                    f"{LAYER}.B": np.ones((4, 3))}),
     "needs float A (rank x in) and B (out x rank)"),
    ("NaN", lambda p: np.savez(p, scale=np.array(1.0), **{f"{LAYER}.A": np.full((2, 4), np.nan),
                                                          f"{LAYER}.B": np.ones((4, 2))}), "holds NaN or inf"),
    ("no layer", lambda p: np.savez(p, scale=np.array(1.0)), "adapts no layer"),
    ("object array", lambda p: np.savez(p, scale=np.array([None], dtype=object)), "is not a readable npz file"),
]


@pytest.mark.parametrize("name, make, expected", BAD_ADAPTERS, ids=[r[0] for r in BAD_ADAPTERS])
def test_a_bad_adapter_file_is_an_input_error_naming_it(tmp_path, name, make, expected):
    path = tmp_path / "lora.npz"
    make(path)
    with pytest.raises(InputError, match="select.encoder_adapter file") as err:
        encoder_lora.load(str(path))
    assert expected in str(err.value) and str(path) in str(err.value)


def test_unknown_names_and_layers_the_encoder_lacks_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a shipped adapter .known: minilm_code_search_lora"):
        encoder_lora.resolve("no_such_adapter")
    with pytest.raises(InputError, match="is not a file"):
        encoder_lora.resolve(str(tmp_path / "missing.npz"))
    model = _tiny_bert()
    wide = encoder_lora.load(_write(tmp_path / "wide.npz", {LAYER: (np.ones((2, 384)), np.ones((384, 2)))}))
    with pytest.raises(InputError, match=f"'{LAYER}' adapts a 384x384 weight, the encoder's is 32x32"):
        wide.merge(model)
    missing = encoder_lora.load(_write(tmp_path / "deep.npz", {"encoder.layer.9.output.dense": (np.ones((2, 64)),
                                                                                                 np.ones((32, 2)))}))
    with pytest.raises(InputError, match="'encoder.layer.9.output.dense' is not a linear layer"):
        missing.merge(model)


def test_the_merged_weights_give_what_training_computed():
    """The fit trains with hooks (W x + scale·B A x); the pipeline merges W += scale·B A: the same vectors."""
    import torch

    tokenizer, texts = _tokenizer(), ["def boil_water(kettle): kettle.heat(100)", "Pour the tea into the cup."]
    hooked = _tiny_bert()
    lora = LoRA(hooked, rank=4, alpha=8.0, seed=0)
    with torch.no_grad():
        for _, b in lora.pairs.values():
            b.normal_()  # B starts at zero (no change); give it a value so the test can see the delta
    trained = embed(hooked, tokenizer, texts, False)
    plain = embed(_tiny_bert(), tokenizer, texts, False)
    merged_model = _tiny_bert()
    encoder_lora.EncoderAdapter(None, lora.arrays(), lora.scale, "k").merge(merged_model)
    merged = embed(merged_model, tokenizer, texts, False)
    assert torch.allclose(trained, merged, atol=1e-5) and not torch.allclose(plain, merged, atol=1e-3)


def test_an_adapter_member_declaring_too_many_bytes_is_refused_from_its_header(tmp_path):
    import io
    import zipfile

    from stages.common.npzsafe import MAX_ARRAY_BYTES

    path = tmp_path / "bomb.npz"
    side = int((MAX_ARRAY_BYTES // 4) ** 0.5) + 1  # a square float32 matrix just over the bound
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32)) | {"shape": (side, side)}
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{LAYER}.A.npy", member.getvalue())  # the header only: no data behind it
    with pytest.raises(InputError, match="select.encoder_adapter file") as err:
        encoder_lora.load(str(path))
    assert "declares shape" in str(err.value) and "nothing was read" in str(err.value)


def test_a_rewritten_adapter_file_is_read_again(tmp_path):
    path = tmp_path / "lora.npz"
    first = encoder_lora.load(_write(path, {LAYER: (np.ones((2, 4)), np.ones((4, 2)))}, 1.0))
    second = encoder_lora.load(_write(path, {LAYER: (np.ones((2, 4)), np.ones((4, 2)))}, 2.0))
    assert (first.scale, second.scale) == (1.0, 2.0) and first.key != second.key


def test_a_written_adapter_reads_back_and_has_the_same_bytes_for_the_same_contents(tmp_path):
    pairs = {LAYER: (np.arange(8.0).reshape(2, 4), np.ones((4, 2)))}
    a, b = _write(tmp_path / "a.npz", pairs, 0.5), _write(tmp_path / "b.npz", pairs, 0.5)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    back = encoder_lora.load(a)
    assert back.scale == 0.5 and np.array_equal(back.pairs[LAYER][0], pairs[LAYER][0]) and back.key == encoder_lora.load(b).key


def test_hybrid_select_embeds_with_the_adapter_and_keeps_its_vectors_apart(tmp_path, make_index):
    index = make_index(tmp_path / "prog", PROGRAM)
    prompt = "Where is the water boiled in the kettle?"

    def run(adapter):
        return HybridSelect(cache_dir=str(tmp_path / "cache"), progress=False, dense_weight=1.0,
                            encoder_adapter=adapter).run(index, prompt)["selection"]

    plain = run(None)
    # a zero delta is MiniLM as it ships: the same ranking, but vectors cached under another key
    zero = run(_write(tmp_path / "zero.npz", {LAYER: (np.ones((2, 384)), np.zeros((384, 2)))}))
    assert zero.window_ranking == plain.window_ranking
    assert len(list((tmp_path / "cache" / "dense").glob("*.npz"))) == 2
    # a delta that changes the encoder changes the scores
    shipped = run("minilm_code_search_lora")
    assert [s for s, _ in shipped.window_ranking["kettle.py"]] != [s for s, _ in plain.window_ranking["kettle.py"]]
    assert len(list((tmp_path / "cache" / "dense").glob("*.npz"))) == 3


def test_a_bad_adapter_fails_the_precheck_before_anything_loads(tmp_path):
    with pytest.raises(InputError, match="missing.npz' is not a file"):
        HybridSelect(encoder_adapter=str(tmp_path / "missing.npz")).precheck(prompt="q")
    HybridSelect(encoder_adapter=None).precheck(prompt="q")  # nothing to check


@pytest.mark.parametrize("draws, schedule", [(1, "constant"), (2, "cosine")])
def test_fitting_moves_questions_to_the_windows_they_describe(draws, schedule):
    """A tiny random encoder learns which made-up word stands for which: questions use one vocabulary, windows
    another; before fitting it cannot pair them, after a few steps of LoRA it can."""
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "candle", "forest", "silver", "garden",
             "rocket", "violet"]
    codes = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
             "lima"]
    windows = [f"def {c}(): return {c}" for c in codes]
    questions = [[w] * len(PHRASINGS) for w in words]
    program = ProgramTexts("synthetic", windows, questions, [[i] for i in range(len(words))],
                           [[int(j)] for j in rng.permutation(len(words))], [f"{c}.py" for c in codes])
    program.mined = [[(i + 1) % len(words), (i + 2) % len(words)] for i in range(len(words))]  # the fit draws them too
    model, tokenizer = _tiny_bert(), _tokenizer()
    before, _ = recall(model, tokenizer, program, k=1)
    fit(model, tokenizer, [program], steps=80, batch=12, lr=1e-2, tau=0.05, rank=4, alpha=8.0, seed=0, draws=draws,
        schedule=schedule)
    windows, files = recall(model, tokenizer, program, k=1)
    assert windows >= max(0.75, before + 0.4) and files == windows  # one window a file


def test_mined_negatives_are_the_nearest_windows_of_other_files_that_do_not_repeat_the_answer():
    windows = ["def boil(): ...", "def boil_fast(): ...", "def pour(): ...", "def boil(): ...", "def steep(): ..."]
    files = ["kettle.py", "kettle.py", "cup.py", "copy.py", "pot.py"]
    program = ProgramTexts("p", windows, [["boil the water"] * len(PHRASINGS)], [[0]], [[1]], files)
    vectors = np.eye(5, dtype=np.float32)
    # the question sits nearest its own file (0, 1), then a copy of its answer (3), then pot.py, then cup.py
    asked = np.tile(np.array([0.9, 0.8, 0.1, 0.7, 0.3], dtype=np.float32), (1, len(PHRASINGS), 1))
    assert mine(program, vectors, asked, 2) == [[4, 2]]
    assert mine(program, vectors, asked, 9) == [[4, 2]]  # fewer than asked for: all there are


def test_the_fitting_tool_refuses_a_program_without_questions_in_one_line(tmp_path):
    """tools/fit_encoder_adapter.py names the program that cannot give training questions (a shim package, no
    docstrings), before any model loads."""
    root = tmp_path / "shim"
    root.mkdir()
    (root / "__init__.py").write_text("from real import *\n")
    proc = subprocess.run([sys.executable, "-m", "tools.fit_encoder_adapter", "--programs", str(root), "--validate", "",
                           "--work", str(tmp_path / "work")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert re.match(rf"^tools\.fit_encoder_adapter: '{re.escape(str(root))}' cannot be used: .*no documented def/class",
                    proc.stderr)
