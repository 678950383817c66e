"""The administrator is told, end to end: real SMTP into a private Postfix with traqmilter's
milter; the digests travel back through Postfix's DSN service to the notify address (a
remote one here, so Postfix relays them to the `outside` capture server), the
on_create hook is a real program, and `traqmilter report` reads the milter's own log."""

from __future__ import annotations

import email
import email.policy
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from milter_world import QUEUE_SECONDS, World, milter_world

from tests.support.capture import Transaction
from tests.support.daemon_process import traqmilter_command
from tests.support.smtp import send_message

pytestmark = pytest.mark.postfix

SENDER = "sender@remote.example"
WATCHER = "watcher@remote.example"
PERIOD = 2  # seconds: short, so the test sees several periods


@pytest.fixture(scope="module")
def world(on_create_hooks: Path) -> Iterator[World]:
    extra = (
        f"undelivered: {{notify: {WATCHER}, on_create: [{on_create_hooks / 'on_create'}]}}\n"
        f"notifications: {{period: {PERIOD}s}}\n"
        "log: {format: json}\n"  # lines with their time, for `traqmilter report --since`
    )
    with milter_world(extra_config=extra) as started:
        yield started


def send(world: World, recipients: list[str]) -> None:
    result = send_message(
        world.postfix.host, world.postfix.smtp_port, sender=SENDER, recipients=recipients
    )
    assert result.data is not None and result.data.code == 250, result


def digests(world: World) -> list[Transaction]:
    return [t for t in world.outside.transactions if t.rcpt_tos == [WATCHER]]


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + QUEUE_SECONDS + 2 * PERIOD
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def body(transaction: Transaction) -> str:
    message = email.message_from_bytes(transaction.data, policy=email.policy.default)
    text: str = message.get_content()
    return text.replace("\r\n", "\n")


def test_create_sends_a_digest_to_the_notify_address_and_runs_the_hook(
    world: World, on_create_hooks: Path
) -> None:
    send(world, ["fresh+tag@shop.example"])
    wait_until(lambda: any("fresh@shop.example" in body(t) for t in digests(world)), "the digest")
    digest = next(t for t in digests(world) if "fresh@shop.example" in body(t))
    assert digest.mail_from == ""  # null sender: an undeliverable digest cannot loop back
    message = email.message_from_bytes(digest.data, policy=email.policy.default)
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["To"] == WATCHER and "shop.example" in message["Subject"]
    assert message["Message-ID"] and message["Date"]
    text = body(digest)
    assert "New mailboxes (create):\n    fresh@shop.example\n" in text
    assert f"Senders:\n         1  {SENDER}" in text
    ran = on_create_hooks / "ran"
    wait_until(ran.exists, "the on_create hook")
    assert "fresh@shop.example fresh@shop.example\n" in ran.read_text()
    assert "digest handed over: to=<watcher@remote.example>" in world.milter.log()


FORWARDED = re.compile(r"^ +(\d+)  (\S+@fwd\.example)$", re.MULTILINE)


def forwarded_counts(text: str) -> Counter[str]:
    """The forward list of a digest or report: address -> count."""
    section = text.partition("(forward), most used first:\n")[2].partition("  Senders")[0]
    return Counter({a: int(n) for n, a in FORWARDED.findall(section)})


def digested(world: World) -> Counter[str]:
    """The forward counts of every digest since the last clear."""
    total: Counter[str] = Counter()
    for t in digests(world):
        total.update(forwarded_counts(body(t)))
    return total


def test_forward_digest_lists_the_most_used_unknown_addresses(world: World) -> None:
    world.postfix.wait_queue_empty(QUEUE_SECONDS)
    world.outside.clear()
    send(world, ["often@fwd.example", "rare@fwd.example"])
    send(world, ["often@fwd.example"])
    send(world, ["often@fwd.example"])

    # A period may end between two messages: add up every digest since the clear.
    wait_until(
        lambda: digested(world) == {"often@fwd.example": 3, "rare@fwd.example": 1}, "3+1 counted"
    )
    if len(digests(world)) == 1:  # all in one period: the most used comes first
        section = body(digests(world)[0]).partition("most used first:\n")[2]
        assert section.index("often@fwd.example") < section.index("rare@fwd.example")
    assert {t.mail_from for t in digests(world)} == {""}


def test_report_prints_the_digest_summary_from_the_milter_log(world: World, tmp_path: Path) -> None:
    world.postfix.wait_queue_empty(QUEUE_SECONDS)
    world.outside.clear()
    send(world, ["report-often@fwd.example", "report-rare@fwd.example"])
    send(world, ["report-often+x@fwd.example", "report-new@shop.example"])
    send(world, ["report-gone@bounce.example"])  # a loopback client: a verified sender
    log = tmp_path / "milter.log"
    log.write_text(world.milter.log())  # the fate lines are logged before the 250 reply
    report = traqmilter_command(world.config_path, "report", "--since", "1h", str(log))
    assert report.returncode == 0, report.stderr
    out = report.stdout
    assert out.startswith("What traqmilter did for unknown recipients from ")
    fwd = out.partition("Domain fwd.example\n")[2].partition("\nDomain ")[0]
    counts = forwarded_counts(fwd)
    assert (counts["report-often@fwd.example"], counts["report-rare@fwd.example"]) == (2, 1)
    shop = out.partition("Domain shop.example\n")[2].partition("\nDomain ")[0]
    assert "  New mailboxes (create):\n" in shop and "    report-new@shop.example\n" in shop
    gone = out.partition("Domain bounce.example\n")[2].partition("\nDomain ")[0]
    assert "(bounce), most used first:\n         1  report-gone@bounce.example\n" in gone
    assert re.search(rf"Senders:\n +\d+  {SENDER}\n", gone)
    assert re.search(r"Clients:\n +\d+  127\.0\.0\.1\n", gone)
    assert "without a time" not in report.stderr and "malformed" not in report.stderr
    wait_until(  # the digests say the same
        lambda: digested(world) == {"report-often@fwd.example": 2, "report-rare@fwd.example": 1},
        "the same counts in the digests",
    )
    bad = traqmilter_command(world.config_path, "report", "--since", "1 fortnight", str(log))
    assert bad.returncode == 2
    assert "argument --since: '1 fortnight' is not a duration" in bad.stderr
