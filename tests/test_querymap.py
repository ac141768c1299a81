"""`select.query_map`: a learned linear map of the question's MiniLM vector (stages/common/retrieval/querymap.py), the
shipped map, and its fitting (bench/query_map.py)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bench.query_map import EVALUATED, PHRASINGS, ProgramPairs, fit, recall_at
from pipeline.engine.errors import InputError
from stages.common.retrieval import querymap
from stages.select import HybridSelect

PROGRAM = {
    "kettle.py": "def boil_water(kettle):\n    kettle.heat(100)\n    return kettle\n\n\n"
                 "def pour_tea(cup):\n    cup.fill('tea')\n",
    "cup.py": "def rinse_cup(cup):\n    cup.wash('sink')\n",
}


def _write(path, matrix, meta=None):
    querymap.write(path, matrix, meta or {})
    return str(path)


def test_the_shipped_map_is_square_finite_near_the_identity_and_trained_on_no_evaluated_program():
    matrix = querymap.load("minilm_code_search", 384)
    assert matrix.shape == (384, 384) and matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert 0 < np.linalg.norm(matrix - np.eye(384)) < np.linalg.norm(np.eye(384))
    with np.load(querymap.resolve("minilm_code_search"), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
    assert meta["programs"] and not set(meta["programs"]) & EVALUATED and meta["phrasings"] == list(PHRASINGS)


def test_apply_maps_and_normalises_rows():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    assert np.allclose(querymap.apply(np.eye(2, dtype=np.float32), vectors), [[0.6, 0.8], [0.0, 0.0]])
    swap = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    assert np.allclose(querymap.apply(swap, vectors)[0], [0.8, 0.6])


BAD_MAPS = [
    ("not a zip", lambda p: p.write_bytes(b"garbage"), "is not a readable npz file"),
    ("no matrix", lambda p: np.savez(p, other=np.eye(2)), "has no 'matrix' array (it has: other)"),
    ("not square", lambda p: np.savez(p, matrix=np.ones((2, 3))), "must be a square float array"),
    ("integers", lambda p: np.savez(p, matrix=np.eye(2, dtype=np.int64)), "must be a square float array"),
    ("NaN", lambda p: np.savez(p, matrix=np.array([[1.0, np.nan], [0.0, 1.0]])), "holds NaN or inf"),
    ("object array", lambda p: np.savez(p, matrix=np.array([None, 1], dtype=object)), "is not a readable npz file"),
]


@pytest.mark.parametrize("name, make, expected", BAD_MAPS, ids=[r[0] for r in BAD_MAPS])
def test_a_bad_map_file_is_an_input_error_naming_it(tmp_path, name, make, expected):
    path = tmp_path / "map.npz"
    make(path)
    with pytest.raises(InputError, match="select.query_map file") as err:
        querymap.load(str(path))
    assert expected in str(err.value) and str(path) in str(err.value)


def test_unknown_names_and_wrong_widths_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a shipped map .known: minilm_code_search"):
        querymap.resolve("no_such_map")
    with pytest.raises(InputError, match="is not a file"):
        querymap.resolve(str(tmp_path / "missing.npz"))
    with pytest.raises(InputError, match="is 2x2, the sentence encoder's vectors have 384 dimensions"):
        querymap.load(_write(tmp_path / "small.npz", np.eye(2)), 384)


def test_a_rewritten_map_file_is_read_again(tmp_path):
    path = tmp_path / "map.npz"
    first = querymap.load(_write(path, np.eye(3)))
    second = querymap.load(_write(path, 2 * np.eye(3)))
    assert np.array_equal(first, np.eye(3)) and np.array_equal(second, 2 * np.eye(3))


def test_hybrid_select_uses_the_map_on_the_question_only(tmp_path, make_index):
    index = make_index(tmp_path / "prog", PROGRAM)
    prompt = "Where is the water boiled in the kettle?"
    plain = HybridSelect(cache_dir=str(tmp_path), progress=False, dense_weight=1.0, query_map=None).run(
        index, prompt)["selection"]
    identity = HybridSelect(cache_dir=str(tmp_path), progress=False, dense_weight=1.0,
                            query_map=_write(tmp_path / "eye.npz", np.eye(384))).run(index, prompt)["selection"]
    assert identity.window_ranking == plain.window_ranking
    # a map that sends every question to minus itself turns the dense ranking around
    flipped = HybridSelect(cache_dir=str(tmp_path), progress=False, dense_weight=1.0,
                           query_map=_write(tmp_path / "minus.npz", -np.eye(384))).run(index, prompt)["selection"]
    assert flipped.files[-1] == plain.files[0] != flipped.files[0]


def test_a_bad_map_fails_the_precheck_before_anything_loads(tmp_path):
    stage = HybridSelect(query_map=str(tmp_path / "missing.npz"))
    with pytest.raises(InputError, match="missing.npz' is not a file"):
        stage.precheck(prompt="q")
    HybridSelect(query_map=None).precheck(prompt="q")  # no map: nothing to check


def _pairs(rotation: np.ndarray, rng: np.random.Generator, windows: int = 40) -> ProgramPairs:
    """Questions that are their definition's window vector turned by ``rotation`` plus a little noise."""
    vectors = rng.normal(size=(windows, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    questions = np.stack([vectors @ rotation.T + 0.05 * rng.normal(size=vectors.shape) for _ in PHRASINGS], 1)
    return ProgramPairs("synthetic", vectors, questions.astype(np.float32), [[i] for i in range(windows)])


def test_fitting_learns_a_map_that_generalises_to_another_program():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    train, held_out = [_pairs(rotation, rng) for _ in range(3)], _pairs(rotation, rng)
    identity = np.eye(8, dtype=np.float32)
    before = recall_at(identity, held_out, k=1)
    matrix = fit(train, epochs=30, lr=0.05, tau=0.1, reg=0.0, batch=32)
    assert matrix.shape == (8, 8) and recall_at(matrix, held_out, k=1) > max(0.9, before + 0.3)


def test_a_map_member_declaring_too_many_bytes_is_refused_from_its_header(tmp_path):
    from stages.common.adapters.factors import MAX_ARRAY_BYTES

    path = tmp_path / "bomb.npz"
    side = int((MAX_ARRAY_BYTES // 4) ** 0.5) + 1  # a square float32 matrix just over the bound
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32)) | {"shape": (side, side)}
    import io
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("matrix.npy", member.getvalue())  # the header only: no data behind it
    with pytest.raises(InputError, match="select.query_map file") as err:
        querymap.load(str(path))
    assert "declares shape" in str(err.value) and "nothing was read" in str(err.value)


def test_a_written_map_has_the_same_bytes_for_the_same_matrix(tmp_path):
    querymap.write(tmp_path / "a.npz", np.eye(3), {"epochs": 1})
    querymap.write(tmp_path / "b.npz", np.eye(3), {"epochs": 1})
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_a_program_without_questions_is_refused_in_one_line(tmp_path):
    """The fitting tools name the program that cannot give training questions (a shim package, no docstrings)."""
    from bench.query_map import labelled

    root = tmp_path / "shim"
    root.mkdir()
    (root / "__init__.py").write_text("from real import *\n")
    with pytest.raises(SystemExit, match=rf"^bench\.encoder_lora: '{re.escape(str(root))}' cannot be used: .*no documented def/class"):
        labelled(str(root), tmp_path / "work", tmp_path / "cache", "bench.encoder_lora")
