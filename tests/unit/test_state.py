"""SqliteBlockStore: attack blocks that survive restarts and `traqmilter blocks clear`."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from traqmilter.core.attack import AttackTable, Block, client_key, recipient_token
from traqmilter.state import SCHEMA_VERSION, STATE_FILE_NAME, SqliteBlockStore, StateError

NOW = 1_767_225_600.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / STATE_FILE_NAME


@pytest.fixture
def store(path: Path) -> Iterator[SqliteBlockStore]:
    opened = SqliteBlockStore(str(path))
    yield opened
    opened.close()


def test_in_state_dir(tmp_path: Path) -> None:
    store = SqliteBlockStore.in_state_dir(str(tmp_path))
    assert store.path == str(tmp_path / "state.sqlite")
    store.close()
    conn = sqlite3.connect(tmp_path / "state.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_save_and_load(store: SqliteBlockStore) -> None:
    store.save(Block("192.0.2.1", NOW + 3600, 5))
    store.save(Block("2001:db8:1:2::/64", NOW + 60, 7))
    store.save(Block("198.51.100.9", NOW - 1, 5))  # already over
    assert store.load(NOW) == [
        Block("2001:db8:1:2::/64", NOW + 60, 7),
        Block("192.0.2.1", NOW + 3600, 5),
    ]


def test_save_replaces_the_same_client(store: SqliteBlockStore) -> None:
    store.save(Block("192.0.2.1", NOW + 60, 5))
    store.save(Block("192.0.2.1", NOW + 3600, 6))
    assert store.load(NOW) == [Block("192.0.2.1", NOW + 3600, 6)]


def test_blocks_survive_a_restart(path: Path) -> None:
    first = SqliteBlockStore(str(path))
    first.save(Block("192.0.2.1", NOW + 3600, 5))
    first.close()
    again = SqliteBlockStore(str(path))
    assert again.load(NOW) == [Block("192.0.2.1", NOW + 3600, 5)]
    again.close()


def test_remove_clear_and_purge(store: SqliteBlockStore) -> None:
    for n in range(1, 5):
        store.save(Block(f"192.0.2.{n}", NOW + 100 * (n - 2), 5))
    assert store.remove("192.0.2.4") is True
    assert store.remove("192.0.2.4") is False
    assert store.purge(NOW) == 2  # .1 and .2 ended
    assert [b.client for b in store.load(NOW)] == ["192.0.2.3"]
    assert store.clear() == 1
    assert store.load(NOW) == []


def test_generation_moves_with_every_change_by_any_process(
    store: SqliteBlockStore, path: Path
) -> None:
    other_process = SqliteBlockStore(str(path))
    seen = {store.generation()}
    changes: list[Callable[[], object]] = [
        lambda: other_process.save(Block("192.0.2.1", NOW + 60, 5)),
        lambda: other_process.save(Block("192.0.2.1", NOW + 120, 6)),
        lambda: other_process.remove("192.0.2.1"),
        lambda: store.save(Block("192.0.2.2", NOW + 60, 5)),
        lambda: other_process.clear(),
    ]
    for change in changes:
        change()
        generation = store.generation()
        assert generation not in seen
        seen.add(generation)
    before = store.generation()
    other_process.remove("192.0.2.99")  # nothing to remove: nothing changed
    assert store.generation() == before
    other_process.close()


def test_changed_reports_other_processes_writes_only(store: SqliteBlockStore, path: Path) -> None:
    assert store.changed() is False
    store.save(Block("192.0.2.1", NOW + 60, 5))
    assert store.changed() is False  # its own write
    other_process = SqliteBlockStore(str(path))
    other_process.remove("192.0.2.1")
    assert store.changed() is True
    assert store.changed() is False  # reported once
    other_process.save(Block("192.0.2.2", NOW + 60, 5))
    assert store.changed() is True
    other_process.close()


def _table() -> AttackTable:
    return AttackTable(threshold=2, window_seconds=600, block_seconds=3600)


def test_sync_table_lifts_cleared_and_restores_added_blocks(store: SqliteBlockStore) -> None:
    table = _table()
    for client in ("192.0.2.1", "192.0.2.2"):
        key = client_key(client, 64)
        assert key is not None
        for _ in range(2):  # the threshold
            assert table.record_unknown(key, NOW) is None
        block = table.record_unknown(key, NOW)
        assert block is not None
        store.save(block)
    store.remove("192.0.2.1")  # `traqmilter blocks clear 192.0.2.1` in another process
    store.save(Block("198.51.100.7", NOW + 600, 9))  # made by the other daemon

    store.sync_table(table, NOW)

    assert [b.client for b in table.blocks(NOW)] == ["198.51.100.7", "192.0.2.2"]


def test_refuses_an_unknown_schema_version(path: Path) -> None:
    SqliteBlockStore(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StateError, match="version 99"):
        SqliteBlockStore(str(path))


def test_refuses_somebody_elses_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other (x)")
    conn.close()
    with pytest.raises(StateError, match="not a traqmilter state file"):
        SqliteBlockStore(str(path))


def test_unopenable_path(tmp_path: Path) -> None:
    with pytest.raises(StateError):
        SqliteBlockStore(str(tmp_path / "missing-dir" / STATE_FILE_NAME))


def test_closed_store_raises_state_error(store: SqliteBlockStore) -> None:
    store.close()
    with pytest.raises(StateError):
        store.load(NOW)


# --------------------------------------------------------------------------- deferrals
ZED = recipient_token("zed@example.org")
V6 = client_key("ffff:ffff:ffff:ffff::1", 64)  # a key past 2**64: stored as text


def test_a_deferral_made_by_one_process_excuses_one_retry_in_another(path: Path) -> None:
    """The milter (Postfix role) records the 452; policyd, a separate process with its own
    connection, excuses the retry at once and only once."""
    milter, policyd = SqliteBlockStore(str(path)), SqliteBlockStore(str(path))
    try:
        assert V6 is not None and V6 > 2**64
        for key in (7, V6):
            milter.defer(key, ZED, NOW + 600, NOW)
            assert policyd.excuse(key, recipient_token("amy@example.org"), NOW + 1) is False
            assert policyd.excuse(key, ZED, NOW + 1) is True
            assert policyd.excuse(key, ZED, NOW + 2) is False  # used up
            milter.defer(key, ZED, NOW + 603, NOW + 3)  # again within its window: no new one
            assert policyd.excuse(key, ZED, NOW + 4) is False
        assert policyd.excuse(8, ZED, NOW + 1) is False  # another client
    finally:
        milter.close()
        policyd.close()


def test_a_deferral_ends_with_its_window_and_may_be_made_again(store: SqliteBlockStore) -> None:
    store.defer(7, ZED, NOW + 600, NOW)
    assert store.excuse(7, ZED, NOW + 600) is False  # ended
    store.defer(7, ZED, NOW + 1201, NOW + 601)
    assert store.excuse(7, ZED, NOW + 602) is True


def test_deferrals_are_bounded_and_expired_ones_removed(path: Path) -> None:
    store = SqliteBlockStore(str(path), max_deferrals=50)
    try:
        for n in range(200):
            store.defer(n, ZED, NOW + 600 + n, NOW + n)
        store.defer(1000, ZED, NOW + 5000, NOW + 4000)  # every earlier one has ended
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT client FROM deferrals").fetchall() == [("1000",)]
    conn.close()
    store = SqliteBlockStore(str(path), max_deferrals=50)
    try:
        for n in range(200):
            store.defer(n, ZED, NOW + 600 + n, NOW)
        assert store.excuse(199, ZED, NOW) is True  # the newest are kept
        assert store.excuse(0, ZED, NOW) is False  # the oldest forgotten: counted again
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM deferrals").fetchone()[0] <= 50
    conn.close()


def test_share_makes_the_file_the_tables_deferrals(store: SqliteBlockStore) -> None:
    table = _table()
    store.share(table, NOW)
    assert table.retries is store
    table.record_unknown(7, NOW, ZED)
    table.note_deferred(7, ZED, NOW)
    assert table.record_unknown(7, NOW + 1, ZED) is None
    assert table.record_unknown(7, NOW + 2) is None  # the second counted (zed once)
    assert table.record_unknown(7, NOW + 3) is not None  # the third: past threshold 2


def test_a_version_1_file_gets_the_deferrals_table_and_keeps_its_blocks(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE blocks (client TEXT PRIMARY KEY NOT NULL, until REAL NOT NULL,"
        " attempts INTEGER NOT NULL);"
        "CREATE TABLE generation (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);"
        "INSERT INTO generation (id, value) VALUES (1, 0);"
        f"INSERT INTO blocks VALUES ('192.0.2.1', {NOW + 60}, 5);"
        "PRAGMA user_version = 1;"
    )
    conn.close()
    store = SqliteBlockStore(str(path))
    try:
        assert store.load(NOW) == [Block("192.0.2.1", NOW + 60, 5)]
        store.defer(7, ZED, NOW + 600, NOW)
        assert store.excuse(7, ZED, NOW) is True
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_a_failing_file_counts_the_retry_and_says_so(
    store: SqliteBlockStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.defer(7, ZED, NOW + 600, NOW)
    store.close()
    store.defer(8, ZED, NOW + 600, NOW)  # logged, not raised: the 452 still goes out
    assert store.excuse(7, ZED, NOW) is False  # counted: the safe direction
    assert "deferred recipient not recorded" in caplog.text
    assert "deferred recipient not looked up" in caplog.text
