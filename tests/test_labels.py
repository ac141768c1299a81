"""Citations labelled with a definition's name whose span does not define it (stages/common/labels.py)."""
from __future__ import annotations

import pytest

from stages.common.labels import mark_mislabels, mislabels

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
