"""The documentation stays true: the generated settings reference is current, every relative link of the README and
docs/ resolves inside the repository (its anchor to a heading), the README stays short, and nothing points at a
document outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import PROJECT_ROOT, reference

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a link inside code is an example, not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """What is wrong with each relative link of ``page`` (its text: ``text``, else the file's)."""
    problems = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8") if text is None else text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto:
        path_part, _, anchor = target.partition("#")
        where = (page.parent / path_part).resolve() if path_part else page
        rel = f"{page.relative_to(PROJECT_ROOT)}: ({target})"
        if not where.is_relative_to(PROJECT_ROOT):
            problems.append(f"{rel} leaves the repository")
        elif not where.exists():
            problems.append(f"{rel} names no file")
        elif anchor and (where.suffix != ".md" or anchor not in anchors(where)):
            problems.append(f"{rel}: no heading with the anchor '{anchor}' in {where.relative_to(PROJECT_ROOT)}")
    return problems


def test_reference_is_current():
    """docs/reference.md is what the generator writes from conf/ and the stages today."""
    expected = reference.render()
    current = reference.OUT.read_text(encoding="utf-8") if reference.OUT.exists() else ""
    assert current == expected, (
        f"docs/reference.md is out of date with conf/ and the stages: run `{reference.COMMAND}` and commit the result")


def test_reference_is_deterministic():
    assert reference.render() == reference.render()


def test_reference_lists_every_group_option_and_setting():
    text = reference.render()
    for path in sorted((PROJECT_ROOT / "conf").rglob("*/*.yaml")):
        group = path.parent.relative_to(PROJECT_ROOT / "conf").as_posix()
        assert f"{group}={path.stem}" in text, f"{group}={path.stem} is missing from the reference"
    assert "| `alpha` | float (>= 0) | `16` |" in text  # mix.alpha: its type and bound from the stage, value from YAML
    assert "| `mode` | one of hooks, merge | `merge` |" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_links_resolve_inside_the_repository(page):
    assert broken_links(page) == []


def test_link_check_catches_what_it_forbids():
    """A missing file, a path out of the repository and an unknown anchor are each reported; code is not a link."""
    text = ("[a](nothing-here.md) [b](../../outside.md) [c](concepts.md#no-such-heading) [d](concepts.md#concepts) "
            "`[e](skipped.md)`\n```\n[f](skipped-too.md)\n```\n[g](https://example.org/x.md) [h](#reference)\n")
    problems = broken_links(DOCS / "index.md", text)
    assert len(problems) == 3, problems
    assert "names no file" in problems[0] and "leaves the repository" in problems[1] and "anchor" in problems[2]


def test_slugs_follow_github():
    assert slug("§4b Fitted synthesis") == "4b-fitted-synthesis"
    assert slug("Graphs (`pipeline=`)") == "graphs-pipeline"
    assert slug("`select.test_weight` in `select=hybrid`") == "selecttest_weight-in-selecthybrid"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; at most 250 (the rest belongs in docs/)"


# built from parts so that this file does not name them itself
OUTSIDE = ("ARCHITECTURE" + ".md", "SPEC" + " §", "../" + "shared")
SCANNED = ("pipeline", "stages", "conf", "bench", "tools", "tests", "docs")
SUFFIXES = {".py", ".yaml", ".md", ".toml", ".sh"}


def repository_files() -> list[Path]:
    files = [PROJECT_ROOT / name for name in ("README.md", "pyproject.toml", "setup.sh")]
    for folder in SCANNED:
        files += [p for p in sorted((PROJECT_ROOT / folder).rglob("*")) if p.suffix in SUFFIXES and p.is_file()]
    return [p for p in files if p.exists()]


def test_nothing_refers_to_a_document_outside_the_repository():
    found = [f"{p.relative_to(PROJECT_ROOT)}:{n}: {line.strip()[:100]}" for p in repository_files()
             for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if any(word in line for word in OUTSIDE)]
    assert found == [], f"{len(found)} references to documents that are not in this repository:\n" + "\n".join(found)
