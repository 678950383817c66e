"""The docs quote the code: the precedence table in docs/policy.md is RCPT_RULES."""

import re
from pathlib import Path

from traqmilter.core.engine import RCPT_RULES

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_policy_page_lists_the_rules_in_order() -> None:
    text = (DOCS / "policy.md").read_text()
    listed = re.findall(r"^\| \d+ \| `(\w+)` \|", text, flags=re.M)
    assert listed == [rule.name for rule in RCPT_RULES]


def test_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"
