"""The command reference cannot leave a command out: it is generated from the click group
by mkdocs-click when the site is built, and this test renders it the same way and looks for
a section for every command and subcommand that ``queuectl --help`` offers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import markdown
import pytest
from markdown.extensions.toc import slugify

from queuectl.cli import cli

pytestmark = pytest.mark.stores("sqlite")  # no store of its own to test

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"


def command_paths(command: click.Command, path: str = "queuectl") -> Iterator[str]:
    """``queuectl``, ``queuectl config``, ``queuectl config set``, ...: every visible one."""
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not sub.hidden:
            yield from command_paths(sub, f"{path} {name}")


def sections(text: str) -> set[str]:
    """The ids of the headings the site's build gives ``text`` (mkdocs.yml's extensions)."""
    html = markdown.markdown(text, extensions=["attr_list", "tables", "toc", "mkdocs-click"])
    return set(re.findall(r'<h[1-6] id="([^"]+)"', html))


def missing(text: str) -> list[str]:
    found = sections(text)
    return [path for path in command_paths(cli) if slugify(path, "-") not in found]


def test_the_reference_has_a_section_for_every_command() -> None:
    assert missing(REFERENCE.read_text(encoding="utf-8")) == []


def test_a_command_left_out_of_the_reference_is_missing() -> None:
    one = "::: mkdocs-click\n    :module: queuectl.cli\n    :command: enqueue\n" \
          "    :prog_name: queuectl enqueue\n"
    left_out = missing(one)
    assert "queuectl list" in left_out and "queuectl config set" in left_out
    assert "queuectl enqueue" not in left_out


def test_the_site_renders_the_reference_with_mkdocs_click() -> None:
    """What the tests above render is what the site builds: the same extensions are on."""
    lines = [line.split("#")[0].rstrip()
             for line in (ROOT / "mkdocs.yml").read_text(encoding="utf-8").splitlines()]
    assert "  - mkdocs-click" in lines and "  - attr_list" in lines
    assert "  - Command reference: reference.md" in lines
