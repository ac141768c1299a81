"""Stage `facts` (docs/behaviour.md §5): a card per packed definition, what its AST says, for the scaffold.

`facts=cards` (`FactCards`) writes one line per definition that starts in a packed window (the scaffold's lead
choices): its signature with defaults, what it returns (None, the expressions, or that it yields), what it raises,
the program's definitions it calls and those that call it (the index's call graph), its decorators and the module
constants it reads; a class's bases and methods; a constant's value (stages/common/program/cards.py). Cards of the
best windows come first, until the next would pass `tokens` (counted with the model's tokenizer, as data).
`facts=none` (`NoFacts`) gives no cards, and the prompt is the scaffold's without them.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

from pipeline.engine.stage import Range, Stage
from stages.common.program.cards import FactCards, build_cards
from stages.common.tokens import encode_texts
from stages.common.types import Evidence, LanguageModel, ProgramIndex


class BuildFactCards(Stage):
    """`facts=cards`: the cards of the packed definitions, best window first, within `tokens`."""

    outputs = {"facts": FactCards}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        tokens: Annotated[int, Range(ge=0)] = 384  # the cards' tokens at most (the model's tokenizer); 0: none
        max_names: Annotated[int, Range(ge=1)] = 6  # names listed per field (calls, called by, methods), then +N more

    config: Config

    def run(self, evidence: Evidence, index: ProgramIndex, lm: LanguageModel) -> dict:
        c = self.config
        cards = build_cards(evidence, index, c.max_names)
        kept, used = [], 0
        for text, ids in zip(cards, encode_texts(lm.tokenizer, [card + "\n" for card in cards])):
            if used + len(ids) > c.tokens:
                break
            kept.append(text)
            used += len(ids)
        return {"facts": FactCards(tuple(kept), used, len(cards) - len(kept))}


class NoFacts(Stage):
    """`facts=none`: no cards (same ports as `facts=cards`); the scaffold's prompt is as without a facts node."""

    outputs = {"facts": FactCards}

    def run(self, evidence: Evidence, index: ProgramIndex, lm: LanguageModel) -> dict:
        return {"facts": FactCards()}
