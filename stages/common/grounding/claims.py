"""What an answer's prose says about the definitions it names: the sentences, who each one is about, and the
checkable statements in it (parameters, returns, raises, calls, kind, decorators).

Read conservatively: a statement is kept only when its subject is clear (a backticked name or a `name [path:A-B]`
right before the verb, the sentence's first named definition, or "it" / "this function" for the last one named)
and its verb is asserted (no negation, condition or hedge in its clause). What is not kept is not checked and not
counted. The checks themselves are in stages/common/grounding/claimcheck.py.
"""
from __future__ import annotations

import builtins
import dataclasses
import re

from stages.common.grounding.citations import parse_citations
from stages.common.program.definitions import DefinitionFacts, definitions
from stages.common.types import Evidence, ProgramIndex

MAX_SENTENCE = 1000  # characters; a longer "sentence" is no prose (a run of names, a degenerate reply): not read
ABBREVIATIONS = ("e.g", "i.e", "vs", "cf", "etc")  # a period after these ends no sentence
NUMBERS = {"no": 0, "zero": 0, "one": 1, "a single": 1, "only one": 1, "exactly one": 1, "single": 1, "two": 2,
           "three": 3, "four": 4, "five": 5, "six": 6}
BUILTIN_NAMES = frozenset(dir(builtins))
NAME = r"[A-Za-z_][\w.]*"
CITE = r"\[[^\[\]\n]*?:[0-9]+(?:-[0-9]+)?\]"
# a definition's name as written: `name`, `self.name`, `name()`, `@name`, or a bare name before a citation
MENTION = re.compile(rf"`@?(?:self\.|cls\.)?({NAME})(?:\(\))?`|(?<![\w`.])({NAME})(?=\s*{CITE})")
NEGATION = re.compile(r"\b(?:not|never|no longer|without|neither|nor|cannot|instead of|rather than)\b|n't\b")
CONDITION = re.compile(r"^\s*(?:and\s+|but\s+|or\s+)?(?:if|when|whenever|whether|unless|once|after|before|until|as long as)\b", re.IGNORECASE)
HEDGE = re.compile(r"\b(?:may|might|can|could|should|would|must|probably|likely|seems?|appears?)\s+(?:\w+\s+)?$")
RELATIVE = re.compile(rf"^`?\s*(?:{CITE}\s*)*,?\s*(?:which|that|who)\s+(?:also\s+|then\s+|only\s+)?$")
# words that may stand between a name and its verb: "`foo` [a.py:1-3] then returns"
FILLER = re.compile(rf"^`?(?:\(\))?\s*(?:{CITE}\s*)*(?:(?:function|method|class|property|decorator|constant|helper)\s+)?"
                    r"(?:(?:also|then|only|always|simply|just|directly|first|itself|finally|now)\s+)*$")
PRONOUN = re.compile(r"\b(?:it|(?:this|the) (?:function|method|class|property|helper))\s+(?:\w+\s+){0,2}$", re.IGNORECASE)
COORDINATED = re.compile(r"^[^.;:]{0,80}?(?:,\s*|\s)(?:and|then|but|and then)\s+(?:also\s+|then\s+|finally\s+)?$")
OBJECT = re.compile(r"\b(?:of|in|from|on|by|to|with|for|at|into|than|as|via|like|through)\s+(?:the\s+|an?\s+)?$",
                    re.IGNORECASE)  # "the method of `Foo` returns": `Foo` is no subject
SENTENCE_START = re.compile(r"^\s*(?:[-*+]\s+|\d+[.)]\s+)?(?:(?:the|The)\s+)?$")


@dataclasses.dataclass(frozen=True)
class Statement:
    """One checkable statement: ``kind`` about the definitions ``candidates`` (all of them the name may be)."""

    sentence: tuple[int, int]  # character span of its sentence in the text
    name: str  # the subject as written
    candidates: tuple[DefinitionFacts, ...]
    kind: str  # param_count | param_name | returns_none | returns_value | raises | calls | kind | decorated
    value: str  # what is claimed: a count, a name, a kind, "" for "an exception" / "a decorator"
    said: str  # the words that make it


# ------------------------------------------------------------------------------------------------ sentences


def _masked(text: str) -> str:
    """``text`` with code spans, brackets and fenced blocks blanked out (same length): their periods end nothing."""
    out = list(text)
    for pattern in (r"```.*?(?:```|$)", r"`[^`\n]*`", r"\[[^\[\]\n]*\]"):
        for match in re.finditer(pattern, "".join(out), re.DOTALL):
            out[match.start():match.end()] = "x" * (match.end() - match.start())
    return "".join(out)


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence outside fenced code: ended by . ! ? before a space or a line end, or by a line
    break; the citations right after its period belong to it."""
    masked, spans = _masked(text), []
    fenced = [(m.start(), m.end()) for m in re.finditer(r"```.*?(?:```|$)", text, re.DOTALL)]
    start = 0
    for match in re.finditer(r"[.!?](?=\s|$)|\n", masked):
        end = match.end()
        word = re.search(r"([\w.]+)\.$", masked[start:end])
        if match.group() == "." and word and word.group(1).lower() in ABBREVIATIONS:
            continue
        trailing = re.match(rf"(?:[ \t]*{CITE})+", text[end:])
        end += trailing.end() if trailing else 0
        if text[start:end].strip() and not any(a <= start < b for a, b in fenced):
            spans.append(_trimmed(text, start, end))
        start = end
    if text[start:].strip() and not any(a <= start < b for a, b in fenced):
        spans.append(_trimmed(text, start, len(text)))
    return spans


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    piece = text[start:end]
    return start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())


# ------------------------------------------------------------------------------------------------ names


# a program of more files reads its definitions as names are asked for (module values the index does not list as
# symbols, such as `log = logging.getLogger(...)`, are then not found); up to it, every file once, up front
EAGER_FILES = 2000


class Catalog:
    """The program's definitions by qualname and by last part (``get``, ``in``): every file read up front, or for a
    program of more than EAGER_FILES files, only the files whose index symbols carry a name asked for (a 10,000-file
    tree's every file took minutes)."""

    def __init__(self, index: ProgramIndex) -> None:
        self.index = index
        self.found: dict[str, list[DefinitionFacts]] = {}
        self.paths: dict[str, list[str]] = {}  # name -> the files to read for it (lazy reading only)
        if len(index.files) > EAGER_FILES:
            self.paths = _symbol_paths(index)
            return
        for path in sorted(index.files):
            for qualname, facts in definitions(index, path).items():
                for key in {qualname, facts.name}:
                    self.found.setdefault(key, []).append(facts)

    def get(self, name: str, default: list[DefinitionFacts] | None = None) -> list[DefinitionFacts]:
        if name not in self.found:
            self.found[name] = [facts for path in self.paths.get(name, ())
                                for qualname, facts in definitions(self.index, path).items()
                                if name in (qualname, facts.name)]
        return self.found[name] or ([] if default is None else default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get(name))


def _symbol_paths(index: ProgramIndex) -> dict[str, list[str]]:
    """Each qualname and last part of the index's symbols -> the files defining it, sorted."""
    out: dict[str, set[str]] = {}
    for symbol in index.symbols:
        for key in (symbol.qualname, symbol.name, symbol.qualname.rpartition(".")[2]):
            out.setdefault(key, set()).add(symbol.path)
    return {key: sorted(paths) for key, paths in out.items()}


def catalog(index: ProgramIndex) -> Catalog:
    """Every definition of the program by qualname and by its last part, once per index."""
    return index.derived("claims.catalog", lambda: Catalog(index))


def _inside(facts: DefinitionFacts, spans: list[tuple[str, int, int]]) -> bool:
    return any(facts.path == path and a <= facts.start <= b for path, a, b in spans)


class Resolver:
    """Names to the definitions they may be: those starting inside the sentence's citations, else inside the packed
    windows, else a program-wide name that is unique and no class attribute."""

    def __init__(self, index: ProgramIndex, evidence: Evidence | None) -> None:
        self.index, self.names = index, catalog(index)
        self.windows = [(w.path, w.start, w.end) for w in evidence.windows] if evidence else []

    def resolve(self, name: str, cited: list[tuple[str, int, int]]) -> tuple[DefinitionFacts, ...]:
        found = self.names.get(name) or self.names.get(name.rpartition(".")[2] if "." in name else "", [])
        if "." in name and name not in self.names:  # `module.func` or `obj.method`: only qualnames ending so
            found = [f for f in found if name.endswith(f.qualname) or f.qualname.endswith(name.partition(".")[2])]
        for spans in (cited, self.windows):
            inside = [f for f in found if _inside(f, spans)]
            if inside:
                return tuple(inside)
        unique = [f for f in found if f.kind not in ("attribute",)]
        return tuple(unique) if len(unique) == 1 else ()


@dataclasses.dataclass(frozen=True)
class Mention:
    start: int
    end: int
    name: str
    candidates: tuple[DefinitionFacts, ...]


def mentions(text: str, start: int, end: int, resolver: Resolver) -> list[Mention]:
    """The definitions named in ``text[start:end]``, in order (names that are no definition left out)."""
    sentence = text[start:end]
    cited = [(p, a, b) for _, _, p, a, b in parse_citations(sentence, resolver.index)]
    out = []
    for match in MENTION.finditer(sentence):
        name = match.group(1) or match.group(2)
        candidates = resolver.resolve(name.rstrip("."), cited)
        if candidates:
            out.append(Mention(start + match.start(), start + match.end(), name.rstrip("."), candidates))
    return out


# ------------------------------------------------------------------------------------------------ statements

_VERB_PARAMS = r"(?:takes|accepts|receives|expects|has)"
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("param_count", re.compile(rf"\b{_VERB_PARAMS}\s+(no|zero|one|a single|only one|exactly one|two|three|four|five|six|"
                               r"\d+)\s+(?:required\s+|positional\s+|input\s+)?(?:arguments?|parameters?|args?|params?)\b")),
    ("param_name", re.compile(rf"\b{_VERB_PARAMS}\s+(?:an?\s+|the\s+|one\s+)?(?:optional\s+|keyword\s+|positional\s+)?"
                              r"(?:arguments?|parameters?|args?|params?)\s+(?:named\s+|called\s+)?((?:`\w+`(?:\s*,\s*(?:and\s+|or\s+)?|\s+and\s+"
                              r"|\s+or\s+)?)+)")),
    ("param_name", re.compile(rf"\b{_VERB_PARAMS}\s+(?:an?\s+|the\s+|its\s+|one\s+)?(?:optional\s+)?(`\w+`)\s+"
                              r"(?:keyword\s+)?(?:arguments?|parameters?|params?|args?)\b")),
    ("param_name", re.compile(r"\b(?:takes|accepts|receives|expects)\s+((?:`[a-z_]\w*`(?:\s*,\s*(?:and\s+)?|\s+and\s+)?)+)"
                              r"(?!\s*(?:objects?|instances?|values?|type|class)\b)")),
    ("returns", re.compile(r"\breturns\s+(`None`|None|nothing|no\s+\w+|`?True`?|`?False`?|an?\s+\w+|the\s+\w+|its\s+\w+"
                           r"|`[^`]+`|\"[^\"\n]*\"|'[^'\n]*'|(?:[0-9]+|self|either|whether|only)\b)")),
    ("raises", re.compile(r"\b(?:raises|throws|will raise|will throw)\s+(?:an?\s+|the\s+)?(`@?[\w.]+(?:\(\))?`|[A-Z][a-z]\w*"
                          r"|exceptions?|errors?)")),
    ("calls", re.compile(r"\b(?:calls|invokes|delegates to|calls into)\s+(?:the\s+)?((?:`[\w.]+(?:\(\))?`(?:\s*,\s*"
                         r"(?:and\s+)?|\s+and\s+|\s+then\s+)?)+)")),
    ("kind", re.compile(r"\bis\s+(?:an?|the)\s+((?:[\w-]+\s+){0,2}?)(class|function|method|property|constant)\b(?!-)(\s+\w+)?")),
    ("decorated", re.compile(r"\b(?:is\s+)?decorated\s+(?:with|by)\s+(?:the\s+|an?\s+)?(`@?[\w.]+(?:\([^`]*\))?`|@[\w.]+|"
                             r"decorators?)")),
    ("decorated", re.compile(r"\b(?:uses|has|applies)\s+(?:an?|the)\s+(`@?[\w.]+(?:\([^`]*\))?`\s+)?decorators?\b")),
]
# "the `X` class variable": "class" there says where X lives, not what X is
APPOSITION = re.compile(r"\b(?:[Tt]he|[Aa]n?|[Tt]his|[Ii]ts)\s+`@?(?:self\.)?([\w.]+)(?:\(\))?`\s+"
                        r"(class|function|method|property|constant)\b(?!\s+(?:variable|attribute|member|level|method|"
                        r"field|constant|instance|object)s?\b)")
NOT_A_VALUE = ("early", "immediately", "when", "if", "to", "from", "back", "only", "without", "after", "once", "whether",
               "control", "either", "whatever", "unless")


def _clause(text: str, start: int, at: int) -> str:
    """The words of the clause before ``at`` (from the last , ; : or the sentence's start)."""
    before = text[start:at]
    cut = max(before.rfind(c) for c in ",;:(")
    return before[cut + 1:] if cut >= 0 else before


def _names_in(group: str) -> list[str]:
    return [re.sub(r"^@|\(.*\)$|^self\.|^cls\.", "", n) for n in re.findall(r"`([^`]+)`", group)] or [group.strip("@ ")]


def _statements(kind: str, match: re.Match[str]) -> list[tuple[str, str]]:
    """(kind, value) pairs one match of ``PATTERNS`` claims; [] when it claims nothing checkable."""
    if kind == "param_count":
        word = match.group(1).lower()
        return [(kind, str(NUMBERS.get(word, word)))]
    if kind == "param_name":
        names = _names_in(match.group(1))
        return [(kind, n) for n in names if n.isidentifier() and n not in BUILTIN_NAMES and not n[0].isupper()]
    if kind == "returns":
        word = match.group(1).strip("`")
        if word in ("None", "nothing") or word.startswith("no ") and word[3:] in ("value", "result", "values"):
            return [("returns_none", "None")]
        if word.startswith("no ") or word in ("either", "whether", "only"):
            return []
        first = word.split()[0].lower()
        if first in NOT_A_VALUE or first in ("it", "this", "that", "and", "or", "as", "in", "on", "with", "by"):
            return []
        return [("returns_value", word)]
    if kind == "raises":
        word = match.group(1).strip("`")
        generic = word.lower().rstrip("s") in ("exception", "error")
        return [(kind, "" if generic else re.sub(r"\(\)$", "", word))]
    if kind == "calls":
        return [(kind, n) for n in _names_in(match.group(1))]
    if kind == "kind":
        words, noun, after = match.group(1).split(), match.group(2), (match.group(3) or "").strip().lower()
        if noun == "class" and after == "method" or words and words[-1].lower() in ("static", "class"):
            return [(kind, "method")] if noun in ("method", "class") else []
        if after and after not in ("that", "which", "in", "of", "for", "defined", "used", "called", "with", "to"):
            return []
        if any(w.lower() in ("base", "sub", "parent", "child", "nested", "inner", "generic") for w in words):
            return []
        return [(kind, noun)]
    if kind == "decorated":
        group = (match.group(1) or "").strip()
        specific = group and not group.startswith("decorator")
        return [(kind, _names_in(group)[0] if specific else "")]
    return []


def statements(text: str, index: ProgramIndex, evidence: Evidence | None) -> list[Statement]:
    """Every checkable statement of ``text`` whose subject is clear; the first definition named is the topic that
    "it" means until a sentence names another one first."""
    resolver, out = Resolver(index, evidence), []
    topic: Mention | None = None
    for start, end in sentences(text):
        sentence = text[start:end]
        if end - start > MAX_SENTENCE:
            continue
        named = mentions(text, start, end, resolver)
        found: list[tuple[int, int, str, str, Mention | None]] = []
        for kind, pattern in PATTERNS:
            for match in pattern.finditer(sentence):
                found += [(start + match.start(), start + match.end(), k, v, None)
                          for k, v in _statements(kind, match)]
        for match in APPOSITION.finditer(sentence):
            tick = start + sentence.index("`", match.start())
            mention = next((m for m in named if m.start == tick), None)
            if mention is not None:
                found.append((tick, start + match.end(), "kind", match.group(2), mention))
        previous: tuple[int, Mention] | None = None  # where the last statement ended, and its subject
        for at, stop, kind, value, subject in sorted(found, key=lambda f: f[0]):
            if sentence.rstrip().endswith("?"):
                break
            if subject is None:
                subject = _subject(text, start, at, named, topic, previous)
            if subject is None or (kind == "kind" and text[at:at + 1] != "`" and not FILLER.match(
                    text[subject.end:at])):
                continue  # "`X` is a class" needs X right before "is"
            clause = _clause(text, start, at)
            said = text[at:stop]
            if NEGATION.search(clause + said) or CONDITION.match(clause) or HEDGE.search(clause):
                continue
            previous = (stop, subject)
            if kind in ("param_name", "calls") and value == subject.name.rpartition(".")[2]:
                continue
            out.append(Statement((start, end), subject.name, subject.candidates, kind, value, said))
        first = next((m for m in named if SENTENCE_START.match(text[start:m.start])), None)
        topic = first or (named[0] if named else topic)
    return out


def _subject(text: str, start: int, at: int, named: list[Mention], topic: Mention | None,
             previous: tuple[int, Mention] | None) -> Mention | None:
    """Who the verb at ``at`` is about, or None when that is not clear."""
    before = [m for m in named if m.end <= at]
    clause = _clause(text, start, at)
    if before:
        last = before[-1]
        between = text[last.end:at]
        if (FILLER.match(between) or RELATIVE.match(between)) and not OBJECT.search(text[start:last.start]):
            return last
    if previous is not None and COORDINATED.match(text[previous[0]:at]) and \
            not any(previous[0] <= m.start < at for m in named):
        return previous[1]  # "takes two arguments and returns None": the same subject
    if PRONOUN.search(clause):
        first = next((m for m in before if SENTENCE_START.match(text[start:m.start])), None)
        return first or (topic if not before else None)
    if before and SENTENCE_START.match(text[start:before[0].start]):
        others = [m for m in before[1:] if m.start >= at - len(clause)]
        return before[0] if not others else None
    return None
