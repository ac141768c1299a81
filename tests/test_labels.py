"""Citations labelled with a definition's name whose span does not define it (stages/common/grounding/labels.py)."""
from __future__ import annotations

import pytest

from stages.common.grounding.labels import mark_mislabels, mislabels

TREE = {
    "base.py": ("class Node:\n"            # 1
                "    def get_flag(self):\n"  # 2
                "        return 1\n"         # 3
                "\n"                         # 4
                "    def set_value(self, v):\n"  # 5
                "        self.v = v\n"),     # 6
    "util.py": "def helper(x):\n    return x\n",
}


@pytest.fixture(scope="module")
def program(tmp_path_factory, make_index):
    return make_index(tmp_path_factory.mktemp("labels"), TREE)


def test_a_name_beside_another_definitions_span_is_mislabelled(program):
    text = ("`Node.get_flag` [base.py:2-3]\n"       # right: the lead form
            "`Node.set_value` [base.py:2-3] sets it.\n"  # a real name, another definition's span
            "`get_flag` [base.py:1-6] and `v` [base.py:5-6]\n"  # the class span holds it; `v` is no definition
            "`helper` [nowhere.py:1-2] `helper` [util.py:1-2]")  # a file outside the program is cite's business
    found = mislabels(text, program)
    assert [(m.name, m.path, m.start_line, m.end_line, m.defines) for m in found] == \
        [("Node.set_value", "base.py", 2, 3, "Node.get_flag")]
    marked = mark_mislabels(text, program, "mark")
    assert "`Node.set_value` [base.py:2-3] [not where `Node.set_value` is defined] sets it." in marked
    assert marked.replace(" [not where `Node.set_value` is defined]", "") == text
    assert mark_mislabels(text, program, "keep") == text
    assert mislabels("`Node.set_value` [base.py:5-6]", program) == []
    assert mislabels("`Node.set_value` [base.py:6-6]", program) == []  # a part of its body
    assert len(mislabels("`Node` [base.py:3-3]", program)) == 1  # a class is judged by where it starts


@pytest.mark.parametrize("variant", ["overlap", "none"])
def test_repair_marks_mislabelled_citations(program, variant):
    from stages.cite import CheckCitations
    from stages.common.types import Answer, Draft, Evidence, PackedWindow
    from stages.repair import AttributeByOverlap, MarkInvalidOnly

    evidence = Evidence([PackedWindow("base.py", 1, 6, "\n".join(program.lines("base.py")[:6]))], 40)
    text = "`Node.get_flag` [base.py:2-3]\nIt calls `Node.set_value` [base.py:2-3]."
    draft = Draft(text, 10, 10, 0.1, "cpu")
    report = CheckCitations(min_citations=1).run(draft=draft, index=program, evidence=evidence)["report"]
    answer = Answer(text, report.citations, draft, report, 0, False)
    make = (lambda **kw: AttributeByOverlap(threshold=0.25, **kw)) if variant == "overlap" else MarkInvalidOnly
    out = make().run(answer=answer, index=program, evidence=evidence)["answer"]
    assert out.text == text[:-1] + " [not where `Node.set_value` is defined]."
    assert len(out.citations) == 2  # marking adds no citation and removes none
    assert make(labels="keep").run(answer=answer, index=program, evidence=evidence)["answer"].text == text


def test_label_spans_are_the_citations_where_each_definition_starts(program):
    from stages.common.grounding.labels import label_spans

    citations = {"base.py:1-6": ("base.py", 1, 6), "base.py:2-3": ("base.py", 2, 3), "base.py:5-6": ("base.py", 5, 6),
                 "util.py:1-2": ("util.py", 1, 2)}
    spans = label_spans(program, ["Node.set_value", "set_value", "helper", "Node", "v", "x.y(", "get_flag"], citations)
    assert spans == {"Node.set_value": ["base.py:1-6", "base.py:5-6"], "set_value": ["base.py:1-6", "base.py:5-6"],
                     "helper": ["util.py:1-2"], "Node": ["base.py:1-6"], "get_flag": ["base.py:1-6", "base.py:2-3"]}
    assert label_spans(program, ["helper"], {"base.py:1-6": ("base.py", 1, 6)}) == {"helper": []}  # none packed
    body = {"base.py:6-6": ("base.py", 6, 6)}  # a window showing a part of a method's body
    assert label_spans(program, ["set_value", "Node", "get_flag"], body) == {"set_value": ["base.py:6-6"], "Node": [],
                                                                             "get_flag": []}


@pytest.mark.parametrize("sample", [False, True])
def test_decoding_with_labels_writes_no_mislabelled_citation(program, default_tokenizer, sample):
    """A stand-in model that keeps writing `name` [span] pairs with the span picked at random: unconstrained it
    mislabels; with decode.constrain labels, no pair it completes is mislabelled, and after a definition that no
    packed span holds it opens no citation at all."""
    import random

    import torch

    from stages.common.grounding.constraints import (
        CITATION_OPENER,
        CODE_OPENER,
        GroundingProcessor,
        TokenTrie,
        token_texts,
    )
    from stages.common.grounding.labels import label_spans

    tok = default_tokenizer
    texts = token_texts(tok)
    citations = ["base.py:1-3", "base.py:2-3", "base.py:5-6", "util.py:1-2"]
    names = ["Node.get_flag", "Node.set_value", "helper", "Node", "v"]
    located = {c: (c.split(":")[0], int(c.split(":")[1].split("-")[0]), int(c.split("-")[1])) for c in citations}
    labels = label_spans(program, names, located)
    labels["helper"] = []  # as if util.py were not packed

    def write(with_labels: bool, seed: int) -> str:
        rng = random.Random(seed)
        slots = {CITATION_OPENER: TokenTrie.of_strings(tok, [f"{c}]" for c in citations]),
                 CODE_OPENER: TokenTrie.of_strings(tok, [f"{n}`" for n in names])}
        processor = GroundingProcessor(tok, 1, slots, labels=labels if with_labels else None)
        ids, written, plan = [0], "", ""
        for _ in range(260):
            if not plan:
                plan = f"`{rng.choice(names)}` [{rng.choice(citations)}] and "
            scores = torch.randn(1, len(tok), generator=torch.Generator().manual_seed(rng.randint(0, 2**31)))
            for i, text in enumerate(texts):
                if text and plan.startswith(text):
                    scores[0, i] += 10.0 + len(text)
            out = processor(torch.tensor([ids]), scores.clone())[0]
            token = int(torch.multinomial(torch.softmax(out, -1), 1)) if sample else int(out.argmax())
            ids.append(token)
            written += texts[token]
            plan = plan[len(texts[token]):] if plan.startswith(texts[token]) else ""
        return written

    assert mislabels(write(False, 5), program)  # the stand-in mislabels when nothing stops it
    text = write(True, 5)
    assert "`helper` [" in write(False, 5) and mislabels(text, program) == [], text
    assert "`helper` [" not in text and text.count("`Node.set_value` [") > 0
