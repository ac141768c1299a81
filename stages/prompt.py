"""Stage `prompt` (SPEC §5): the chat messages, with the evidence blocks and the citation scaffold.

`scaffold=standard` asks for `path:START-END` citations; `scaffold=strong` (the stage-2 retry) asks that
every paragraph end with `[path:A-B]`. `adapter_aware_decoding` adds a pointer-first line, relaxes sampling
a little (via `Prompt.decode_hints`) and may prefill the reply with the citation of the best window.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pipeline.stage import Range, Stage
from stages.common.types import Evidence, LanguageModel, Prompt

SYSTEM = ("You answer questions about a program. Use only the source code shown in the [ctx] blocks, "
          "and say which lines you relied on.")


class BuildPrompt(Stage):
    outputs = {"prompt": Prompt}

    def __init__(self, system: str = SYSTEM, require_citations: bool = True, citations_per_paragraph: bool = False,
                 min_citations: Annotated[int, Range(ge=0)] = 3, scaffold: Literal["standard", "strong"] = "standard",
                 adapter_aware_decoding: bool = False, prefill_pointer: bool = False,
                 attempt: Annotated[int, Range(ge=1)] = 1):
        self.system, self.require_citations, self.per_paragraph = system, require_citations, citations_per_paragraph
        self.min_citations, self.scaffold, self.attempt = min_citations, scaffold, attempt
        self.adapter_aware, self.prefill_pointer = adapter_aware_decoding, prefill_pointer

    def run(self, prompt: str, evidence: Evidence, lm: LanguageModel) -> dict:
        blocks = "\n\n".join(w.block() for w in evidence.windows)
        example = f"{evidence.windows[0].path}:{evidence.windows[0].start}-{evidence.windows[0].end}" if evidence.windows else "path.py:1-9"
        rules = []
        if self.require_citations:
            if self.scaffold == "strong":
                rules.append(f"End each paragraph with the lines it relies on in brackets, like [{example}].")
                rules.append("Use only paths and line ranges from the [ctx] headers above.")
            else:
                rules.append(f"End every claim with a citation path:START-END, for example {example}.")
                rules.append("Cite only files shown in the [ctx] blocks above.")
            if self.per_paragraph:
                rules.append("Every paragraph must carry at least one citation.")
            elif self.min_citations:
                rules.append(f"Give at least {self.min_citations} citations overall.")
        hints: dict[str, float] = {}
        prefill = ""
        if self.adapter_aware and self.require_citations:
            rules.insert(0, "Start your answer with a citation of the most relevant lines.")
            hints = {"top_p": 0.03, "repetition_penalty": -0.05}
            if self.prefill_pointer and evidence.windows:
                prefill = f"[{example}] "
        content = f"{blocks}\n\nQuestion: {prompt}"
        if rules:
            content += "\n\n" + " ".join(rules)
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": content}]
        tok = lm.tokenizer
        if tok.chat_template:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{self.system}\n\n{content}\n\nAnswer:"
        return {"prompt": Prompt(messages, text, prefill, self.attempt, hints)}
