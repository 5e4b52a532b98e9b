"""The README and docs/ keep their promises: the README is a short user's guide (at most 200 lines,
no commit hashes, no dated runs), every relative link in it and in docs/*.md resolves (anchors
included), every docs page is reachable from the README, and every `make` target it names is a
rule of the Makefile. Nothing is run: the files are parsed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 200

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
# a commit hash: 7 to 40 hex digits with at least one digit and one letter (so neither a plain
# number nor an English word made of a-f)
_HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
_DATE = re.compile(r"\b(19|20)\d\d-\d\d-\d\d\b")
_RULE = re.compile(r"^([A-Za-z0-9_.%/-]+(?:[ \t]+[A-Za-z0-9_.%/-]+)*)[ \t]*::?(?!=)")


def _without_code(text: str) -> str:
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (not URLs, not in-page anchors), outside code."""
    targets = _LINK.findall(_without_code(text))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", text, re.M)}


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path.read_text()):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists():
            broken.append(f"{target}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return broken


def code_chunks(text: str) -> list[str]:
    """The contents of fenced code blocks and inline code spans."""
    chunks = [m.group(0) for m in _FENCE.finditer(text)]
    chunks += [m.group(2) for m in _CODE_SPAN.finditer(_FENCE.sub("", text))]
    return chunks


def make_targets_named(text: str) -> set[str]:
    """Targets of every `make ...` command in code: the words after `make` up to the end of the
    command, without variable assignments (`KEY=value`), options or comments."""
    targets = set()
    for chunk in code_chunks(text):
        for line in chunk.splitlines():
            for match in re.finditer(r"(?:^|[\s;&|(`$])make\b(?!\.)(.*)", line):
                try:
                    words = shlex.split(match.group(1), comments=True)
                except ValueError:  # an unbalanced quote: a fragment of prose, not a command
                    continue
                for word in words:
                    if word in ("&&", "||", ";", "|") or word.startswith(("|", ";", "&", ")")):
                        break
                    if "=" in word or word.startswith("-"):
                        continue
                    if not re.fullmatch(r"[A-Za-z0-9_.-]+", word):
                        break
                    targets.add(word)
    return targets


def makefile_targets(path: Path) -> set[str]:
    targets = set()
    for line in path.read_text().splitlines():
        if line.startswith(("\t", "#", " ")) or "$(" in line.split(":", 1)[0]:
            continue
        if match := _RULE.match(line):
            targets.update(t for t in match.group(1).split() if not t.startswith("."))
    return targets


# -- the parsers themselves, on known text -----------------------------------------------------------
def test_parsers_on_known_text(tmp_path):
    text = (
        "See [api](docs/api.md#errors), [site](https://example.com), [here](#top), ![img](a.png).\n"
        '`make serve MODEL_DIR=/m ENGINE_ARGS="a=1 b=2"` and `make lint`, `make format`\n'
        "```bash\nmake loadtest USERS=4   # a comment naming make fake\n"
        "cd x && make tiny-model\n```\n"
        "In prose, make sure nothing counts; `[not](a/link.md)` is code.\n"
    )
    assert relative_links(text) == ["docs/api.md#errors", "a.png"]
    assert make_targets_named(text) == {"serve", "lint", "format", "loadtest", "tiny-model"}
    makefile = tmp_path / "Makefile"
    makefile.write_text(
        "X ?= 1\nY := 2\n.PHONY: a b\n$(STAMP): x\n\tcmd: not a rule\na: b\nb c:\n# d: e\nfile/x.json: a\n"
    )
    assert makefile_targets(makefile) == {"a", "b", "c", "file/x.json"}
    assert slug("The stubs' priority") == "the-stubs-priority"
    assert slug("CPU priorities (`SERVING_NICE`)") == "cpu-priorities-serving_nice"
    assert _HASH.search("fixed in git 6bccda1") and _HASH.search("commit 3dceade")
    assert not _HASH.search("a defaced 1234567 cafe 0x12")


# -- the README ------------------------------------------------------------------------------------------
def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_commit_hashes_or_dated_runs(path):
    text = path.read_text()
    assert not (found := _HASH.findall(text)), f"{path.name}: commit hashes {found} belong in git, not here"
    dates = [m.group(0) for m in _DATE.finditer(text)]
    assert not dates, f"{path.name}: dated runs {dates} belong in git and the issue notes"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert not (broken := broken_links(path)), f"{path.name}: broken links {broken}"


def test_readme_links_into_docs_and_every_page_is_linked():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README.read_text())}
    assert DOCS, "docs/ has no pages"
    assert not (orphans := [p.name for p in DOCS if p.resolve() not in linked]), (
        f"docs pages the README does not link: {orphans}"
    )


def test_make_targets_named_in_the_readme_exist():
    named = make_targets_named(README.read_text())
    assert {"serve", "test"} <= named, "the quick start names `make serve` and `make test`"
    missing = named - makefile_targets(ROOT / "Makefile")
    assert not missing, f"README names make targets the Makefile lacks: {sorted(missing)}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_make_targets_named_in_docs_exist(path):
    missing = make_targets_named(path.read_text()) - makefile_targets(ROOT / "Makefile")
    assert not missing, f"{path.name} names make targets the Makefile lacks: {sorted(missing)}"
