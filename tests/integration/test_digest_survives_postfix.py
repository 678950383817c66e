"""Digests that survive a crash and are sent once per site, end to end: real SMTP into
private Postfix instances with traqmilter's milter; the digests travel back through
Postfix's DSN service to the `outside` capture server.

- One host: the milter is killed (SIGKILL) in the middle of a period and started again;
  the period's digest still arrives, once, with the events from before the kill (they
  were in the state file).
- Two MX hosts sharing one private redis-server: each gets mail in the same period, and
  exactly one digest, listing both hosts' events, arrives for the site."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from milter_world import QUEUE_SECONDS, World, milter_world

from tests.integration.test_notify_postfix import body, forwarded_counts
from tests.support.capture import Transaction
from tests.support.redis_server import RedisServer
from tests.support.smtp import send_message
from traqmilter.milter.notify import GRACE_SECONDS, SAVE_SECONDS
from traqmilter.state import STATE_FILE_NAME, SqliteBlockStore

pytestmark = pytest.mark.postfix

SENDER = "sender@remote.example"
WATCHER = "watcher@remote.example"
PERIOD = 10  # seconds: room for a kill and a restart inside one period
NOTIFY_CONFIG = f"undelivered: {{notify: {WATCHER}}}\nnotifications: {{period: {PERIOD}s}}\n"
HANDED_OVER = f"digest handed over: to=<{WATCHER}>"


def send(world: World, recipient: str) -> None:
    result = send_message(
        world.postfix.host, world.postfix.smtp_port, sender=SENDER, recipients=[recipient]
    )
    assert result.data is not None and result.data.code == 250, result


def wait_until(condition: Callable[[], object], what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def early_in_a_period() -> None:
    """Wait for the first second of a period (they are aligned to the epoch), so that what
    the test does next happens inside one period."""
    wait_until(lambda: time.time() % PERIOD < 1.0, "a period to start", PERIOD + 1)


def digests(*worlds: World) -> list[Transaction]:
    return [t for w in worlds for t in w.outside.transactions if t.rcpt_tos == [WATCHER]]


def digested(*worlds: World) -> Counter[str]:
    total: Counter[str] = Counter()
    for t in digests(*worlds):
        total.update(forwarded_counts(body(t)))
    return total


DIGEST_SECONDS = PERIOD + GRACE_SECONDS + QUEUE_SECONDS


@pytest.fixture
def world() -> Iterator[World]:
    with milter_world(extra_config=NOTIFY_CONFIG) as started:
        yield started


def test_a_killed_milter_still_sends_the_period_digest_once(world: World) -> None:
    state = SqliteBlockStore(str(world.root / "state" / STATE_FILE_NAME))
    try:
        early_in_a_period()
        send(world, "before-kill@fwd.example")
        # Stored within SAVE_SECONDS of the message: wait for it there, then crash.
        wait_until(
            lambda: any(
                r.key == "before-kill@fwd.example" for r in state.pending_digests(2**40, 0)
            ),
            "the event in the state file",
            SAVE_SECONDS + 10,
        )
        world.milter.kill()
        world.milter.start()
        send(world, "after-restart@fwd.example")
        expected = {"before-kill@fwd.example": 1, "after-restart@fwd.example": 1}
        wait_until(lambda: digested(world) == expected, "the digest", DIGEST_SECONDS)
        # Sent: its counts are gone from the store, so nobody sends them again.
        wait_until(lambda: not state.pending_digests(2**40, 0), "the counts removed", 10)
    finally:
        state.close()
    # One digest carries the events from before the kill, once. (A restart slow enough
    # to cross into the next period puts the second message in that period's digest.)
    assert len([t for t in digests(world) if "before-kill@" in body(t)]) == 1
    assert world.milter.log().count(HANDED_OVER) == len(digests(world)) <= 2
    assert {t.mail_from for t in digests(world)} == {""}


def test_two_mx_hosts_sharing_redis_send_one_digest_for_the_site() -> None:
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        shared = f'state: {{backend: redis, url: "{redis.url}", key_prefix: "mx:"}}\n'
        mx1, mx2 = (
            stack.enter_context(milter_world(extra_config=NOTIFY_CONFIG + shared)) for _ in range(2)
        )
        early_in_a_period()
        send(mx1, "via-mx1@fwd.example")
        send(mx2, "via-mx2@fwd.example")
        send(mx2, "via-mx2@fwd.example")
        expected = {"via-mx1@fwd.example": 1, "via-mx2@fwd.example": 2}
        wait_until(lambda: digested(mx1, mx2) == expected, "the site's digest", DIGEST_SECONDS)
        # Once the counts are gone from Redis, no host can send them again.
        wait_until(lambda: redis.client().zcard("mx:digests") == 0, "the counts removed", 10)
        assert len(digests(mx1, mx2)) == 1
        handed = [w.milter.log().count(HANDED_OVER) for w in (mx1, mx2)]
        assert sorted(handed) == [0, 1]
