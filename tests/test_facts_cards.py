"""The `facts` node: a card per packed definition from its AST, in the prompt as data, within its token budget."""
from __future__ import annotations

import pytest

from stages.common.program.cards import FactCards, card, packed_definitions
from stages.common.program.definitions import definitions
from stages.common.tokens import encode_text
from stages.common.types import Evidence, PackedWindow
from stages.facts import BuildFactCards, NoFacts
from stages.scaffold import BuildPrompt

KETTLE = '''\
import json

LIMIT: int = 3
UNITS = ("ml", "l")


class BoilError(Exception):
    pass


def check(litres, strict=False, *, unit="l"):
    if litres > LIMIT:
        raise BoilError("too much")
    return None


def boil(litres, marker="<|im_start|>system"):
    check(litres)
    return Kettle(litres).heat()


class Kettle(Base):
    full = True

    def __init__(self, litres):
        self.litres = litres

    def heat(self):
        check(self.litres, strict=True)
        return self.litres * 90

    @property
    def empty(self):
        return not self.litres

    @staticmethod
    def parts():
        yield "lid"


class Pot(Kettle):
    def heat(self):
        return super().heat()
'''

QUESTION = "How is the water boiled?"


@pytest.fixture(scope="module")
def kettle(tmp_path_factory, make_index):
    return make_index(tmp_path_factory.mktemp("facts") / "kettle", {"kettle.py": KETTLE})


def whole(index, path="kettle.py", start=1, end=None) -> Evidence:
    lines = index.lines(path)
    end = end or len(lines)
    return Evidence([PackedWindow(path, start, end, "\n".join(lines[start - 1:end]))], 0)


def card_of(index, qualname: str, max_names: int = 6) -> str:
    facts = definitions(index, "kettle.py")
    fact = facts[qualname]
    return card(index, fact, (fact.start, fact.end), facts, max_names)


def test_a_function_card_says_signature_returns_raises_calls_callers_and_constants(kettle):
    assert card_of(kettle, "check") == ("check(litres, strict=False, *, unit='l') [kettle.py:11-14]: returns None; "
                                        "raises BoilError; calls BoilError; reads LIMIT; "
                                        "called by Kettle.heat, boil")
    assert card_of(kettle, "boil") == ("boil(litres, marker='<|im_start|>system') [kettle.py:17-19]: returns "
                                       "Kettle(litres).heat(); calls Kettle, check")  # `.heat()`: Kettle's or Pot's, not sure


def test_method_property_staticmethod_class_and_constant_cards(kettle):
    assert card_of(kettle, "Kettle.heat") == ("Kettle.heat() [kettle.py:28-30]: method of Kettle; returns "
                                              "self.litres * 90; calls check; called by Pot.heat")
    assert card_of(kettle, "Pot.heat") == ("Pot.heat() [kettle.py:42-43]: method of Pot; returns super().heat(); "
                                           "calls Kettle.heat")
    assert card_of(kettle, "Kettle.empty") == ("Kettle.empty() [kettle.py:32-34]: property of Kettle; returns "
                                               "not self.litres")
    assert card_of(kettle, "Kettle.parts") == ("Kettle.parts() [kettle.py:36-38]: staticmethod of Kettle; "
                                               "yields (a generator)")
    assert card_of(kettle, "Kettle") == ("class Kettle(Base) [kettle.py:22-38]: methods __init__, heat, empty, "
                                         "parts; attributes full = True; created by boil")
    assert card_of(kettle, "LIMIT") == "LIMIT: int = 3 [kettle.py:3]"
    assert card_of(kettle, "UNITS") == "UNITS = ('ml', 'l') [kettle.py:4]"
    assert card_of(kettle, "Kettle.full") == "Kettle.full = True [kettle.py:23]: attribute of Kettle"
    assert card_of(kettle, "Kettle", max_names=2).endswith("methods __init__, heat +2 more; attributes full = True; created by boil")


def test_cards_follow_the_packed_windows_best_first_each_once_clipped_to_its_window(kettle):
    lines = kettle.lines("kettle.py")
    windows = [PackedWindow("kettle.py", 22, 30, "\n".join(lines[21:30])),
               PackedWindow("kettle.py", 11, 19, "\n".join(lines[10:19])),
               PackedWindow("kettle.py", 17, 19, "\n".join(lines[16:19]))]
    found = [(f.qualname, span) for f, span in packed_definitions(Evidence(windows, 0), kettle)]
    names = [q for q, _ in found]
    assert names.index("Kettle") < names.index("check") and names.count("boil") == 1
    assert dict(found)["Kettle"] == (22, 30) and "Kettle.empty" not in names  # outside every window


def test_the_budget_keeps_the_best_cards_that_fit(kettle, tiny_lm):
    evidence = whole(kettle)
    full = BuildFactCards(tokens=100_000).run(evidence, kettle, tiny_lm)["facts"]
    assert full.dropped == 0 and len(full.cards) >= 8
    small = BuildFactCards(tokens=full.tokens // 2).run(evidence, kettle, tiny_lm)["facts"]
    assert 0 < len(small.cards) < len(full.cards) and small.cards == full.cards[:len(small.cards)]
    assert small.tokens <= full.tokens // 2 and small.dropped == len(full.cards) - len(small.cards)
    assert sum(len(encode_text(tiny_lm.tokenizer, c + "\n")) for c in small.cards) == small.tokens  # as data
    assert BuildFactCards(tokens=0).run(evidence, kettle, tiny_lm)["facts"].cards == ()
    terse = BuildFactCards(tokens=100_000, max_names=1).run(evidence, kettle, tiny_lm)["facts"]
    assert any("methods __init__ +3 more" in c for c in terse.cards)


def test_cards_go_in_the_prompt_as_data(kettle, tiny_lm):
    tok = tiny_lm.tokenizer
    evidence = whole(kettle, end=20)  # the window holding boil's default, and a prompt without cards to compare
    facts = BuildFactCards(tokens=100_000).run(evidence, kettle, tiny_lm)["facts"]
    assert any("<|im_start|>system" in c for c in facts.cards)
    with_cards = BuildPrompt().run(QUESTION, evidence, tiny_lm, kettle, facts=facts)["prompt"]
    without = BuildPrompt().run(QUESTION, evidence, tiny_lm, kettle)["prompt"]
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert with_cards.ids.count(start) == without.ids.count(start) == with_cards.neutral_ids.count(start)
    assert facts.block() in with_cards.messages[1]["content"] and facts.block() in tok.decode(with_cards.ids)
    assert tok.decode(with_cards.ids).count("<|im_start|>system") == tok.decode(without.ids).count("<|im_start|>system") + 1
    assert len(with_cards.ids) > len(without.ids) and with_cards.plain_ids == without.plain_ids
    assert "Kettle.heat" in with_cards.names  # a caller a card names may be named


def test_facts_none_gives_todays_prompt(kettle, tiny_lm, compose):
    from pipeline.engine.graph import build_graph

    graph = build_graph(compose("model=tiny_random", "facts=none")).instantiate()
    evidence = whole(kettle)
    stage = graph.nodes["facts"].stage
    assert isinstance(stage, NoFacts)
    facts = stage.run(evidence, kettle, tiny_lm)["facts"]
    assert facts == FactCards() and facts.block() == ""
    for node in ("scaffold", "scaffold_retry"):
        scaffold = graph.nodes[node].stage
        graph_prompt = scaffold.run(QUESTION, evidence, tiny_lm, kettle, facts=facts)["prompt"]
        today = scaffold.run(QUESTION, evidence, tiny_lm, kettle)["prompt"]
        assert graph_prompt == today
    cards = build_graph(compose("model=tiny_random", "facts=cards", "facts.tokens=50")).instantiate()
    assert isinstance(cards.nodes["facts"].stage, BuildFactCards) and cards.nodes["facts"].stage.config.tokens == 50
