"""The retrieval the eval tunes: BM25F window relevance (select, pack), test-file weight, window interleaving."""
from __future__ import annotations

import pytest

from pipeline.engine.errors import ConfigError
from stages.common.program.walk import is_test_path
from stages.common.retrieval.scoring import RELEVANCE, check_relevance, score_windows, stem, terms
from stages.common.types import PackedWindow
from stages.pack import PackWindows, interleave, rank_windows
from stages.select import QuestionSelect

TREE = {
    "shop/cart.py": (
        "class Cart:\n"
        "    def add_item(self, item, quantity):\n"
        "        self.items.append((item, quantity))\n\n"
        "    def total_price(self, prices):\n"
        "        return sum(prices[i] * q for i, q in self.items)\n\n\n"
        "def parse_coupon(code):\n"
        "    return code.strip().upper()\n"
    ),
    "shop/shipping.py": "def shipping_cost(weight, distance):\n    return weight * distance * 0.1\n",
    "tests/test_cart.py": "from shop.cart import Cart\n\n\ndef test_total_price():\n    assert Cart().total_price({}) == 0\n",
}


@pytest.fixture(scope="module")
def index(tmp_path_factory, make_index):
    return make_index(tmp_path_factory.mktemp("shop"), TREE)


def test_stemming_joins_inflections_and_compounds():
    assert stem("parses") == stem("parsing") == stem("parsed") == stem("parse")
    assert stem("entries") == stem("entry") and stem("class") == "class" and stem("status") == "status"
    assert "totalpric" in terms("total_price") and "totalpric" in terms("totalPrice")


def test_windows_are_ranked_by_the_question(index):
    ranked = rank_windows(index, "How is the total price of the cart computed?", RELEVANCE)
    best = ranked["shop/cart.py"][0][1]
    assert best.anchor == "Cart" and ranked["shop/cart.py"][0][0] > ranked["shop/cart.py"][-1][0]
    assert rank_windows(index, "which coupon codes are parsed", RELEVANCE)["shop/cart.py"][0][1].anchor == "parse_coupon"
    assert score_windows(index, "qqq zzz", RELEVANCE) == {}


def test_select_prefers_the_definition_over_its_test(index):
    question = "What does total_price return for an empty cart?"
    assert QuestionSelect().run(index, question)["selection"].files[0] == "shop/cart.py"
    tests_first = QuestionSelect(test_weight=10.0).run(index, question)["selection"].files
    assert tests_first[0] == "tests/test_cart.py"
    assert is_test_path("tests/test_cart.py") and is_test_path("pkg/test_x.py") and not is_test_path("shop/cart.py")


def window(path, start, score):
    return PackedWindow(path, start, start + 1, "x", score)


def test_interleave_second_windows_by_weight():
    firsts = [window("a", 1, 10.0), window("b", 1, 6.0), window("c", 1, 2.0)]
    seconds = [window("a", 5, 8.0), window("b", 5, 1.0)]
    by_file = interleave(firsts, seconds, 0.0)
    assert [(w.path, w.start) for w in by_file] == [("a", 1), ("b", 1), ("c", 1), ("a", 5), ("b", 5)]
    by_score = interleave(firsts, seconds, 1.0)
    assert [(w.path, w.start) for w in by_score] == [("a", 1), ("a", 5), ("b", 1), ("c", 1), ("b", 5)]
    half = interleave(firsts, seconds, 0.5)  # 8 x 0.5 = 4 < 6: after b's best, before c's
    assert [(w.path, w.start) for w in half] == [("a", 1), ("b", 1), ("a", 5), ("c", 1), ("b", 5)]


def test_pack_relevance_is_checked():
    with pytest.raises(ConfigError, match="unknown relevance key 'nam'"):
        PackWindows(relevance={"nam": 1.0})
    with pytest.raises(ConfigError, match="relevance.k1 must be a number >= 0"):
        check_relevance("pack", {"k1": -1})
    assert check_relevance("pack", {"name": 2})["name"] == 2.0


def test_heuristic_rerank_adjusts_select_order_by_query_dependent_proxies(index):
    from stages.common.types import Selection
    from stages.rerank import HeuristicRerank

    question = "shipping cost for a weight and distance"
    files = ["shop/cart.py", "shop/shipping.py", "tests/test_cart.py"]
    selection = Selection(files, ["shop.cart", "shop.shipping"], {"shop/cart.py": 2.0, "shop/shipping.py": 1.0,
                                                                 "tests/test_cart.py": 0.5}, [], 3)
    only_select = dict(signatures=0, docstrings=0, tests=0, public=0, centrality=0, selection=1)
    assert HeuristicRerank(**only_select).run(index, selection, question)["selection"].files == files
    # the signature holding the question's words (weight, distance) outweighs select's order
    by_signature = HeuristicRerank(**dict(only_select, signatures=3)).run(index, selection, question)["selection"]
    assert by_signature.files[0] == "shop/shipping.py"
    assert by_signature.scores["shop/shipping.py"] > by_signature.scores["shop/cart.py"]
    # a question-independent prior alone: the tested file (one of its symbols is tested) comes first
    by_tests = HeuristicRerank(**dict(only_select, selection=0, tests=1)).run(index, selection, question)
    assert by_tests["selection"].files[0] == "shop/cart.py" and by_tests["selection"].scores["shop/shipping.py"] == 0


KETTLE = {
    "kettle/__init__.py": "",
    "kettle/boil.py": 'def boil(litres, temperature):\n    """Heat the water until it steams."""\n    return litres * temperature\n',
    "kettle/pour.py": "def pour(cup):\n    return cup\n",
}


@pytest.mark.parametrize("key, value, question, grows", [
    ("name_weight", 8.0, "boil", True),  # the definition's name
    ("doc_weight", 1.0, "steam", True),  # only its docstring says it
    ("signature_weight", 1.0, "temperature", True),  # a parameter (and the source text)
    ("path_weight", 2.0, "kettle", True),  # only the path says it
    ("text_weight", 1.0, "litres", True),  # the source text (and a parameter, which weighs 0 by default)
    ("k1", 1.5, "litres temperature", None),  # saturation: more or less, but another score
    ("b", 0.0, "litres temperature", None),  # length normalisation
])
def test_each_bm25f_weight_of_select_moves_the_score_of_the_field_it_weighs(tmp_path, make_index, key, value,
                                                                          question, grows):
    index = make_index(tmp_path, KETTLE)
    before = QuestionSelect().run(index, question)["selection"].scores["kettle/boil.py"]
    after = QuestionSelect(**{key: value}).run(index, question)["selection"].scores["kettle/boil.py"]
    assert after > before if grows else after != before


def test_heuristic_rerank_docstring_public_and_centrality_proxies(tmp_path, make_index):
    from stages.common.types import Selection
    from stages.rerank import HeuristicRerank

    index = make_index(tmp_path, {
        "tea/__init__.py": "",
        "tea/brew.py": 'def brew(leaves):\n    """Steep the leaves in hot water."""\n    return leaves\n',
        "tea/_cache.py": "def _get(key):\n    return key\n\n\ndef _put(key, value):\n    return value\n",
        "tea/cup.py": "from tea.brew import brew\nfrom tea._cache import _get\n\n\ndef serve(cup):\n    return brew(_get(cup))\n",
        "tea/pot.py": "from tea._cache import _get\n\n\ndef fill(pot):\n    return _get(pot)\n",
    })
    files = ["tea/_cache.py", "tea/cup.py", "tea/pot.py", "tea/brew.py"]
    selection = Selection(files, [], {f: 1.0 for f in files}, [], 4)
    zero = dict(signatures=0, docstrings=0, tests=0, public=0, centrality=0, selection=0)

    def order(**weights):
        return HeuristicRerank(**dict(zero, **weights)).run(index, selection, "steep the leaves")["selection"].files

    assert order() == files  # no proxy: select's order
    assert order(docstrings=1)[0] == "tea/brew.py"  # the docstring holding the question's words
    assert order(public=1) == ["tea/cup.py", "tea/pot.py", "tea/brew.py", "tea/_cache.py"]  # only private symbols
    assert order(centrality=1)[:2] == ["tea/_cache.py", "tea/brew.py"]  # imported and called by two files, by one


def test_the_baseline_k1_and_b_are_bm25s(tmp_path, make_index):
    """A short window saying the word once against a long one saying it twice: length normalisation (b) favours the
    short one, term frequency (k1 > 0, without normalisation) the long one."""
    from stages.baseline import BM25Windows
    from stages.common.retrieval.evaluation import Question, QuestionSet

    long = "".join(f"    x{i} = alpha + beta + gamma + delta\n" for i in range(30))
    index = make_index(tmp_path, {"a.py": "def a():\n    return kettle\n",
                                  "b.py": f"def b():\n    kettle = 1\n{long}    return kettle\n"})
    asked = QuestionSet("x", [Question("kettle", "a.py", 1, 2)], 1)

    def first(**config):
        return BM25Windows(**config).run(index, asked)["run"].records[0].files[0]

    assert first() == first(b=1.0) == "a.py"
    assert first(b=0.0) == first(k1=3.0, b=0.0) == "b.py"
    assert first(k1=0.0, b=0.0) == "a.py"  # k1 0: any count is one, a tie in index order


def test_pack_relevance_chooses_a_files_best_window(index, tiny_lm):
    from stages.common.types import Selection

    selection = Selection(["shop/cart.py"], ["shop.cart"], {"shop/cart.py": 1.0}, [], 1)

    def packed(**relevance):
        stage = PackWindows(windows_per_file=1, context_tokens=100_000, relevance=relevance)
        return [(w.start, w.end) for w in stage.run(index, selection, "coupon items", tiny_lm)["evidence"].windows]

    # select's weights pack the head window (lines 1-10); a slower saturation (k1 3) ranks parse_coupon's first
    assert packed() == [(1, 10)] and packed(k1=3.0) == [(9, 10)]
