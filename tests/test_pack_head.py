"""pack.head_windows_per_file: a long file's third and fourth windows are packed, but never among the first five."""
from __future__ import annotations

from stages.common.types import PackedWindow, Selection
from stages.pack import PackWindows, cap_head


def windows(*paths: str) -> list[PackedWindow]:
    return [PackedWindow(path, i * 10 + 1, i * 10 + 5, "x", 1.0) for i, path in enumerate(paths)]


def test_cap_head_moves_a_files_extra_windows_behind_the_head_in_their_order():
    order = windows("a", "a", "a", "a", "b", "c", "a", "d")
    capped = cap_head(order, per_file=2, head=5)
    assert [w.path for w in capped] == ["a", "a", "b", "c", "d", "a", "a", "a"]
    assert [w.start for w in capped if w.path == "a"] == [1, 11, 21, 31, 61]  # a's windows keep their order
    assert cap_head(order, per_file=4, head=5) == order
    assert cap_head(order, per_file=1, head=2) == [order[0], order[4], *order[1:4], *order[5:]]
    assert cap_head([], 2, 5) == []


def test_pack_windows_keeps_the_top_five_across_files(tmp_path, make_index, tiny_lm):
    body = "".join(f"def step_{i}(x):\n    return x + {i}\n\n\n" for i in range(5))
    program = make_index(tmp_path, {"long.py": body, "other.py": "def lone(y):\n    return y\n"})
    defs = {w.anchor.rsplit(".", 1)[-1]: w for w in program.windows if w.kind == "function"}
    ranking = {"long.py": [(9.0, defs["step_0"]), (8.0, defs["step_3"]), (7.8, defs["step_2"]), (7.6, defs["step_4"])],
               "other.py": [(7.0, defs["lone"])]}
    selection = Selection(["long.py", "other.py"], [], {}, [], 2, window_ranking=ranking)

    def names(**settings) -> list[str]:
        evidence = PackWindows(context_tokens=100_000, follow_calls=0, **settings).run(
            program, selection, "step", tiny_lm)["evidence"]
        return [w.text.split("(")[0].removeprefix("def ") for w in evidence.windows]

    assert names() == ["step_0", "step_3", "lone", "step_2", "step_4"]  # defaults: 4 a file, 2 of them in the top
    assert names(head_windows_per_file=4) == ["step_0", "step_3", "step_2", "step_4", "lone"]
    assert names(windows_per_file=2) == ["step_0", "step_3", "lone"]
