"""MkDocs hooks of this site (mkdocs.yml: hooks), kept out of the built site.

The command reference is mkdocs-click's rendering of ``queuectl --help``. A paragraph that
click prints as it is written (one that starts with a ``\\b`` line, such as each command's
``Example:`` block) would otherwise be reflowed by Markdown into one line, its commands run
together: here it becomes a code block, under its label.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Iterator
from typing import Any

import click
from mkdocs_click import _docs

NO_REWRAP = "\b"


def description(ctx: click.Context, remove_ascii_art: bool = False) -> Iterator[str]:
    """A command's help as Markdown: prose as it is, each ``\\b`` paragraph verbatim."""
    text = inspect.cleandoc(ctx.command.help or ctx.command.short_help or "")
    for paragraph in text.split("\n\n") if text else []:
        lines = paragraph.split("\n")
        yield from _verbatim(lines[1:]) if lines[0].strip() == NO_REWRAP else lines
        yield ""


def _verbatim(lines: list[str]) -> Iterator[str]:
    if lines and lines[0].rstrip().endswith(":") and not lines[0].startswith(" "):
        yield f"**{lines[0].strip()}**"
        yield ""
        lines = lines[1:]
    yield "```text"
    yield from textwrap.dedent("\n".join(lines)).split("\n")
    yield "```"


def on_config(config: Any) -> Any:
    # mkdocs-click builds each command's section from this one function; a version that
    # no longer has it must fail the build, not silently reflow the examples again.
    if not hasattr(_docs, "_make_description"):
        raise RuntimeError("mkdocs_click._docs._make_description is gone: update docs/hooks.py")
    _docs._make_description = description
    return config
