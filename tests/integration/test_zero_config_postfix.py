"""Zero configuration on an existing Postfix, end to end: a private real Postfix whose own
tables list the recipients (a proxy:hash: virtual mailbox table, the contrib sqlite alias
table), and policyd with a config that names nothing but that Postfix's directory (and the
paths and ports a test must keep private). Unknown recipients are refused by policyd,
known ones delivered."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.capture import CaptureServer
from tests.support.daemon_process import DaemonProcess, traqmilter_command
from tests.support.fixtures import postfix_root, require_postfix
from tests.support.postfix import PostfixInstance, free_loopback_port, prepare_sqlite_directory
from tests.support.postfix_config import private_postfix_config
from tests.support.smtp import SendResult, make_message, send_message
from tests.unit.directory.helpers import postmap, write_table
from traqmilter.directory.sqlite import SqliteDirectory

pytestmark = pytest.mark.postfix

SENDER = "someone@sender.example"
POLL_SECONDS = 20.0


@dataclass
class World:
    config_path: Path
    postfix: PostfixInstance

    def send(self, *recipients: str, subject: str = "test") -> SendResult:
        return send_message(
            self.postfix.host,
            self.postfix.smtp_port,
            sender=SENDER,
            recipients=list(recipients),
            message=make_message(SENDER, list(recipients), subject=subject),
        )

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return traqmilter_command(self.config_path, *argv)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    require_postfix()
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(postfix_root())
        capture = stack.enter_context(CaptureServer())
        sqlite_path = prepare_sqlite_directory(root / "db") / "directory.sqlite"
        SqliteDirectory(str(sqlite_path)).close()  # empty: no mailbox of traqmilter's own
        tables = root / "tables"
        tables.mkdir()
        private_postfix_config(tables)  # postmap builds the table with a main.cf of its own
        write_table(tables / "vmailbox", ["known@zero.example zero.example/known/"])
        vmailbox = postmap("hash", tables / "vmailbox")
        policy_port = free_loopback_port()
        postfix = PostfixInstance(
            root / "postfix",
            sqlite_path=sqlite_path,
            relay_port=capture.port,
            policy_port=policy_port,
            extra_main_cf={
                "virtual_mailbox_domains": "zero.example",
                "virtual_mailbox_maps": f"proxy:{vmailbox}",
            },
        )
        stack.enter_context(postfix)
        config_path = root / "traqmilter.yaml"
        # Nothing about domains, recipients or actions: all of it comes from Postfix.
        config_path.write_text(
            f"state_dir: {root}/state\n"
            f"directory: {{sqlite: {sqlite_path}}}\n"
            f"postfix: {{config_dir: {postfix.config_directory}}}\n"
            f"queue: {{directory: {postfix.queue_directory}}}\n"
            f'policyd: {{listen: "inet:127.0.0.1:{policy_port}", '
            f'socketmap_listen: "inet:127.0.0.1:{free_loopback_port()}"}}\n'
        )
        stack.enter_context(DaemonProcess(config_path, "policyd", policy_port))
        yield World(config_path, postfix)


def test_unknown_recipient_of_a_postfix_domain_is_rejected_by_policyd(world: World) -> None:
    reply = world.send("nobody@zero.example").rcpts["nobody@zero.example"]
    assert reply.code == 550
    # policyd's reply (action reject), not Postfix's "User unknown in virtual mailbox table".
    assert reply.text == "5.1.1 <nobody@zero.example>: Recipient address rejected: User unknown"


def test_known_recipient_of_the_postfix_table_is_delivered(world: World) -> None:
    result = world.send("known@zero.example", subject="zero-config")
    assert result.data is not None and result.data.positive
    assert "zero-config" in world.postfix.delivered_subjects("known@zero.example", POLL_SECONDS)


def test_check_and_explain_show_what_postfix_told(world: World) -> None:
    checked = world.cli("check")
    assert checked.returncode == 0, checked.stderr
    assert "  virtual mailbox domains: zero.example\n" in checked.stdout
    assert "virtual_alias_maps proxy:sqlite:" in checked.stdout  # asked with postmap -q
    assert checked.stdout.endswith("traqmilter: config ok (1 local domains from Postfix)\n")
    explained = world.cli("explain", "known@zero.example")
    assert "rule: known\n" in explained.stdout
    assert "known_by: virtual_mailbox_maps proxy:hash:" in explained.stdout
