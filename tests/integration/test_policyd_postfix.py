"""policyd in front of a real Postfix: unknown recipients refused at RCPT, harvesters
blocked (across connections and policyd restarts), postmaster always reachable, a dead
policyd tempfails without losing mail, a full queue defers."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.capture import CaptureServer
from tests.support.daemon_process import DaemonProcess, traqmilter_command
from tests.support.fixtures import postfix_root, require_postfix
from tests.support.postfix import PostfixInstance, free_loopback_port, prepare_sqlite_directory
from tests.support.smtp import Reply, SendResult, make_message, send_message
from traqmilter.core.address import parse_address
from traqmilter.directory.sqlite import SqliteDirectory

pytestmark = pytest.mark.postfix

SENDER = "someone@sender.example"
HARVESTER = "127.0.0.3"
POLL_SECONDS = 20.0


@dataclass
class World:
    root: Path
    config_path: Path
    postfix: PostfixInstance
    policyd: DaemonProcess

    def send(
        self, *recipients: str, client: str = "127.0.0.1", subject: str = "test"
    ) -> SendResult:
        message = make_message(SENDER, list(recipients), subject=subject)
        return send_message(
            self.postfix.host,
            self.postfix.smtp_port,
            sender=SENDER,
            recipients=list(recipients),
            message=message,
            source_address=client,
        )

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return traqmilter_command(self.config_path, *argv)


def write_config(root: Path, policy_port: int, queue_directory: Path, extra: str = "") -> Path:
    path = root / "traqmilter.yaml"
    path.write_text(
        f"""\
state_dir: {root}/state
directory: {{sqlite: {root}/db/directory.sqlite}}
domains:
  example.com: {{}}
postmaster: admin@example.com
dictionary_attack: {{threshold: 3, window: 10m, block: 1h, exempt: ["127.0.0.2/32"]}}
queue: {{directory: {queue_directory}, sample_interval: 1s{extra}}}
policyd:
  listen: "inet:127.0.0.1:{policy_port}"
  socketmap_listen: "inet:127.0.0.1:{free_loopback_port()}"
"""
    )
    return path


@pytest.fixture(scope="module")
def world_factory() -> Iterator[Callable[..., World]]:
    """Builds worlds: the SQLite directory, Postfix, and policyd as its own process."""
    require_postfix()
    with contextlib.ExitStack() as stack:

        def make(queue_extra: str = "") -> World:
            root = stack.enter_context(postfix_root())
            capture = stack.enter_context(CaptureServer())
            sqlite_path = prepare_sqlite_directory(root / "db") / "directory.sqlite"
            store = SqliteDirectory(str(sqlite_path))
            store.add_mailbox(parse_address("alice@example.com"))
            store.add_mailbox(parse_address("admin@example.com"))
            store.close()
            policy_port = free_loopback_port()
            postfix = PostfixInstance(
                root / "postfix",
                sqlite_path=sqlite_path,
                relay_port=capture.port,
                policy_port=policy_port,
            )
            config_path = write_config(root, policy_port, postfix.queue_directory, queue_extra)
            # policyd first: it mirrors the config's domains into the directory Postfix reads.
            policyd = stack.enter_context(DaemonProcess(config_path, "policyd", policy_port))
            return World(root, config_path, stack.enter_context(postfix), policyd)

        yield make


@pytest.fixture(scope="module")
def world(world_factory: Callable[..., World]) -> World:
    return world_factory()


def wait_for_reply(send: Callable[[], Reply], want: Callable[[Reply], bool]) -> Reply:
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        reply = send()
        if want(reply) or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def test_unknown_recipient_is_refused_by_policyd(world: World) -> None:
    result = world.send("nobody@example.com")
    reply = result.rcpts["nobody@example.com"]
    assert reply.code == 550
    # policyd's text, not Postfix's own "User unknown in virtual mailbox table".
    assert reply.text == "5.1.1 <nobody@example.com>: Recipient address rejected: User unknown"


def test_known_recipient_is_delivered(world: World) -> None:
    result = world.send("alice+news@example.com", subject="known-recipient")
    assert result.data is not None and result.data.positive
    assert "known-recipient" in world.postfix.delivered_subjects("alice@example.com", POLL_SECONDS)


def test_harvester_is_blocked_across_connections_and_restarts(world: World) -> None:
    result = world.send(
        "guess1@example.com",
        "guess2@example.com",
        "guess3@example.com",
        "guess4@example.com",
        "alice@example.com",
        client=HARVESTER,
    )
    codes = [result.rcpts[r].code for r in result.rcpts]
    # threshold: 3 gives three guesses their 550; the fourth, past it, starts the block.
    assert codes == [550, 550, 550, 450, 450]
    assert result.rcpts["alice@example.com"].text.startswith("4.7.1 ")

    # The next connection learns nothing either, known or unknown.
    again = world.send("alice@example.com", "nobody@example.com", client=HARVESTER)
    assert {r.code for r in again.rcpts.values()} == {450}
    # Others are not affected.
    assert world.send("alice@example.com").rcpts["alice@example.com"].positive

    # Postmaster stays reachable for the blocked client, through the configured alias.
    pm = world.send("postmaster@example.com", client=HARVESTER, subject="to-postmaster")
    assert pm.data is not None and pm.data.positive
    assert "to-postmaster" in world.postfix.delivered_subjects("admin@example.com", POLL_SECONDS)

    # The block survives a policyd restart.
    assert world.policyd.stop() == 0
    world.policyd.start()
    after = world.send("alice@example.com", client=HARVESTER)
    assert after.rcpts["alice@example.com"].code == 450

    listed = world.cli("blocks", "list")
    assert listed.returncode == 0 and HARVESTER in listed.stdout
    cleared = world.cli("blocks", "clear", HARVESTER)
    assert cleared.returncode == 0, cleared.stderr
    # The running daemon picks the clear up without a restart.
    reply = wait_for_reply(
        lambda: world.send("alice@example.com", client=HARVESTER).rcpts["alice@example.com"],
        lambda r: r.positive,
    )
    assert reply.positive


def test_policyd_down_tempfails_and_loses_nothing(world: World) -> None:
    world.policyd.kill()
    try:
        down = world.send("alice@example.com", subject="while-policyd-down")
        assert down.rcpts["alice@example.com"].transient
        assert down.data is None
    finally:
        world.policyd.start()
    retry = world.send("alice@example.com", subject="while-policyd-down")
    assert retry.data is not None and retry.data.positive
    subjects = world.postfix.delivered_subjects("alice@example.com", POLL_SECONDS)
    assert subjects.count("while-policyd-down") == 1


def test_full_queue_defers_new_mail(world_factory: Callable[..., World]) -> None:
    world = world_factory(", high_water: 1, defer_water: 2")
    world.postfix.hold_messages(3, "alice@example.com")
    deferred = wait_for_reply(
        lambda: world.send("alice@example.com").rcpts["alice@example.com"],
        lambda r: r.code == 452,
    )
    assert deferred.code == 452 and deferred.text.startswith("4.3.1 ")
    # Postmaster is still reachable under queue pressure.
    assert world.send("postmaster@example.com").rcpts["postmaster@example.com"].positive
    world.postfix.delete_queued()
    accepted = wait_for_reply(
        lambda: world.send("alice@example.com").rcpts["alice@example.com"], lambda r: r.positive
    )
    assert accepted.positive
