"""The docs quote the code: the precedence table in docs/policy.md is RCPT_RULES."""

import re
from pathlib import Path

from tests.support.docs_pages import documented_dsn_from
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


def test_bounce_page_gives_the_from_the_reports_carry() -> None:
    # The golden DSN is what build_dsn makes for host mx.example.com (tests/unit/core/
    # test_dsn.py), from the address the milter gives it (test_message.py); the real
    # report through Postfix: tests/integration/test_shipped_config.py.
    golden = (Path(__file__).parent / "core" / "golden" / "simple.eml").read_bytes()
    from_line = next(line for line in golden.splitlines() if line.startswith(b"From: "))

    assert from_line.decode() == f"From: {documented_dsn_from()}"
