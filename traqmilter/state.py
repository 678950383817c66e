"""Persistent dictionary-attack blocks: a small SQLite file, `state.sqlite` in state_dir.

The daemons keep blocks in memory (core.attack.AttackTable) and write each new one here,
so a restart does not lift them; `traqmilter blocks list|clear` reads and changes the same
file while the daemons run.

How a running daemon learns of a change made by another process (a `blocks clear`, or a
block made by the other daemon when policyd and the milter run apart): it polls changed()
every few seconds (SQLite's data_version: no table read, and its own writes do not
count) and, when it says so, calls sync_table(), which lifts in-memory blocks that are
gone from the file and restores blocks it does not have yet, keeping every client's
attempt counts. A daemon also calls sync_table() on SIGHUP. generation() is a counter
every write bumps (by trigger, so even a change made with the sqlite3 shell counts), for
tools that want a token that means the same in every process.

Times are seconds since the epoch (wall clock), as in core.attack.Block.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from traqmilter.core.attack import AttackTable, Block

STATE_FILE_NAME = "state.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE blocks ("
    " client TEXT PRIMARY KEY NOT NULL,"  # "192.0.2.1" or "2001:db8:1:2::/64" (Block.client)
    " until REAL NOT NULL,"  # seconds since the epoch
    " attempts INTEGER NOT NULL)",
    "CREATE INDEX blocks_until ON blocks (until)",
    "CREATE TABLE generation (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
    "INSERT INTO generation (id, value) VALUES (1, 0)",
    *(
        f"CREATE TRIGGER blocks_{event.lower()} AFTER {event} ON blocks"
        " BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END"
        for event in ("INSERT", "UPDATE", "DELETE")
    ),
)


class StateError(Exception):
    """The state file cannot be opened or has an unknown schema; str() says why."""


class BlockStore:
    """Blocks on disk. Thread-safe (one connection behind a lock); each call is one short
    transaction, so it is fine to call from asyncio too."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except sqlite3.Error as exc:
            raise StateError(f"{path}: cannot open: {exc}") from exc
        try:
            self._prepare()
            self._data_version = self._read_data_version()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StateError(f"{path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def in_state_dir(cls, state_dir: str) -> BlockStore:
        return cls(str(Path(state_dir) / STATE_FILE_NAME))

    def _prepare(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise StateError(f"{self.path}: not a traqmilter state file")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StateError(
                    f"{self.path}: state schema version {version} is not {SCHEMA_VERSION} "
                    "(written by another traqmilter version)"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # After the checks, so a file that is not ours is left as it was; persistent.
        conn.execute("PRAGMA journal_mode = WAL")

    def _write(self, sql: str, params: tuple[object, ...] = ()) -> int:
        with self._lock:
            try:
                return self._conn.execute(sql, params).rowcount
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: {exc}") from exc

    def save(self, block: Block) -> None:
        """Record a block (replacing an older one of the same client)."""
        self._write(
            "INSERT INTO blocks (client, until, attempts) VALUES (?, ?, ?)"
            " ON CONFLICT (client) DO UPDATE SET until = excluded.until,"
            " attempts = excluded.attempts",
            (block.client, block.until, block.attempts),
        )

    def load(self, now: float) -> list[Block]:
        """Blocks still in force at `now`, the one that ends first first."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT client, until, attempts FROM blocks WHERE until > ?"
                    " ORDER BY until, client",
                    (now,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: {exc}") from exc
        return [Block(client, float(until), int(attempts)) for client, until, attempts in rows]

    def remove(self, client: str) -> bool:
        """Lift one client's block; client as Block.client writes it. True if there was one."""
        return self._write("DELETE FROM blocks WHERE client = ?", (client,)) > 0

    def clear(self) -> int:
        """Lift every block; return how many there were (expired ones included)."""
        return self._write("DELETE FROM blocks")

    def purge(self, now: float) -> int:
        """Forget blocks that ended; returns how many."""
        return self._write("DELETE FROM blocks WHERE until <= ?", (now,))

    def generation(self) -> int:
        """A number that changes whenever any process changed the blocks."""
        with self._lock:
            try:
                return int(self._conn.execute("SELECT value FROM generation").fetchone()[0])
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: {exc}") from exc

    def _read_data_version(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def changed(self) -> bool:
        """Whether another connection (another process: the CLI, the other daemon) changed
        the file since the last call (or since opening). This store's own writes do not
        count, so a daemon is not woken by the blocks it saved itself."""
        with self._lock:
            try:
                version = self._read_data_version()
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: {exc}") from exc
            moved, self._data_version = version != self._data_version, version
        return moved

    def sync_table(self, table: AttackTable, now: float) -> None:
        """Make the in-memory blocks those of the file: lift what was cleared, restore what
        another process added. Call when generation() moved (and on SIGHUP). Blocks the
        daemon made are in the file already, since it saves each one as it makes it."""
        stored = self.load(now)
        present = {block.client for block in stored}
        for block in table.blocks(now):
            if block.client not in present:
                table.clear(block.client)
        table.restore(stored, now)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
