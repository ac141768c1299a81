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
