"""README.md and docs/ against the repository: links resolve, every config key is documented
(and no other), the README stays a front door whose test command is CI's, and every number
names its commit rather than a "version"."""

from __future__ import annotations

import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

from imagetx.config import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(path: Path) -> list[str]:
    """Every markdown link and image target in `path`, outside code blocks."""
    return LINK.findall(FENCE.sub("", path.read_text()))


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto: not files; a pure anchor is on this page
        file = target.split("#", 1)[0]
        if not (path.parent / file).resolve().exists():
            broken.append(target)
    return broken


def test_docs_exist():
    names = {p.name for p in DOCS}
    for name in ("results.md", "benchmarks.md", "configuration.md", "architecture.md",
                 "troubleshooting.md", "model.md"):
        assert name in names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_and_images_resolve(path):
    assert links(path), f"{path.name} has no links: the link pattern no longer matches"
    assert broken_links(path) == [], f"{path.name} links to files that are not in the repository"


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) ![gone](samples/nope.png) [web](https://example.org) [a](#x)\n"
                    "```\n[in code](not/checked.md)\n```\n")
    assert broken_links(page) == ["samples/nope.png"]


def documented_keys(text: str) -> dict[str, list[str]]:
    """{section: [keys]} from configuration.md: under each `## [section]` heading, the first
    column of its table, a key in backticks."""
    keys: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        heading = re.match(r"^##\s+\[(\w+)\]\s*$", line)
        if heading:
            section = heading.group(1)
            keys[section] = []
        elif line.startswith("#"):
            section = None
        elif section is not None:
            row = re.match(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|", line)
            if row:
                keys[section].append(row.group(1))
    return keys


def test_configuration_documents_every_key_and_no_other():
    keys = documented_keys((ROOT / "docs" / "configuration.md").read_text())
    assert set(keys) == set(SECTIONS), "one `## [section]` table per config section"
    for section, cls in SECTIONS.items():
        real = [f.name for f in fields(cls)]
        assert len(keys[section]) == len(set(keys[section])), f"[{section}] documents a key twice"
        assert set(real) - set(keys[section]) == set(), f"[{section}] keys missing from docs/configuration.md"
        assert set(keys[section]) - set(real) == set(), f"docs/configuration.md names keys [{section}] does not have"


def test_documented_keys_parser():
    text = "## [model]\n| key | x |\n|---|---|\n| `a` | 1 |\n| `b_2` | 2 |\n## Other\n| `c` | 3 |\n"
    assert documented_keys(text) == {"model": ["a", "b_2"]}


def ci_test_command() -> str:
    """The last command of .ci/run: the test command CI runs."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert "pytest" in commands[-1]
    return commands[-1]


def test_readme_is_short_and_gives_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = shlex.split(ci_test_command())
    # the README's set-up line: install, then the test command, joined by &&
    setup = [line for line in readme.splitlines() if "pip install -e '.[test]'" in line]
    assert len(setup) == 1, "one README line installs the test extras and runs the tests"
    assert shlex.split(setup[0].split("&&")[-1]) == ci


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_no_unnamed_versions(path):
    found = re.findall(r"\b(?:this|previous|earlier|older|last) (?:version|build)s?\b", path.read_text(), re.I)
    assert found == [], f"{path.name}: name the commit instead of {found}"
