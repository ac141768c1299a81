"""Code the answer "quotes" that the packed evidence does not hold (stages/common/grounding/quotes.py), and what repair does
with it."""
from __future__ import annotations

import pytest

from stages.common.grounding.quotes import check_code, code_blocks, code_like, handle_unverified
from stages.common.types import Evidence, PackedWindow

SHOWN = Evidence([PackedWindow("pkg/io.py", 10, 14, "def read_all(path, mode='r'):\n    with open(path, mode) as handle:\n"
                                                     "        data = handle.read()\n    return data\n")], 40)


@pytest.mark.parametrize("line", ["def read_all(path, mode='r'):", "    async def fetch(url):", "class Reader(Base):",
                                  "import os.path", "from pkg import io", "@property", '"""Read a file."""',
                                  "return data", "raise ValueError(x)", "for item in items:", "data = handle.read()",
                                  "self.cache[key] += 1", "print(data)"])
def test_code_like_lines(line):
    assert code_like(line)


@pytest.mark.parametrize("line", ["The function reads the file.", "`read_all` [pkg/io.py:10-14]", "Return the data.",
                                  "x == y", "1. `read_all` opens the file", "", '"""', "For example:",
                                  "read_all() returns the text of the file"])
def test_prose_and_short_lines_are_not_code(line):
    assert not code_like(line)


def test_a_line_is_verified_when_one_packed_line_holds_it():
    text = ("`read_all` [pkg/io.py:10-14]\nIt opens the file:\n    with open(path, mode) as handle: [pkg/io.py:10-14]\n"
            "def read_all(path, encoding=None):\n    return data\n")
    check = check_code(text, SHOWN)
    assert check.lines == [2, 3, 4]
    assert check.unverified == [3] and check.texts == ["def read_all(path, encoding=None):"]  # not the shown signature
    assert check_code("data = handle.read() pkg/io.py:12 [not in program]", SHOWN).unverified == []  # its suffixes


def test_drop_leaves_out_each_invented_block_and_keeps_its_citations():
    text = ("`read_all` [pkg/io.py:10-14]\n"
            "def read_all(path, encoding=None):\n    \"\"\"Read it all.\"\"\"\n    return data [pkg/io.py:10-14]\n"
            "\nIt returns the data.\n"
            "data = handle.read()\n")  # shown: stays
    out = handle_unverified(text, SHOWN, "drop")
    assert out == ("`read_all` [pkg/io.py:10-14]\n[code not in the evidence: 3 lines left out] [pkg/io.py:10-14]\n"
                   "\nIt returns the data.\ndata = handle.read()\n")
    marked = handle_unverified(text, SHOWN, "mark")
    assert "def read_all(path, encoding=None): [not in evidence]" in marked and "return data [pkg/io.py:10-14]\n" in marked
    assert handle_unverified(text, SHOWN, "keep") == text
    assert handle_unverified("It reads the file.\ndata = handle.read()", SHOWN, "drop") == "It reads the file.\ndata = handle.read()"


def test_code_blocks_take_continuation_lines():
    text = "Here:\nclass Proxy(Base):\n    def __init__(\n        self,\n    ) -> None:\nDone."
    assert code_blocks(text) == [(1, 4)]
    assert code_blocks("Just prose.\nMore prose,") == []


def test_drop_leaves_out_a_quoted_block_whose_continuation_lines_are_invented():
    """Every code-like line shown, but the indented lines under them are not: the block reads as one quote, so it goes."""
    text = ("`read_all` [pkg/io.py:10-14]\n"
            "def read_all(path, mode='r'):\n    handle.read_everything{\n        mode: handle{\n"
            "The end.\n"
            "def read_all(path, mode='r'):\n    with open(path, mode) as handle:\n")
    assert check_code(text, SHOWN).unverified == []  # what the metric counts: code-like lines only
    out = handle_unverified(text, SHOWN, "drop").splitlines()
    assert out == ["`read_all` [pkg/io.py:10-14]", "[code not in the evidence: 3 lines left out]", "The end.",
                   "def read_all(path, mode='r'):", "    with open(path, mode) as handle:"]
    assert handle_unverified(text.replace("{", ""), SHOWN, "keep") == text.replace("{", "")


def test_the_marker_of_a_dropped_block_carries_each_citation_once():
    text = ("def made_up(x): [pkg/io.py:10-14]\n    return x [pkg/io.py:10-14] [pkg/io.py:10-11]\n"
            "    y = 2 [pkg/io.py:10-14]\n")
    assert handle_unverified(text, SHOWN, "drop") == \
        "[code not in the evidence: 3 lines left out] [pkg/io.py:10-14] [pkg/io.py:10-11]\n"
