"""The digest counts in the state store (traqmilter.state.DigestStore), against both
backends: the embedded SQLite file and a private redis-server. The same tests run on each:
counts add up, stay bounded, survive reopening, go only when removed, and one holder at a
time may send them. Then the Digester over Redis: a store that is away keeps the events in
memory and stores them when it is back."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.capture import CaptureServer
from tests.support.redis_server import RedisServer
from traqmilter.core.digest import (
    DigestEvent,
    pending_digests,
)
from traqmilter.core.digest_counts import DROPPED, OTHERS, DigestRow, period_start
from traqmilter.core.settings import Action, NotificationSettings, StateSettings
from traqmilter.milter.notify import Digester
from traqmilter.milter.submit import SmtpSubmitter
from traqmilter.state import _UPGRADES, STATE_FILE_NAME, SqliteBlockStore
from traqmilter.state_redis import RedisBlockStore

# Redis expires keys by its own clock: the periods are recent ones.
P1 = period_start(time.time(), 3600) - 3600
P2 = P1 + 3600
NOW = P2 + 10.0
NOTIFY = "admin@example.com"
KEEP = NOW + 86400

Store = SqliteBlockStore | RedisBlockStore


@pytest.fixture(params=["sqlite", "redis"])
def opener(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> Iterator[Callable[[], Store]]:
    """Opens the store anew each call (a restarted process); all closed at the end."""
    opened: list[Store] = []

    def open_store() -> Store:
        store: Store
        if request.param == "sqlite":
            store = SqliteBlockStore(str(tmp_path / STATE_FILE_NAME))
        else:
            settings = StateSettings(backend="redis", url=redis_server.url, key_prefix=redis_prefix)
            store = RedisBlockStore(settings, max_blocks=1000)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def row(key: str, count: int = 1, *, period: int = P1, name: str = "forwarded") -> DigestRow:
    return DigestRow(period, NOTIFY, "fwd.example", name, key, count)


def test_counts_add_up_and_survive_reopening(opener: Callable[[], Store]) -> None:
    first = opener()
    first.add_digest([row("a@fwd.example"), row("b@fwd.example", 2)], max_tracked=10, expires=KEEP)
    first.add_digest([row("a@fwd.example", 3)], max_tracked=10, expires=KEEP)
    first.close()
    again = opener()  # a restarted milter
    assert sorted(again.pending_digests(P2, NOW)) == [
        row("a@fwd.example", 4),
        row("b@fwd.example", 2),
    ]


def test_only_periods_that_started_before_are_pending(opener: Callable[[], Store]) -> None:
    store = opener()
    store.add_digest([row("old@fwd.example")], max_tracked=10, expires=KEEP)
    store.add_digest([row("new@fwd.example", period=P2)], max_tracked=10, expires=KEEP)
    assert store.pending_digests(P2, NOW) == [row("old@fwd.example")]
    assert len(store.pending_digests(P2 + 3600, NOW)) == 2


def test_a_flood_of_distinct_keys_is_counted_not_kept(opener: Callable[[], Store]) -> None:
    store = opener()
    store.add_digest([row(f"u{n}@fwd.example") for n in range(5)], max_tracked=3, expires=KEEP)
    store.add_digest([row(f"v{n}@fwd.example") for n in range(100)], max_tracked=3, expires=KEEP)
    store.add_digest([row("u0@fwd.example", 5)], max_tracked=3, expires=KEEP)  # named: counted
    rows = store.pending_digests(P2, NOW)
    named = {r.key: r.count for r in rows if r.key != OTHERS}
    assert named == {"u0@fwd.example": 6, "u1@fwd.example": 1, "u2@fwd.example": 1}
    assert [r.count for r in rows if r.key == OTHERS] == [2 + 100]
    # The bound is per list: senders have their own max_tracked.
    store.add_digest([row("s@x.example", name="senders")], max_tracked=3, expires=KEEP)
    assert row("s@x.example", name="senders") in store.pending_digests(P2, NOW)
    # The digest says so.
    (pending,) = pending_digests(store.pending_digests(P2, NOW), max_tracked=3)
    (summary,) = pending.tallies.summaries(top=2)
    assert summary.forwarded.others == 1 + 102 and summary.forwarded.untracked == 102


def test_dropped_domains_are_kept_as_a_count(opener: Callable[[], Store]) -> None:
    store = opener()
    dropped = DigestRow(P1, NOTIFY, "", DROPPED, OTHERS, 7)
    store.add_digest([dropped, row("a@fwd.example")], max_tracked=3, expires=KEEP)
    (pending,) = pending_digests(store.pending_digests(P2, NOW), max_tracked=3)
    assert pending.tallies.dropped == 7 and pending.periods == (P1,)


def test_removing_a_digest_leaves_the_other_addresses_and_periods(
    opener: Callable[[], Store],
) -> None:
    store = opener()
    other = DigestRow(P1, "other@example.com", "fwd.example", "forwarded", "x@fwd.example", 1)
    later = row("late@fwd.example", period=P2)
    store.add_digest([row("a@fwd.example"), other], max_tracked=10, expires=KEEP)
    store.add_digest([later], max_tracked=10, expires=KEEP)
    store.remove_digest(NOTIFY, [P1])
    assert store.pending_digests(P2 + 3600, NOW) == [other, later]


def test_counts_nobody_sent_are_given_up_when_they_expire(opener: Callable[[], Store]) -> None:
    store = opener()
    store.add_digest([row("a@fwd.example")], max_tracked=10, expires=time.time() + 1)
    assert store.pending_digests(P2, time.time()) == [row("a@fwd.example")]
    deadline = time.monotonic() + 10
    while store.pending_digests(P2, time.time() + 1.5):  # Redis expires by its own clock
        assert time.monotonic() < deadline, "never expired"
        time.sleep(0.1)


def test_one_holder_at_a_time_claims_the_digests(opener: Callable[[], Store]) -> None:
    a, b = opener(), opener()  # two processes (two MX hosts on Redis)
    now = time.time()
    assert a.claim_digests("a", 60, now)
    assert a.claim_digests("a", 60, now)  # its own claim again
    assert not b.claim_digests("b", 60, now)
    a.release_digests("b")  # not b's: nothing happens
    assert not b.claim_digests("b", 60, now)
    a.release_digests("a")
    assert b.claim_digests("b", 1, now)
    # A claimant that died: its claim ends by itself.
    deadline = time.monotonic() + 10
    while not a.claim_digests("a", 60, time.time()):
        assert time.monotonic() < deadline, "claim never ended"
        time.sleep(0.1)


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_state_file_gets_the_digest_tables(tmp_path: Path, version: int) -> None:
    path = tmp_path / STATE_FILE_NAME
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE blocks (client TEXT PRIMARY KEY, until REAL, attempts INTEGER)")
    conn.execute("INSERT INTO blocks VALUES ('192.0.2.1', 9e9, 5)")
    for statement in (sql for step in _UPGRADES[: version - 1] for sql in step):
        conn.execute(statement)  # what that version had
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    store = SqliteBlockStore(str(path))
    try:
        store.add_digest([row("a@fwd.example")], max_tracked=10, expires=KEEP)
        assert store.pending_digests(P2, NOW) == [row("a@fwd.example")]
        assert [b.client for b in store.load(NOW)] == ["192.0.2.1"]
    finally:
        store.close()


def test_the_digester_keeps_events_in_memory_while_redis_is_away() -> None:
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        capture = stack.enter_context(CaptureServer())
        settings = StateSettings(backend="redis", url=redis.url, key_prefix="d:", timeout=0.2)
        store = RedisBlockStore(settings, max_blocks=1000)
        stack.callback(store.close)
        clock = [P1 + 10.0]
        submitter = SmtpSubmitter(f"inet:127.0.0.1:{capture.port}", timeout=10)
        notifications = NotificationSettings()
        digester = Digester(
            lambda: notifications, submitter, store, hostname="mx.example", clock=lambda: clock[0]
        )
        event = DigestEvent(NOTIFY, "fwd.example", Action.FORWARD, "x@fwd.example", "s", "c")
        redis.kill()
        digester.record([event])
        assert not digester.save()
        redis.start()  # back, empty
        digester.record([dataclasses.replace(event, address="y@fwd.example")])
        assert digester.save()
        clock[0] = P2 + 10
        assert digester.flush() == 1
        (digest,) = capture.wait_for(1, timeout=10)
    assert b"x@fwd.example" in digest.data and b"y@fwd.example" in digest.data
