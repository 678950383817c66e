"""The example in docs/configuration.md is a complete file that `traqmilter check` accepts,
once the mailboxes it names exist (paths made private to the test)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.support.daemon_process import traqmilter_command
from tests.support.docs_pages import (
    SHIPPED_BOUNCE_TEMPLATE,
    example_mailboxes,
    example_yaml,
    private_example,
)
from traqmilter.core.settings import Action

# The key names SPEC section 6 makes part of the interface.
SPEC_KEYS = (
    "directory.sqlite",
    "undelivered.action",
    "domains",
    "postmaster",
    "dictionary_attack.threshold",
    "dictionary_attack.window",
    "dictionary_attack.block",
    "dictionary_attack.exempt",
    "queue.high_water",
    "policyd.listen",
    "milter.listen",
)
# Each action with the key that configures it.
ACTION_KEYS = {
    "forward": "forward_to",
    "readdress": "readdress_to",
    "create": "template",
    "outbox": "outbox_relay",
    "bounce": "bounce_template",
}


def test_example_uses_every_action_and_the_spec_key_names() -> None:
    example: dict[str, Any] = yaml.safe_load(example_yaml())

    for path in SPEC_KEYS:
        node: Any = example
        for name in path.split("."):
            assert name in node, f"the example lacks {path}"
            node = node[name]
    policies = [example["undelivered"], *example["domains"].values()]
    assert {policy.get("action", "reject") for policy in policies} == {a.value for a in Action}
    for policy in policies:
        if policy.get("action") in ACTION_KEYS:
            assert ACTION_KEYS[policy["action"]] in policy


def test_traqmilter_check_accepts_the_example(tmp_path: Path) -> None:
    template = tmp_path / "bounce.txt.j2"
    shutil.copyfile(SHIPPED_BOUNCE_TEMPLATE, template)  # as docs/bounce-template.md says
    (tmp_path / "queue").mkdir()
    config = tmp_path / "traqmilter.yaml"
    config.write_text(
        private_example(
            {
                "/var/lib/traqmilter": str(tmp_path / "state"),
                "/etc/traqmilter/bounce.txt.j2": str(template),
                "/var/spool/postfix": str(tmp_path / "queue"),
            }
        )
    )

    # Without its mailboxes the example cannot be served, and check says why.
    before = traqmilter_command(config, "check")
    assert before.returncode == 2
    assert "postmaster: postmaster@example.com is not a known mailbox" in before.stderr

    mailboxes = example_mailboxes()
    assert "postmaster@example.com" in mailboxes
    for address in mailboxes:
        added = traqmilter_command(config, "mailbox", "add", address)
        assert added.returncode == 0, added.stderr
    checked = traqmilter_command(config, "check")

    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == "traqmilter: config ok (6 local domains)\n"
