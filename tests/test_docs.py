"""The docs: every command has a page naming all its options; every internal link resolves. No mkdocs needed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command

from uadct.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            found += _commands(command, prefix + (name,))
        else:
            found.append((prefix + (name,), command))
    return found


COMMANDS = _commands(get_command(app))


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_and_option_is_documented(path, command):
    """docs/commands/<command>.md exists, names the full command and every option of it."""
    page = DOCS / "commands" / f"{path[0]}.md"
    assert page.is_file(), f"no page {page.relative_to(ROOT)} for `uadct {' '.join(path)}`"
    text = page.read_text(encoding="utf-8")
    assert f"uadct {' '.join(path)}" in text
    for param in command.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("--") and name != "--help":
                assert re.search(rf"`{re.escape(name)}[`= ]", text), f"{page.name}: option {name} not documented"


def _slug(heading: str) -> str:
    """The anchor mkdocs' toc extension gives a heading (lower case, punctuation dropped, spaces -> -)."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines() if re.match(r"#{1,6}\s", line)}


def _strip_code(text: str) -> str:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_internal_links_resolve(page):
    for target in LINK.findall(_strip_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked.exists(), f"{page.relative_to(ROOT)}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.relative_to(ROOT)}: no heading #{anchor} in {file_part or page.name}"


def test_mkdocs_config_lists_every_page():
    """No explicit nav (pages others add appear by themselves), the material theme, `make docs`."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^theme:\s*\n\s+name:\s*material", config, flags=re.M)
    assert not re.search(r"^nav:", config, flags=re.M)
    assert "docs:" in (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^docs = \[.*mkdocs.*mkdocs-material", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), flags=re.M)
    assert (DOCS / "index.md").is_file() and len(PAGES) >= 10
