"""What the docs pages promise, read from the pages themselves so tests hold them to it.

The example configuration of docs/configuration.md ("## Example") is run with the site's
paths and endpoints replaced by a test's own (each replaced string must be in the block,
so the page cannot drift away from what the tests run)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOC = DOCS / "configuration.md"
SHIPPED_BOUNCE_TEMPLATE = DOCS.parent / "traqmilter" / "data" / "bounce.txt.j2"


def example_section() -> str:
    """The text of the page's "## Example" section."""
    text = DOC.read_text()
    match = re.search(r"^## Example\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if match is None:
        raise AssertionError(f"{DOC} has no '## Example' section")
    return match.group(1)


def example_yaml() -> str:
    """The example file itself: the section's ```yaml block."""
    match = re.search(r"^```yaml\n(.*?)^```$", example_section(), flags=re.M | re.S)
    if match is None:
        raise AssertionError(f"{DOC}: the Example section has no ```yaml block")
    return match.group(1)


def example_mailboxes() -> list[str]:
    """The mailboxes the section says to add before a first start."""
    prose = example_section().partition("```yaml")[0]
    return re.findall(r"`([\w.+-]+@[\w.-]+)`", prose)


def private_example(replacements: Mapping[str, str]) -> str:
    """The example with each key of `replacements` replaced (all of its occurrences)."""
    text = example_yaml()
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"the example in {DOC} no longer contains {old!r}")
        text = text.replace(old, new)
    return text


def documented_dsn_from() -> str:
    """The `From:` docs/bounce-template.md says a report carries (host mx.example.com)."""
    text = " ".join((DOCS / "bounce-template.md").read_text().split())
    match = re.search(r"## What the report contains .*?`From: ([^`]+)`", text)
    if match is None:
        raise AssertionError("docs/bounce-template.md no longer says what the report's From: is")
    return match.group(1)
