"""The SQLite store's memory index: the same answers as SQLite, and never staler than the
change check (lookup_cache_seconds) after `traqmilter mailbox add`, the create action or
any other writer; a hash collision costs a lookup in SQLite, never a wrong answer."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from traqmilter.core.address import parse_address
from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.directory import SqliteDirectory, sqlite
from traqmilter.keyindex import BUILD_STEP, KNOWN, MAYBE, UNKNOWN, HashedKeysBuilder

from .test_sqlite_store import LOOKUP_CASES, LOOKUP_ROWS, insert_lookup_rows


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "directory.sqlite"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[SqliteDirectory]:
    opened = SqliteDirectory(str(db_path), lookup_cache_seconds=1.0, monotonic_clock=clock)
    yield opened
    opened.close()


@pytest.mark.parametrize("compact", [False, True], ids=["set", "compact"])
def test_index_answers_every_case_as_sqlite_does(db_path: Path, compact: bool) -> None:
    store = SqliteDirectory(str(db_path), compact_index=compact)
    insert_lookup_rows(db_path)
    plain = SqliteDirectory(str(db_path), memory_index=False)
    assert store.load_index()
    extra = [("bare domain", "example.com", False), ("bare local part", "alice", False)]
    for label, key, want in [*LOOKUP_CASES, *extra]:
        assert store.contains(key) is want, label
        assert plain.contains(key) is want, label
    # Every answer above came from the index: it was read once and nothing changed since.
    assert store.index_size() == sum(active for _, _, active in LOOKUP_ROWS)
    assert plain.index_size() is None
    plain.close()
    store.close()


def test_first_lookup_reads_the_index_in_the_background(db_path: Path) -> None:
    store = SqliteDirectory(str(db_path), lookup_cache_seconds=0.05)
    store.bulk_add(f"user{n}@example.com" for n in range(1000))
    assert store.index_size() is None  # nothing reads it until a lookup
    assert store.contains("user7@example.com")  # answered by SQLite meanwhile
    deadline = time.monotonic() + 30
    while store.index_size() is None:
        assert time.monotonic() < deadline, "index never read"
        assert store.contains("user8@example.com") and not store.contains("x@example.com")
        time.sleep(0.01)
    assert store.index_size() == 1000
    store.close()


def test_writes_through_the_store_are_seen_at_once(store: SqliteDirectory) -> None:
    store.bulk_add(["alice@example.com"])
    assert store.load_index()
    assert not store.contains("new@shop.example")
    assert store.create_from_template(parse_address("new@shop.example"), "default")
    assert store.contains("new@shop.example")
    assert store.remove_mailbox("alice@example.com")
    assert not store.contains("alice@example.com")
    store.add_alias("@catch.example", "new@shop.example")
    assert store.contains("anyone@catch.example")


def test_mailbox_add_command_is_seen_within_the_check_interval(
    store: SqliteDirectory, db_path: Path, clock: Clock, tmp_path: Path
) -> None:
    """`traqmilter mailbox add` in another process, as an administrator runs it."""
    config = tmp_path / "traqmilter.yaml"
    config.write_text(f"state_dir: {tmp_path}/state\ndirectory: {{sqlite: {db_path}}}\n")
    store.bulk_add(["alice@example.com"])
    assert store.load_index()
    assert not store.contains("bob@example.com")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "traqmilter",
            "-c",
            str(config),
            "mailbox",
            "add",
            "Bob@example.com",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    # Within the interval the index may still answer from before the change...
    assert not store.contains("bob@example.com")
    # ...and once it is over, never: the check drops the index and SQLite answers.
    clock.now += 1.0
    assert store.contains("bob@example.com")
    assert store.index_size() is None
    # The re-read index knows it too.
    assert store.load_index()
    assert store.contains("bob@example.com") and store.contains("alice@example.com")


def test_create_action_in_the_milter_is_seen_by_policyd(
    store: SqliteDirectory, db_path: Path, clock: Clock
) -> None:
    """Two daemons on one file: the milter creates a mailbox, policyd's index must follow
    (then a second mail to that address is known)."""
    store.bulk_add(["alice@example.com"])
    assert store.load_index()
    milter = SqliteDirectory(str(db_path))
    assert milter.create_from_template(parse_address("fresh@example.com"), "default")
    clock.now += 1.0
    assert store.contains("fresh@example.com")
    assert store.load_index() and store.contains("fresh@example.com")
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("UPDATE mailboxes SET active = 0 WHERE address = 'fresh@example.com'")
    conn.close()
    clock.now += 1.0
    assert not store.contains("fresh@example.com")
    milter.close()


def test_a_read_overtaken_by_a_change_is_not_published(
    store: SqliteDirectory, db_path: Path
) -> None:
    store.bulk_add(["alice@example.com"])
    generation = store._index_generation
    keys = store._read_index()
    store.remove_mailbox("alice@example.com")  # commits after the read began
    with store._read_lock:
        assert not store._publish_index(generation, keys)
    assert store.index_size() is None
    assert not store.contains("alice@example.com")


def test_closed_store_is_unavailable_even_with_an_index(store: SqliteDirectory) -> None:
    store.bulk_add(["alice@example.com"])
    assert store.load_index()
    store.close()
    with pytest.raises(DirectoryUnavailable):
        store.contains("alice@example.com")
    assert not store.load_index()


def test_close_stops_and_waits_for_a_background_read(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's start-up check opens the store, looks up (which starts the read) and
    closes it, then forks: no reading thread may be left in the middle of SQLite."""
    store = SqliteDirectory(str(db_path))
    store.bulk_add(f"user{n}@example.com" for n in range(20_000))
    monkeypatch.setattr(sqlite, "INDEX_CHUNK_ROWS", 1)  # a read of 20,000 steps
    assert store.contains("user1@example.com")
    loader = store._loader
    assert loader is not None
    store.close()
    assert not loader.is_alive()
    assert store.index_size() is None


class CountingStatements:
    """Counts the statements a store's lookup connection runs (its trace callback)."""

    def __init__(self, store: SqliteDirectory) -> None:
        self.count = 0
        store._reader.set_trace_callback(self._seen)

    def _seen(self, statement: str) -> None:
        if statement.startswith("SELECT 1 FROM mailboxes"):  # CONTAINS_SQL
            self.count += 1


def test_every_hash_colliding_still_answers_as_sqlite(db_path: Path) -> None:
    """A hash function that maps every key to one value: every lookup is a collision with
    every key, so every answer is SQLite's, and none is wrong."""
    store = SqliteDirectory(str(db_path), compact_index=True, index_hash=lambda key: 0)
    insert_lookup_rows(db_path)
    assert store.load_index()
    extra = [("bare domain", "example.com", False), ("bare local part", "alice", False)]
    for label, key, want in [*LOOKUP_CASES, *extra]:
        assert store.contains(key) is want, label
    assert store.index_size() == sum(active for _, _, active in LOOKUP_ROWS)
    store.close()


def test_a_collision_never_makes_an_unknown_key_known(db_path: Path) -> None:
    """mallory's hash is alice's: the index cannot tell them apart, SQLite does. Two known
    keys sharing a hash are both known. A key whose hash is no key's never reaches SQLite."""
    shared = {"alice@example.com", "mallory@example.com", "carol@example.com"}

    def colliding(key: str) -> int:
        return 12345 if key in shared else hash(key)

    store = SqliteDirectory(str(db_path), compact_index=True, index_hash=colliding)
    store.bulk_add(["alice@example.com", "carol@example.com", "dave@example.com"])
    assert store.load_index()
    statements = CountingStatements(store)
    assert not store.contains("mallory@example.com")
    assert statements.count == 1  # the collision was confirmed by SQLite
    assert store.contains("alice@example.com") and store.contains("carol@example.com")
    assert statements.count == 3
    assert not store.contains("mallory@example.com")  # the cache holds SQLite's answer
    assert statements.count == 3
    assert not store.contains("nobody@example.com")  # certainly unknown: from memory
    assert statements.count == 3
    assert store.contains("dave@example.com")
    assert statements.count == 4
    store.close()


@pytest.mark.parametrize("compact", [False, True], ids=["set", "compact"])
def test_unknown_keys_and_catch_alls_are_answered_from_memory(db_path: Path, compact: bool) -> None:
    store = SqliteDirectory(str(db_path), compact_index=compact)
    insert_lookup_rows(db_path)
    assert store.load_index()
    statements = CountingStatements(store)
    active_rows = {key for _, key, active in LOOKUP_ROWS if active}
    from_memory = [c for c in LOOKUP_CASES if not c[2] or c[1] not in active_rows]
    assert len(from_memory) == 9  # every unknown key, every one a catch-all makes known
    for label, key, want in from_memory:
        assert store.contains(key) is want, label
    assert statements.count == 0
    store.close()


def test_hashed_keys_answer_every_key_of_a_large_build() -> None:
    """Buckets of every size, across build steps: each key added is MAYBE, each other
    key UNKNOWN (the hash function here is injective, so no collision blurs that)."""

    def numbered(key: str) -> int:  # distinct 64-bit values, spread over all the bits
        n = int(key.split("@")[0].removeprefix("user"))
        return (n * 0x9E3779B97F4A7C15) % (1 << 64) - (1 << 63)

    builder = HashedKeysBuilder(numbered)
    added = range(0, 100_000, 2)
    keys = [f"user{n}@example.com" for n in added]
    for start in range(0, len(keys), 4096):
        builder.add(keys[start : start + 4096])
    builder.add_catch_alls(["@catch.example"])
    steps = []
    index = builder.build(lambda: steps.append(1))
    assert len(steps) >= 2 * len(keys) // BUILD_STEP
    assert len(index) == len(keys) + 1
    assert index.nbytes() <= 8 * len(keys) + 64
    assert all(index.lookup(key) == MAYBE for key in keys)
    assert all(index.lookup(f"user{n}@example.com") == UNKNOWN for n in range(1, 100_000, 2))
    assert index.lookup("anyone@catch.example") == KNOWN
    assert index.lookup("@catch.example") == KNOWN


def test_an_empty_index_knows_nothing() -> None:
    index = HashedKeysBuilder().build(lambda: None)
    assert len(index) == 0
    assert index.lookup("alice@example.com") == UNKNOWN
    assert index.lookup("@example.com") == UNKNOWN
