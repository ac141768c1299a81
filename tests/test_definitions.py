"""stages/common/program/definitions.py: what a definition's AST says (the facts and claims nodes read these)."""
from __future__ import annotations

from stages.common.program.definitions import Param, read_definitions

CODE = '''\
import re

VERSION_PATTERN = r"v?(\\d+)"
_RE = re.compile(VERSION_PATTERN)


def parse(text, strict=False, *rest, limit: int = 3, **extra):
    if not text:
        raise ValueError("empty")
    match = _RE.match(text)
    if match is None:
        return None
    return int(match.group(1))


def check(items):
    for item in items:
        if item < 0:
            return
    log(items)


class Signer(Base, metaclass=Meta):
    digest = "sha1"

    def __init__(self, key, sep="."):
        self.key = key

    @property
    def size(self):
        return len(self.key)

    @staticmethod
    def make(x):
        def inner():
            raise KeyError(x)
        return inner

    def walk(self):
        yield from self.key
'''


def test_functions_parameters_returns_raises_calls_reads():
    found = read_definitions(CODE, "v.py")
    parse = found["parse"]
    assert parse.kind == "function" and (parse.start, parse.end) == (7, 13)
    assert parse.params == (Param("text"), Param("strict", "False"), Param("rest", None, "varargs"),
                            Param("limit", "3", "keyword"), Param("extra", None, "varkw"))
    assert parse.returns == ("None", "int(match.group(1))") and not parse.returns_none
    assert parse.raises == ("ValueError",)
    assert set(parse.calls) == {"ValueError", "_RE.match", "int", "match.group"}
    assert parse.reads == ("_RE",)
    assert found["check"].returns_none and found["check"].calls == ("log",)


def test_classes_methods_properties_constants():
    found = read_definitions(CODE, "v.py")
    assert found["VERSION_PATTERN"].kind == "constant" and found["VERSION_PATTERN"].value == "'v?(\\\\d+)'"
    assert found["_RE"].value == "re.compile(VERSION_PATTERN)"
    signer = found["Signer"]
    assert signer.kind == "class" and signer.bases == ("Base",)
    assert found["Signer.digest"].kind == "attribute"
    init = found["Signer.__init__"]
    assert init.kind == "method" and [p.name for p in init.params] == ["key", "sep"] and init.returns_none
    assert found["Signer.size"].kind == "property" and found["Signer.size"].decorators == ("property",)
    make = found["Signer.make"]
    assert make.kind == "staticmethod" and [p.name for p in make.params] == ["x"]
    assert make.raises == () and make.returns == ("inner",)  # the nested function's raise is not make's
    assert "Signer.make.inner" not in found
    walk = found["Signer.walk"]
    assert walk.yields and not walk.returns_none


def test_unparsable_text_has_no_definitions():
    assert read_definitions("def broken(:\n", "b.py") == {}
