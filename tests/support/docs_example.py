"""The example configuration of docs/configuration.md ("## Example"), as tests run it:
the YAML block taken from the page, with the site's paths and endpoints replaced by a
test's own (each replaced string must be in the block, so the page cannot drift away)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
SHIPPED_BOUNCE_TEMPLATE = DOC.parents[1] / "traqmilter" / "data" / "bounce.txt.j2"


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
