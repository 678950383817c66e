"""The SQLite store's memory index: the same answers as SQLite, and never staler than the
change check (lookup_cache_seconds) after `traqmilter mailbox add`, the create action or
any other writer."""

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


def test_index_answers_every_case_as_sqlite_does(store: SqliteDirectory, db_path: Path) -> None:
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
