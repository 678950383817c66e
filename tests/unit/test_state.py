"""SqliteBlockStore: attack blocks that survive restarts and `traqmilter blocks clear`."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from traqmilter.core.attack import AttackTable, Block, client_key
from traqmilter.state import STATE_FILE_NAME, SqliteBlockStore, StateError

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
