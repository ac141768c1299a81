"""Definition-aligned evidence and followed calls (issue 35 items 1 and 3): a long function is packed as the part
that matches the question under its class and signature, one definition's windows go together, and the best
definitions' in-program callees (callers for "where is it used") follow them within `pack.follow_calls` tokens."""
from __future__ import annotations

import pytest

from stages.common.program.indexing import build_index
from stages.common.retrieval.aligned import merge
from stages.common.tokens import encode_text
from stages.common.types import PackedWindow, Selection
from stages.pack import PackWindows, cut

WINDOW_LINES = 12  # a short window, so that unsign (30 lines) is longer than one
CLASS_CONTEXT = "[in] class TimestampSigner(Signer):  # Adds a timestamp to the signed value."

TIMED = '''"""Signing with timestamps."""
import time


class BadSignature(Exception):
    """The signature does not match."""


class SignatureExpired(BadSignature):
    """The signature is older than max_age."""


def b64decode(value):
    return value


class Signer:
    """Signs values with a secret key."""

    def __init__(self, secret_key, sep="."):
        self.secret_key = secret_key
        self.sep = sep

    def get_signature(self, value):
        return str(hash((self.secret_key, value)))

    def unsign(self, signed_value):
        value, _, sig = signed_value.rpartition(self.sep)
        if sig != self.get_signature(value):
            raise BadSignature("Signature does not match")
        return value


class TimestampSigner(Signer):
    """Adds a timestamp to the signed value."""

    def get_timestamp(self):
        return int(time.time())

    def unsign(self, signed_value, max_age=None, return_timestamp=False):
        """Works like the regular unsign but can also validate the time."""
        result = super().unsign(signed_value)
        if self.sep not in result:
            raise BadSignature("timestamp missing")
        value, ts_bytes = result.rsplit(self.sep, 1)
        ts_int = None
        try:
            ts_int = int(b64decode(ts_bytes))
        except ValueError:
            pass
        if ts_int is None:
            raise BadSignature("Malformed timestamp")
        if not value:
            raise BadSignature("empty value")
        if len(value) > 4096:
            raise BadSignature("value too long")
        if max_age is not None:
            age = self.get_timestamp() - ts_int
            if age > max_age:
                raise SignatureExpired(f"Signature age {age} > {max_age} seconds")
            if age < 0:
                raise SignatureExpired(f"Signature age {age} < 0 seconds")
        if return_timestamp:
            return value, ts_int
        return value

    def validate(self, signed_value, max_age=None):
        """Only validates the given signed value."""
        try:
            self.unsign(signed_value, max_age=max_age)
            return True
        except BadSignature:
            return False
'''
OTHER = '''def serializer(value):
    """Dumps a value to text."""
    return repr(value)
'''


def line_of(text: str) -> int:
    return next(i for i, line in enumerate(TIMED.splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    root = tmp_path_factory.mktemp("timed")
    (root / "timed.py").write_text(TIMED)
    (root / "other.py").write_text(OTHER)
    for i in range(6):
        (root / f"util{i}.py").write_text(f"def helper_{i}(x):\n    return x + {i}\n")
    return build_index(str(root), [], 1_000_000, WINDOW_LINES, None)


def window(program, qualname: str):
    return next(w for w in program.windows if w.anchor == qualname)


def pack(program, lm, question: str, ranking: dict, **settings) -> list[PackedWindow]:
    selection = Selection(list(ranking), [], {}, [], len(ranking), window_ranking=ranking)
    stage = PackWindows(context_tokens=100_000, windows_per_file=settings.pop("windows_per_file", 1), **settings)
    return stage.run(program, selection, question, lm)["evidence"].windows


def cost(lm, w: PackedWindow) -> int:
    return len(encode_text(lm.tokenizer, w.block() + "\n\n"))


def test_a_long_method_is_packed_as_its_matching_part_under_its_class_and_signature(program, tiny_lm):
    unsign = window(program, "TimestampSigner.unsign")
    assert unsign.end - unsign.start + 1 == WINDOW_LINES and unsign.end < line_of("age > max_age")  # cut short
    question = "How does TimestampSigner check whether a signature has expired, its age against max_age?"
    ranking = {"timed.py": [(5.0, unsign)]}
    shown = pack(program, tiny_lm, question, ranking, follow_calls=0)[0]
    assert shown.start > unsign.start and shown.start <= line_of("age = self.get_timestamp()")
    assert shown.end >= line_of("raise SignatureExpired(f\"Signature age {age} > {max_age}")
    assert shown.end - shown.start + 1 <= WINDOW_LINES
    assert shown.text == "\n".join(TIMED.splitlines()[shown.start - 1:shown.end])  # the exact lines
    assert shown.context == ("[in] class TimestampSigner(Signer): / def unsign(self, signed_value, max_age=None, "
                             "return_timestamp=False):  # Works like the regular unsign but can also validate the time.")
    assert shown.block().splitlines()[:2] == [shown.header, shown.context]
    # align=lines: the window as the index cut it, no context line
    plain = pack(program, tiny_lm, question, ranking, follow_calls=0, align="lines")[0]
    assert (plain.start, plain.end, plain.context) == (unsign.start, unsign.end, "")
    # a question that matches its head best keeps the window whole (its header in its own lines)
    head = pack(program, tiny_lm, "unsign signed_value return_timestamp super result", ranking, follow_calls=0)[0]
    assert (head.start, head.end, head.context) == (unsign.start, unsign.end, CLASS_CONTEXT)


def test_a_window_inside_a_long_method_offers_that_method_as_the_lead(program, tiny_lm):
    from stages.common.types import Evidence
    from stages.scaffold import lead_choices

    unsign = window(program, "TimestampSigner.unsign")
    question = "How does TimestampSigner check whether a signature has expired, its age against max_age?"
    shown = pack(program, tiny_lm, question, {"timed.py": [(5.0, unsign)]}, follow_calls=0)[0]
    assert shown.start > unsign.start  # the matching part, not the method's head
    choices = lead_choices(Evidence([shown], 1000), program, question)
    assert f"`TimestampSigner.unsign` [timed.py:{shown.start}-{shown.end}]" in choices


def test_a_method_window_carries_its_class(program, tiny_lm):
    validate = window(program, "TimestampSigner.validate")
    shown = pack(program, tiny_lm, "validate a signed value", {"timed.py": [(3.0, validate)]}, follow_calls=0)[0]
    assert shown.start == validate.start and shown.context == CLASS_CONTEXT


def test_windows_of_one_definition_are_merged_or_kept_together(program, tiny_lm):
    klass, unsign = window(program, "TimestampSigner"), window(program, "TimestampSigner.unsign")
    validate = window(program, "TimestampSigner.validate")
    assert klass.start < unsign.start <= klass.end  # overlapping windows of one class: one window
    one = merge(program, [cut(program, klass, 2.0), cut(program, window(program, "serializer"), 1.5),
                          cut(program, unsign, 1.0)], 2 * WINDOW_LINES)
    assert [(w.path, w.start, w.end) for w in one] == [("timed.py", klass.start, unsign.end),
                                                       ("other.py", 1, 3)]
    assert one[0].score == 2.0 and one[0].text.startswith("class TimestampSigner(Signer):")
    # far apart (validate is many lines below the class window): not merged, but right after it, not spread
    ranking = {"timed.py": [(9.0, klass), (1.0, validate)], "other.py": [(8.0, window(program, "serializer"))]}
    aligned = pack(program, tiny_lm, "signer", ranking, windows_per_file=2, follow_calls=0)
    assert [(w.path, w.start) for w in aligned] == [("timed.py", klass.start), ("timed.py", validate.start),
                                                    ("other.py", 1)]
    spread = pack(program, tiny_lm, "signer", ranking, windows_per_file=2, follow_calls=0, align="lines")
    assert [(w.path, w.start) for w in spread] == [("timed.py", klass.start), ("other.py", 1),
                                                   ("timed.py", validate.start)]


def covers(windows: list[PackedWindow], line: int) -> bool:
    return any(w.path == "timed.py" and w.start <= line <= w.end for w in windows)


def test_a_callee_chain_is_followed_within_the_budget(program, tiny_lm):
    validate = window(program, "TimestampSigner.validate")
    question = "How does validate decide that a signed value has expired by its age?"
    ranking = {"timed.py": [(5.0, validate)], "other.py": [(4.0, window(program, "serializer"))]}
    alone = pack(program, tiny_lm, question, ranking, follow_calls=0)
    followed = pack(program, tiny_lm, question, ranking, follow_calls=100_000)
    # validate -> TimestampSigner.unsign (its expiry part) -> get_timestamp, after the ranked windows' first five
    assert len(alone) == 2 and followed[:2] == alone
    timed = followed[2:]
    assert timed and all(w.path == "timed.py" for w in timed)
    assert covers(timed, line_of("if age > max_age:")) and covers(timed, line_of("return int(time.time())"))
    assert all(w.score == 0.0 for w in timed)
    expiry = next(w for w in timed if w.start <= line_of("if age > max_age:") <= w.end)
    assert expiry.context.startswith("[in] class TimestampSigner(Signer): / def unsign(self, signed_value")
    # follow_calls=0 is today's evidence: the followed windows taken out, the rest is the same, in the same order
    assert [w for w in followed if w not in timed] == alone
    many = {f"util{i}.py": [(4.0 - i / 10, window(program, f"helper_{i}"))] for i in range(6)}
    ranked = [w for w in pack(program, tiny_lm, question, {"timed.py": [(5.0, validate)], **many}, follow_calls=10**5)]
    assert ranked[5].score == 0.0 and all(w.score > 0 for w in ranked[:5])  # the first five keep their ranks
    # the budget: the followed blocks' tokens never exceed it; too small for any block, nothing follows
    first = cost(tiny_lm, timed[0])
    tight = pack(program, tiny_lm, question, ranking, follow_calls=first)
    extra = [w for w in tight if w not in alone]
    assert extra and sum(cost(tiny_lm, w) for w in extra) <= first
    assert pack(program, tiny_lm, question, ranking, follow_calls=min(cost(tiny_lm, w) for w in timed) - 1) == alone


def test_a_usage_question_follows_the_callers(program, tiny_lm):
    unsign = window(program, "TimestampSigner.unsign")
    ranking = {"timed.py": [(5.0, unsign)]}
    used = pack(program, tiny_lm, "Where is TimestampSigner.unsign used?", ranking, follow_calls=100_000)
    assert covers(used[1:], line_of("def validate(self"))
    how = pack(program, tiny_lm, "How does TimestampSigner.unsign work?", ranking, follow_calls=100_000)
    assert not covers(how[1:], line_of("def validate(self"))  # validate calls unsign; unsign does not call it


def test_follow_calls_zero_and_lines_is_the_index_windows(program, tiny_lm):
    ranking = {"timed.py": [(5.0, window(program, "TimestampSigner.unsign")), (2.0, window(program, "Signer"))]}
    packed = pack(program, tiny_lm, "signature expired", ranking, windows_per_file=2, follow_calls=0, align="lines")
    assert [(w.start, w.end, w.context) for w in packed] == [(w.start, w.end, "") for _, w in ranking["timed.py"]]
