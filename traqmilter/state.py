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

The file also holds the recipients the milter deferred to a separate transaction (table
deferrals, core.attack.RetryExcuses): the milter writes one at each 452 4.5.3 and whoever
counts (policyd under Postfix, the milter under Sendmail) asks it when the client sends
that recipient again, at that moment and not at the next sync, since a client may retry
within a second. Rows hold a digest of the recipient, not its address, and end with the
attack window; at most MAX_DEFERRED_RETRIES are kept.

BlockStore is the interface the daemons and the CLI use; SqliteBlockStore (this file) is
the default, one host; traqmilter.state_redis.RedisBlockStore shares blocks and counts
between hosts (state.backend: redis, docs/scale-out.md). open_block_store() picks one.

The same store keeps the administrator's digest counts (DigestStore, core.digest_counts.DigestRow;
docs/notifications.md), so that a restarted milter still sends the period's digest and
hosts that share Redis send one digest for the site: the counts stay until the digest
that covers them was handed to the MTA, and one process at a time (claim_digests) sends.
The milter's digest writes move data_version too, so policyd re-reads the blocks after
them (at most every sync_seconds; a cheap read for thousands of blocks).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from traqmilter.core.attack import (
    EVICTION_BATCH_DIVISOR,
    MAX_DEFERRED_RETRIES,
    AttackTable,
    Block,
)
from traqmilter.core.digest_counts import OTHERS, DigestRow
from traqmilter.core.limits import ActionLimits
from traqmilter.core.settings import Config

log = logging.getLogger("traqmilter")

STATE_FILE_NAME = "state.sqlite"
SCHEMA_VERSION = 3

# Version 2 added deferrals; a version 1 file gets the table (its blocks are kept).
_DEFERRALS_SCHEMA = (
    "CREATE TABLE deferrals ("
    " client TEXT NOT NULL,"  # core.attack counting key, as decimal text
    " recipient TEXT NOT NULL,"  # core.attack.recipient_token
    " until REAL NOT NULL,"
    " used INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (client, recipient)) WITHOUT ROWID",
    "CREATE INDEX deferrals_until ON deferrals (until)",
)

# Version 3 added the digest counts (docs/notifications.md).
_DIGEST_SCHEMA = (
    "CREATE TABLE digest ("
    " period INTEGER NOT NULL,"  # the period's start, seconds since the epoch
    " notify TEXT NOT NULL,"
    " domain TEXT NOT NULL,"
    " list TEXT NOT NULL,"  # core.digest_counts.LISTS, or DROPPED
    " key TEXT NOT NULL,"  # core.digest_counts.OTHERS: the count beyond max_tracked keys
    " count INTEGER NOT NULL,"
    " expires REAL NOT NULL,"  # forgotten then, even if never sent
    " PRIMARY KEY (period, notify, domain, list, key)) WITHOUT ROWID",
    "CREATE TABLE digest_claim ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL, until REAL NOT NULL)",
)

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
    *_DEFERRALS_SCHEMA,
    *_DIGEST_SCHEMA,
)
_UPGRADES = (_DEFERRALS_SCHEMA, _DIGEST_SCHEMA)  # what versions 2 and 3 added, in order


class StateError(Exception):
    """The state file cannot be opened or has an unknown schema; str() says why."""


class DigestStore(Protocol):
    """Where the digest counts wait until their digest was handed over (thread-safe; the
    milter's digest thread calls it, never a session thread). Each call raises StateError
    when the backend fails."""

    def add_digest(self, rows: Sequence[DigestRow], *, max_tracked: int, expires: float) -> None:
        """Add the counts up, at most max_tracked distinct keys per period, notify, domain
        and list (a key beyond them is added to the list's OTHERS count); forget them
        at `expires` (seconds since the epoch) if no digest took them by then."""
        ...

    def pending_digests(self, before: int, now: float) -> list[DigestRow]:
        """Every count of the periods that started before `before` (not yet sent)."""
        ...

    def remove_digest(self, notify: str, periods: Sequence[int]) -> None:
        """Forget what the digest to `notify` covering `periods` said (it was handed over)."""
        ...

    def claim_digests(self, holder: str, seconds: float, now: float) -> bool:
        """Whether `holder` may send the digests now: no other holder has claimed them in
        the last `seconds` (the claim ends then by itself, or at release_digests())."""
        ...

    def release_digests(self, holder: str) -> None: ...


class BlockStore(DigestStore, Protocol):
    """Where a daemon's blocks outlive it and meet other processes' (and hosts'). Every
    method is thread-safe; save() is called on the decision path and must not wait long."""

    backend: str  # "sqlite" or "redis": the metrics label and what `check` names
    sync_seconds: float  # how often a daemon calls follow()
    last_sync: float  # when the last follow() that worked started (0: none yet)

    @property
    def up(self) -> bool:
        """Whether the last exchange with the backend worked (metric state_backend_up)."""
        ...

    def share(self, table: AttackTable, now: float) -> None:
        """Start following `table`: load the stored blocks into it (a daemon's start)."""
        ...

    def follow(
        self, table: AttackTable, now: float, guard: AbstractContextManager[object] | None = None
    ) -> bool:
        """Bring `table` and the store together (every sync_seconds); `table` is touched
        only inside `guard` (a lock the table's users hold). Whether it changed `table`."""
        ...

    def share_limits(self, limits: ActionLimits) -> None:
        """Share the milter's bounce and create rates too (a no-op for one host)."""
        ...

    def check(self) -> None:
        """Raise StateError when the backend cannot be used now (`traqmilter check`)."""
        ...

    def save(self, block: Block) -> None: ...

    def load(self, now: float) -> list[Block]: ...

    def remove(self, client: str) -> bool: ...

    def clear(self) -> int: ...

    def close(self) -> None: ...


def open_block_store(config: Config) -> BlockStore:
    """The store `state.backend` names (redis is imported only when used)."""
    if config.state.backend == "redis":
        from traqmilter.state_redis import RedisBlockStore

        return RedisBlockStore(config.state, config.dictionary_attack.max_clients)
    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    return SqliteBlockStore.in_state_dir(config.state_dir)


class SqliteBlockStore:
    """Blocks on disk. Thread-safe (one connection behind a lock); each call is one short
    transaction, so it is fine to call from asyncio too."""

    backend = "sqlite"
    sync_seconds = 5.0  # how soon `traqmilter blocks clear` reaches a running daemon
    up = True  # a file that opened stays usable; a failing write raises StateError
    last_sync = 0.0

    def __init__(self, path: str, max_deferrals: int = MAX_DEFERRED_RETRIES) -> None:
        self.path = path
        self.max_deferrals = max_deferrals
        self._deferrals_check_every = max(1, max_deferrals // EVICTION_BATCH_DIVISOR)
        self._deferrals_unchecked = 0
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
    def in_state_dir(cls, state_dir: str) -> SqliteBlockStore:
        return cls(str(Path(state_dir) / STATE_FILE_NAME))

    def _prepare(self) -> None:
        with self._transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise StateError(f"{self.path}: not a traqmilter state file")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif 0 < version < SCHEMA_VERSION:  # an older file: add what came since
                for statement in (sql for step in _UPGRADES[version - 1 :] for sql in step):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StateError(
                    f"{self.path}: state schema version {version} is not {SCHEMA_VERSION} "
                    "(written by another traqmilter version)"
                )
        # After the checks, so a file that is not ours is left as it was; persistent.
        self._conn.execute("PRAGMA journal_mode = WAL")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock (BEGIN IMMEDIATE: the writers of other
        processes wait for it); rolled back when anything in it raises."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

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

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: {exc}") from exc

    def load(self, now: float) -> list[Block]:
        """Blocks still in force at `now`, the one that ends first first."""
        rows = self._read(
            "SELECT client, until, attempts FROM blocks WHERE until > ? ORDER BY until, client",
            (now,),
        )
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

    def share(self, table: AttackTable, now: float) -> None:
        table.restore(self.load(now), now)
        table.retries = self  # deferrals in the file: the other daemon's are seen at once

    def defer(self, key: int, recipient: str, until: float, now: float) -> None:
        """RetryExcuses.defer, in the file (a failure is logged: the retry then counts)."""
        try:
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO deferrals (client, recipient, until) VALUES (?, ?, ?)"
                    " ON CONFLICT (client, recipient) DO UPDATE SET"
                    " until = excluded.until, used = 0 WHERE deferrals.until <= ?",
                    (str(key), recipient, until, now),
                )
                conn.execute("DELETE FROM deferrals WHERE until <= ?", (now,))
                self._deferrals_unchecked += 1
                if self._deferrals_unchecked >= self._deferrals_check_every:
                    # The bound: those that end first go. It walks the index up to the
                    # bound, so it runs once per 1% of it (the bound is then + 1%).
                    self._deferrals_unchecked = 0
                    conn.execute(
                        "DELETE FROM deferrals WHERE until < (SELECT until FROM deferrals"
                        " ORDER BY until DESC LIMIT 1 OFFSET ?)",
                        (self.max_deferrals - 1,),
                    )
        except sqlite3.Error as exc:
            log.warning("state: %s: deferred recipient not recorded: %s", self.path, exc)

    def excuse(self, key: int, recipient: str, now: float) -> bool:
        """RetryExcuses.excuse, in the file (a failure is logged and the attempt counts).
        Most attempts are no retry: they only read, and take no write lock."""
        params = (str(key), recipient, now)
        with self._lock:
            try:
                found = self._conn.execute(
                    "SELECT 1 FROM deferrals"
                    " WHERE client = ? AND recipient = ? AND used = 0 AND until > ?",
                    params,
                ).fetchone()
                return found is not None and (
                    self._conn.execute(
                        "UPDATE deferrals SET used = 1"
                        " WHERE client = ? AND recipient = ? AND used = 0 AND until > ?",
                        params,
                    ).rowcount
                    > 0
                )
            except sqlite3.Error as exc:
                log.warning("state: %s: deferred recipient not looked up: %s", self.path, exc)
                return False

    def follow(
        self, table: AttackTable, now: float, guard: AbstractContextManager[object] | None = None
    ) -> bool:
        """Bring `table` up to the file when another process changed it (changed(), then
        sync_table()), inside `guard`; return whether it did."""
        started = time.time()
        changed = self.changed()
        if changed:
            with guard or contextlib.nullcontext():
                self.sync_table(table, now)
        self.last_sync = started
        return changed

    def share_limits(self, limits: ActionLimits) -> None:
        pass  # one host: the milter's own counts are the whole truth

    # --- the digest counts (DigestStore)

    def add_digest(self, rows: Sequence[DigestRow], *, max_tracked: int, expires: float) -> None:
        """One transaction for the batch. A new key is counted by name while its list
        (period, notify, domain, list) names fewer than max_tracked keys, else as OTHERS."""
        bump = (
            "INSERT INTO digest (period, notify, domain, list, key, count, expires)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " count = count + excluded.count, expires = max(expires, excluded.expires)"
        )
        try:
            with self._transaction() as conn:
                for row in rows:
                    where = (row.period, row.notify, row.domain, row.list, row.key)
                    if row.key != OTHERS:
                        if conn.execute(
                            "UPDATE digest SET count = count + ?, expires = max(expires, ?)"
                            " WHERE period = ? AND notify = ? AND domain = ? AND list = ?"
                            " AND key = ?",
                            (row.count, expires, *where),
                        ).rowcount:
                            continue
                        named = conn.execute(
                            "SELECT count(*) FROM digest WHERE period = ? AND notify = ?"
                            " AND domain = ? AND list = ? AND key != ?",
                            (*where[:4], OTHERS),
                        ).fetchone()[0]
                        if named >= max_tracked:  # counted, not named
                            where = (*where[:4], OTHERS)
                    conn.execute(bump, (*where, row.count, expires))
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from exc

    def pending_digests(self, before: int, now: float) -> list[DigestRow]:
        self._write("DELETE FROM digest WHERE expires <= ?", (now,))
        rows = self._read(
            "SELECT period, notify, domain, list, key, count FROM digest"
            " WHERE period < ? ORDER BY period, notify, domain, list, key",
            (before,),
        )
        return [DigestRow(*row) for row in rows]

    def remove_digest(self, notify: str, periods: Sequence[int]) -> None:
        with self._lock:
            try:
                self._conn.executemany(
                    "DELETE FROM digest WHERE period = ? AND notify = ?",
                    [(period, notify) for period in periods],
                )
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: {exc}") from exc

    def claim_digests(self, holder: str, seconds: float, now: float) -> bool:
        return (
            self._write(
                "INSERT INTO digest_claim (id, holder, until) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, until = excluded.until"
                " WHERE until <= ? OR holder = excluded.holder",
                (holder, now + seconds, now),
            )
            > 0
        )

    def release_digests(self, holder: str) -> None:
        self._write("DELETE FROM digest_claim WHERE holder = ?", (holder,))

    def check(self) -> None:
        self.generation()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
