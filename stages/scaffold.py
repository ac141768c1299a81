"""Stage `scaffold` (docs/behaviour.md §5): the chat messages, with the evidence blocks and the citation scaffold.

`scaffold=standard` asks for `[path:START-END]` citations; `scaffold=strong` (the stage-2 retry) asks that
every paragraph end with one. `form=lead` (grounded generation for a small model) asks the model to lead with
the definition that answers the question, `` `name` [path:A-B] ``, then explain it: the prompt carries every
definition of the packed windows as a lead choice, and decoding (with `decode.constrain`) lets the model pick
one of those only. The question follows the evidence.
`adapter_aware_decoding` adds a pointer-first line, relaxes sampling a little (via `Prompt.decode_hints`) and may
prefill the reply with the citation of the best window.

The prompt's token ids are made here (stages/common/tokens.py), and program text, file names and the question are
data: a docstring holding `<|im_start|>` can never become a chat-turn token. Only the chat template itself
contributes special tokens.
The `facts` node's cards (what the AST says of each packed definition) follow the [ctx] blocks, message content
like them, so data; without cards (`facts=none`) the prompt is unchanged.
A chat follow-up's `history` (the earlier question, answer and cited code, pipeline/followup.py) goes before the
evidence, cut to `history_tokens`; it is message content too, so data. Without history the prompt is unchanged.
`map_tokens` puts the program's map (files and symbols by call-graph rank, stages/common/program/outline.py), cut to
that many tokens, before the evidence, as data too; 0 (the default): none, the prompt unchanged.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from pipeline.engine.errors import InputError
from pipeline.engine.stage import Range, Stage
from stages.common.grounding.identifiers import DOTTED, IDENT
from stages.common.grounding.labels import label_spans
from stages.common.grounding.leads import LeadChoice, offered
from stages.common.program.cards import FactCards
from stages.common.program.outline import map_block
from stages.common.retrieval.names import find_names
from stages.common.tokens import encode_chat, encode_text, encode_texts
from stages.common.types import Evidence, LanguageModel, ProgramIndex, Prompt

SYSTEM = ("You answer questions about a program. Use only the source code shown in the [ctx] blocks, "
          "and say which lines you relied on.")


NEUTRAL_QUESTION = "What does this code do?"
HISTORY_OPEN, HISTORY_CLOSE = "[earlier conversation]", "[end of earlier conversation]"


def trim_history(tok, history: str, budget: int) -> str:
    """``history``'s first lines that fit in ``budget`` tokens (counted line by line), framed; "" when none fit."""
    if not history or budget <= 0:
        return ""
    lines = history.splitlines()
    kept, used = [], 0
    for line, ids in zip(lines, encode_texts(tok, [line + "\n" for line in lines])):
        if used + len(ids) > budget:
            kept.append("… (earlier conversation cut at scaffold.history_tokens)")
            break
        kept.append(line)
        used += len(ids)
    return "\n".join([HISTORY_OPEN, *kept, HISTORY_CLOSE]) if used else ""


def lead_choices(evidence: Evidence, index: ProgramIndex | None, question: str = "") -> dict[str, int]:
    """`` `qualname` [path:A-B] `` for every definition inside a packed window (its span clipped to the window), the
    innermost function or method a window starts inside (the window's own span: a long function's matching part), and
    every value the question names or that is a table (grounding.leads.offered), best window first, each with the
    position of its window."""
    if index is None:
        return {}
    named = {s.node_id for s in find_names(index, question).symbols} if question else set()
    choices: dict[str, int] = {}
    for rank, window in enumerate(evidence.windows):
        symbols = index.symbols_in(window.path)
        enclosing = [s for s in symbols if s.kind in ("function", "method") and s.start < window.start <= s.end]
        if enclosing:
            inner = max(enclosing, key=lambda s: s.start)
            lead = LeadChoice(inner.qualname, window.path, window.start, min(inner.end, window.end))
            choices.setdefault(lead.text, rank)
        for symbol in symbols:
            start, end = symbol.start, min(symbol.end, window.end)
            if window.start <= start <= end and offered(symbol, named):
                choices.setdefault(LeadChoice(symbol.qualname, window.path, start, end).text, rank)
    return choices


def evidence_names(evidence: Evidence, index: ProgramIndex | None, question: str) -> list[str]:
    """What inline code may name: identifiers and dotted names of the packed windows and of the question, and the
    qualnames of the definitions in those windows."""
    names: set[str] = set()
    for text in [question, *(w.text for w in evidence.windows)]:
        names.update(IDENT.findall(text))
        names.update(re.findall(DOTTED, text))
    if index is not None:
        for window in evidence.windows:
            names.update(s.qualname for s in index.symbols_in(window.path) if window.start <= s.start <= window.end)
    return sorted(names)


class BuildPrompt(Stage):
    outputs = {"prompt": Prompt}

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config:
        system: str = SYSTEM
        require_citations: bool = True
        citations_per_paragraph: bool = False
        min_citations: Annotated[int, Range(ge=0)] = 1
        scaffold: Literal["standard", "strong"] = "standard"
        form: Literal["free", "lead"] = "lead"
        adapter_aware_decoding: bool = False
        prefill_pointer: bool = False
        attempt: Annotated[int, Range(ge=1)] = 1
        max_question_tokens: Annotated[int, Range(ge=1)] = 512  # the top-level key's limit, counted in tokens here
        history_tokens: Annotated[int, Range(ge=0)] = 768  # a chat follow-up's earlier turn, at most; 0: none
        map_tokens: Annotated[int, Range(ge=0)] = 0  # the program's map (most central first) before the evidence; 0: none
        instruction: str | None = None  # the rules after the question ({example}: a packed span); None: built below

    config: Config

    def rules(self, example: str) -> list[str]:
        c = self.config
        if c.instruction is not None:
            return [c.instruction.replace("{example}", example)]
        rules: list[str] = []
        if c.form == "lead":
            rules.append(f"Start with the definition that answers the question, written as `name` [{example}]. "
                         "Then explain in two to four sentences how that code answers the question.")
        if c.require_citations:
            if c.scaffold == "strong":
                rules.append(f"End each paragraph with the lines it relies on in brackets, like [{example}].")
                rules.append("Use only paths and line ranges from the [ctx] headers above.")
            elif c.form != "lead":  # the lead carries its citation: a second rule about brackets invites runs of them
                rules.append(f"Cite the lines you rely on in brackets, like [{example}], "
                             "using only the files shown in the [ctx] blocks.")
            if c.citations_per_paragraph:
                rules.append("Every paragraph must carry at least one citation.")
            elif c.min_citations > 1:
                rules.append(f"Give at least {c.min_citations} citations overall.")
        rules.append("Use only names that appear in the code above.")
        return rules

    def run(self, prompt: str, evidence: Evidence, lm: LanguageModel, index: ProgramIndex | None = None,
            history: str | None = None, facts: FactCards | None = None) -> dict:
        c = self.config
        asked = len(encode_text(lm.tokenizer, prompt))
        if asked > c.max_question_tokens:  # the product bounded its characters; the model's positions bound its tokens
            raise InputError(f"the question (prompt) is {asked:,} tokens; a question may have max_question_tokens="
                             f"{c.max_question_tokens} tokens: ask a shorter one")
        earlier = trim_history(lm.tokenizer, history or "", c.history_tokens)
        # the earlier turn goes with the evidence: the evidence-free prompt (decode.cad_alpha) has neither
        cards = facts.block() if facts is not None else ""
        program_map = map_block(lm.tokenizer, index, c.map_tokens)  # with the evidence, so data like it
        blocks = "\n\n".join([earlier] * bool(earlier) + [program_map] * bool(program_map)
                               + [w.block() for w in evidence.windows] + [cards] * bool(cards))
        first = evidence.windows[0] if evidence.windows else None
        example = f"{first.path}:{first.start}-{first.end}" if first else "path.py:1-9"
        rules = self.rules(example)
        hints: dict[str, float] = {}
        prefill = ""
        if c.adapter_aware_decoding and c.require_citations:
            rules.insert(0, "Start your answer with a citation of the most relevant lines.")
            hints = {"top_p": 0.03, "repetition_penalty": -0.05}
            if c.prefill_pointer and first:
                prefill = f"[{example}] "
        messages = self.messages(prompt, blocks, rules)
        text, ids = self.encode(lm.tokenizer, messages)
        definitions = lead_choices(evidence, index, prompt)
        lead = list(definitions) if c.form == "lead" and not prefill else []
        # the same prompt asking nothing in particular: what a lead choice owes to the question (decode.lead_calibrate)
        neutral_ids = self.encode(lm.tokenizer, self.messages(NEUTRAL_QUESTION, blocks, rules))[1] if lead else []
        # a citation names a packed window or a definition inside one
        located = {f"{w.path}:{w.start}-{w.end}": (w.path, w.start, w.end) for w in evidence.windows}
        for choice in map(LeadChoice.parse, definitions):
            located.setdefault(choice.span, (choice.path, choice.start, choice.end))
        citations = list(located)
        names = evidence_names(evidence, index, f"{prompt}\n{cards}" if cards else prompt)  # cards name callers too
        # the same prompt without the evidence: what context-aware decoding (decode.cad_alpha) contrasts with
        plain_ids = self.encode(lm.tokenizer, self.messages(prompt, "", rules))[1]
        return {"prompt": Prompt(messages, text, prefill, c.attempt, hints, ids=ids, citations=citations,
                                 lead=lead, names=names, lead_rank=[definitions[c] for c in lead],
                                 neutral_ids=neutral_ids, plain_ids=plain_ids,
                                 quotes=[line for w in evidence.windows for line in w.text.splitlines()],
                                 labels=label_spans(index, names, located) if index is not None else {})}

    def messages(self, question: str, blocks: str, rules: list[str]) -> list[dict[str, str]]:
        evidence = f"{blocks}\n\n" if blocks else ""
        content = f"{evidence}Question: {question}\n\n" + " ".join(rules)
        return [{"role": "system", "content": self.config.system}, {"role": "user", "content": content}]

    def encode(self, tok, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        if tok.chat_template:
            return encode_chat(tok, messages)
        text = f"{messages[0]['content']}\n\n{messages[1]['content']}\n\nAnswer:"
        return text, encode_text(tok, text)
