"""The SQLite recipient directory: mailboxes, aliases and local domains in one file.

One source of truth for traqmilter and Postfix: the schema (docs/directory.md) is what
Postfix's sqlite: maps query for delivery, and what SqliteDirectory.contains() answers from.

Concurrency: the file is in WAL mode, so readers (the daemons, Postfix) never block the
writer (`traqmilter mailbox`, the `create` action) and the writer never blocks them. Each
SqliteDirectory holds two connections: one for lookups, one for writes, each behind its
own lock. Measured (bench/directory_bench.py, 1,000,000 mailboxes, 2 cores): a lookup
that misses the cache takes 9 us for a known address (p99 12 us), 5.5 us for an unknown
one; one connection behind a lock serves 110,000 lookups/s from one thread and 78,000/s
from four, a connection per thread 110,000/s and 157,000/s, but opening one costs 130 us,
and libmilter starts a thread per SMTP session. Both adapters serialise Engine calls
anyway (the engine is not thread-safe), so the lock adds no contention there: one
connection it is.

Administration (the mailbox, alias and domain methods, and their checks) is shared with
the PostgreSQL store: store.py.

Memory index: contains() answers from an index of every active mailbox and alias key,
read from the file in one pass (keyindex.py): by default a set of the keys, so a lookup is
a set probe (0.3 us) instead of a statement (6-9 us), at about 117 bytes a key; with
compact_index (config directory.sqlite_compact_index), the hashes of the keys, about 8
bytes a key, which answer an unknown key as fast but send a key whose hash is there to
SQLite (through the lookup cache) to confirm, so a hash collision costs a statement, never
a wrong answer, and a known recipient costs a statement the first time it is seen.
The index is a snapshot: any change to the file makes it stale, and
a stale index is never consulted. Changes by another process (`traqmilter mailbox`, the
milter's `create`) are noticed through `PRAGMA data_version` on the reader connection,
checked at most every lookup_cache_seconds (default 1 s) by the lookup that finds the
interval over; writes through this object drop the index at once. That check is the
staleness bound of a lookup: a mailbox another process adds may be refused for up to that
long, never longer. While the index is stale or not yet read, lookups ask SQLite as below,
so they stay exact; it is re-read in a background thread (one read transaction, a chunk of
rows at a time, and the compact index's sort in steps, so the thread never holds the GIL
for long), first by the first lookup, later by the check that saw a change, and at most
once per LOAD_BACKOFF times the last read's duration, so a store written every second
costs a bounded share of a core. A read that began before a change is thrown away.
Measured (1,000,000 mailboxes, bench/directory_bench.py): the set is read in about 0.8 s
and holds 117 MB, the compact index 1.5 s and 8 MB; memory_index=False (config
directory.sqlite_memory_index) keeps only the cache.

Lookup cache (when the set is stale, not yet read, or turned off): contains() remembers up
to LOOKUP_CACHE_ENTRIES answers (by default), emptied at the same moments as the set.
When the cache is full its oldest sixteenth is forgotten, so a harvester's many unknown
addresses cost memory only up to the bound (about 10 MB) and evict answers only until
they are looked up again.

BUGS: list_mailboxes(domain=...) scans the primary-key index (the schema has no index on
`domain`, to keep it exactly what Postfix needs); with a million rows that takes a few
hundred milliseconds, which an administrator's listing can afford.

BUGS: about 2.5 us of every uncached lookup is the read transaction SQLite opens and closes
around the statement (three system calls). Holding one open between lookups would save
that, but would hide other processes' writes and keep checkpoints from emptying the WAL
while the daemon is idle. PRAGMA mmap_size would save about 1.4 us on a known mailbox,
but a disk error would then kill the process with SIGBUS instead of raising
DirectoryUnavailable; a larger cache_size helps only stores that fit in it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any, ClassVar

from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.directory.store import (
    INSERT_NEW_MAILBOX,
    LOOKUP_CACHE_ENTRIES,
    DirectoryError,
    MailboxStore,
    SchemaVersionError,
    Transaction,
)
from traqmilter.keyindex import (
    KNOWN,
    MAYBE,
    HashedKeys,
    HashedKeysBuilder,
    KeySet,
    KeySetBuilder,
)

log = logging.getLogger("traqmilter.directory")

SCHEMA_VERSION = 1
DATABASE_MODE = 0o660

# Exactly the schema of docs/directory.md; Postfix's sqlite: maps depend on these names.
# traqmilter/data/postgresql/ writes the same tables again as migrations, which are history
# (never edited once applied) where this is today's schema: a test holds the two alike.
SCHEMA_SQL = """
CREATE TABLE domains (
  name TEXT PRIMARY KEY NOT NULL
);
CREATE TABLE mailboxes (
  address     TEXT PRIMARY KEY NOT NULL,
  local_part  TEXT NOT NULL,
  domain      TEXT NOT NULL,
  maildir     TEXT NOT NULL,
  quota_bytes INTEGER NOT NULL DEFAULT 0,
  active      INTEGER NOT NULL DEFAULT 1,
  settings    TEXT NOT NULL DEFAULT '{}',
  created_by  TEXT NOT NULL DEFAULT 'admin',
  created_at  TEXT NOT NULL
);
CREATE TABLE aliases (
  address TEXT PRIMARY KEY NOT NULL,
  target  TEXT NOT NULL,
  active  INTEGER NOT NULL DEFAULT 1,
  created_by TEXT NOT NULL DEFAULT 'admin'
);
"""

# Known: an active mailbox or alias row for the key (?1), or for "@domain" (?2, a catch-all,
# which Postfix's virtual(5) and virtual(8) lookups also try). A row comes back if known,
# none if not. LIMIT 1 ends the statement at the first row found, so the probes run in
# order of how often they hit: a known mailbox costs one primary-key probe, an unknown
# key four (on the indexes only). Measured (the statement alone, 100,000 mailboxes)
# against two EXISTS() ORed together, which always run all four: 6.7 instead of 11 us on
# a known mailbox, 5-5.2 instead of 8.3-9 on an alias, a catch-all or an unknown key.
CONTAINS_SQL = (
    "SELECT 1 FROM mailboxes WHERE address = ?1 AND active = 1"
    " UNION ALL SELECT 1 FROM aliases WHERE address = ?1 AND active = 1"
    " UNION ALL SELECT 1 FROM aliases WHERE address = ?2 AND active = 1"
    " UNION ALL SELECT 1 FROM mailboxes WHERE address = ?2 AND active = 1"
    " LIMIT 1"
)
DEFAULT_LOOKUP_CACHE_SECONDS = 1.0
# The memory index holds exactly the keys CONTAINS_SQL finds a row for: their hashes, and
# the catch-alls ("@domain": the keys from "@" up to "A", a range of the primary keys) as
# they are.
INDEX_SQL = (
    "SELECT address FROM mailboxes WHERE active = 1 AND (address < '@' OR address >= 'A')",
    "SELECT address FROM aliases WHERE active = 1 AND (address < '@' OR address >= 'A')",
)
CATCH_ALL_SQL = (
    "SELECT address FROM mailboxes WHERE address >= '@' AND address < 'A' AND active = 1"
    " UNION ALL"
    " SELECT address FROM aliases WHERE address >= '@' AND address < 'A' AND active = 1"
)
INDEX_CHUNK_ROWS = 4096  # rows per fetch: about 1 ms of the GIL between releases
# A read of the memory index waits at least this many times the previous read's duration.
LOAD_BACKOFF = 4.0


class SqliteDirectory(MailboxStore):
    """The writable directory store. Thread-safe; contains() is also safe to call from asyncio
    (a bounded, microsecond-scale blocking call)."""

    kind: ClassVar[str] = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        create: bool = True,
        fold_case: bool = True,
        wall_clock: Callable[[], float] = time.time,
        lookup_cache_seconds: float = DEFAULT_LOOKUP_CACHE_SECONDS,
        lookup_cache_entries: int = LOOKUP_CACHE_ENTRIES,
        monotonic_clock: Callable[[], float] = time.monotonic,
        memory_index: bool = True,
        compact_index: bool = False,
        index_hash: Callable[[str], int] | None = None,
    ) -> None:
        """Open (and with create=True, initialise) the directory at path.

        fold_case: how administrators' string keys are normalised (not contains(): the
        engine hands it keys already normalised). lookup_cache_seconds: how long contains()
        may answer from its cache before it checks for other processes' writes (0: before
        every lookup); lookup_cache_entries: how many answers it keeps (at least 16).
        memory_index: answer lookups from an index of all keys once it is read (see above);
        compact_index: that index holds hashes, not the keys; index_hash: their hash
        function (None: hash(); tests make keys collide).
        Raises DirectoryError.
        """
        if lookup_cache_seconds < 0 or lookup_cache_entries < 16:
            raise ValueError("lookup_cache_seconds >= 0 and lookup_cache_entries >= 16")
        self.path = path
        self.fold_case = fold_case
        self._wall_clock = wall_clock
        self._monotonic = monotonic_clock
        self._lookup_cache_seconds = lookup_cache_seconds
        self._lookup_cache_entries = lookup_cache_entries
        self._lookup_cache: dict[str, bool] = {}  # guarded by _read_lock
        self._data_version: int | None = None
        self._next_version_check = float("-inf")
        self._memory_index = memory_index
        self._compact_index = compact_index
        self._index_hash = index_hash
        # The memory index: None while stale or not read. A published index is immutable,
        # so lookups read it without a lock. The fields below are guarded by _read_lock.
        self._index: KeySet | HashedKeys | None = None
        self._index_generation = 0  # bumped by every change seen; older reads are dropped
        self._loader: threading.Thread | None = None  # the background read, while it runs
        self._next_index_load = float("-inf")
        self._closed = False
        if not create and not Path(path).exists():
            raise DirectoryError(f"{path}: no such directory database")
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        is_new = not Path(path).exists()
        self._writer = self._connect(busy_timeout_ms=5000)
        try:
            self._prepare_schema(create)
            if is_new:
                # Postfix reads this file as another user: it (and the -wal and -shm files,
                # which SQLite creates with the same mode) must be group-writable, see
                # docs/directory.md. Others get nothing: it lists every address.
                Path(path).chmod(DATABASE_MODE)
            # A lookup that waits longer than this is better answered with a tempfail.
            self._reader = self._connect(busy_timeout_ms=250)
            self._reader.execute("PRAGMA query_only = 1")
            # Kept for contains(): saves creating a cursor per lookup. CONTAINS_SQL yields at
            # most one row, so fetchone() steps it to its end and SQLite resets it: no read
            # transaction stays open between lookups (which would hide other processes'
            # writes and hold back WAL checkpoints).
            self._lookup_cursor = self._reader.cursor()
            # The baseline of the change check: an index read after this point is current
            # until data_version moves.
            self._data_version = self._reader.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error as exc:
            self._writer.close()
            raise DirectoryError(f"{path}: cannot open: {exc}") from exc
        except BaseException:
            self._writer.close()
            raise

    def _connect(self, *, busy_timeout_ms: int) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
                check_same_thread=False,  # guarded by our locks
                timeout=busy_timeout_ms / 1000,
                cached_statements=64,
            )
        except sqlite3.Error as exc:
            raise DirectoryError(f"{self.path}: cannot open: {exc}") from exc
        return conn

    def _prepare_schema(self, create: bool) -> None:
        conn = self._writer
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if not create:
                    raise DirectoryError(f"{self.path}: not an initialised traqmilter directory")
                conn.execute("PRAGMA journal_mode = WAL")  # persistent; not inside a transaction
                with self._transaction():
                    # Re-read inside the write lock: another process may have just created it.
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                    if version == 0 and tables:
                        raise DirectoryError(
                            f"{self.path}: holds tables but no traqmilter schema version; "
                            "refusing to touch a database traqmilter did not create"
                        )
                    if version == 0:
                        for statement in SCHEMA_SQL.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                        version = SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path}: schema version {version} was written by a newer traqmilter; "
                    f"this one knows version {SCHEMA_VERSION} (upgrade traqmilter)"
                )
            if version != SCHEMA_VERSION:
                raise SchemaVersionError(f"{self.path}: unknown schema version {version}")
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            raise DirectoryError(f"{self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the writer connection; callers serialise through
        _write_lock (the constructor has the connection to itself)."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also after a failed COMMIT, or the next BEGIN fails
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """Serialise writers of this instance; map SQLite failures to DirectoryError."""
        with self._write_lock:
            try:
                with self._transaction() as conn:
                    yield conn
            except sqlite3.Error as exc:
                raise DirectoryError(f"{self.path}: {exc}") from exc
            finally:
                # Under the read lock, so that no lookup or index read that began before
                # the commit can store its answer after this.
                with self._read_lock:
                    self._forget_answers()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise DirectoryError(f"{self.path}: {exc}") from exc

    # --- the Directory protocol -------------------------------------------------------

    def contains(self, key: str) -> bool:
        if self._monotonic() >= self._next_version_check:
            self._check_for_changes()
        index = self._index
        if index is not None:
            found = index.lookup(key)
            if found != MAYBE:
                return found == KNOWN
            # (compact index) Its hash is a known key's: SQLite (or the cache) tells whether
            # it is that key.
        return self._contains_from_sqlite(key)

    def _contains_from_sqlite(self, key: str) -> bool:
        """contains() from SQLite, through the lookup cache."""
        with self._read_lock:
            cache = self._lookup_cache
            try:
                known = cache.get(key)
                if known is not None:
                    return known
                domain_at = key.rfind("@")
                catch_all = key[domain_at:] if domain_at >= 0 else key
                row = self._lookup_cursor.execute(CONTAINS_SQL, (key, catch_all)).fetchone()
            except sqlite3.Error as exc:
                raise DirectoryUnavailable(f"{self.path}: {exc}") from exc
            known = row is not None
            if len(cache) >= self._lookup_cache_entries:
                # Forget the oldest 1/16 in one batch (one at a time would walk the slots
                # of deleted entries again on every insert).
                for old in list(islice(cache, self._lookup_cache_entries // 16)):
                    del cache[old]
            cache[key] = known
            return known

    def _check_for_changes(self) -> None:
        """The periodic check: forget what another connection's commit made stale, and
        start reading the memory index when it is due."""
        with self._read_lock:
            now = self._monotonic()
            if now < self._next_version_check:
                return  # another thread has just checked
            try:
                self._check_data_version(now)
            except sqlite3.Error as exc:
                raise DirectoryUnavailable(f"{self.path}: {exc}") from exc
            if (
                self._memory_index
                and self._index is None
                and self._loader is None
                and not self._closed
                and now >= self._next_index_load
            ):
                self._loader = threading.Thread(
                    target=self._load_index,
                    args=(self._index_generation,),
                    name="traqmilter-directory-index",
                    daemon=True,
                )
                self._loader.start()

    def _check_data_version(self, now: float) -> None:
        """Forget cached answers and the index if another connection has committed since
        the last check (PRAGMA data_version changes then). Called with _read_lock held."""
        version = self._reader.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._forget_answers()
            self._data_version = version
        self._next_version_check = now + self._lookup_cache_seconds

    def _forget_answers(self) -> None:
        """The store changed: drop every remembered answer. Called with _read_lock held."""
        self._lookup_cache.clear()
        self._index = None
        self._index_generation += 1

    def load_index(self) -> bool:
        """Read the memory index now, in this thread; return whether it was published (not
        when a change overtook the read). Lookups do this by themselves in the background;
        this is for tests and benchmarks that need it ready. Raises DirectoryError."""
        with self._read_lock:
            if self._closed or not self._memory_index:
                return False
            try:  # take in what changed so far, or the next check would drop this read
                self._check_data_version(self._monotonic())
            except sqlite3.Error as exc:
                raise DirectoryError(f"{self.path}: {exc}") from exc
            generation = self._index_generation
        keys = self._read_index()
        with self._read_lock:
            return self._publish_index(generation, keys)

    def index_size(self) -> int | None:
        """How many keys the memory index holds (a key active as a mailbox and as an alias
        counts twice); None while it is stale or not read."""
        index = self._index
        return None if index is None else len(index)

    def _load_index(self, generation: int) -> None:
        """The background read of the memory index: failures only log, since lookups go on
        asking SQLite (which then says whether the store can answer)."""
        started = time.monotonic()
        keys: KeySet | HashedKeys | None = None
        try:
            keys = self._read_index()
        except DirectoryError as exc:
            if not self._closed:
                log.warning("directory index not read (lookups ask SQLite): %s", exc)
        with self._read_lock:
            self._loader = None
            self._next_index_load = self._monotonic() + LOAD_BACKOFF * (time.monotonic() - started)
            if keys is not None:
                self._publish_index(generation, keys)

    def _read_index(self) -> KeySet | HashedKeys:
        """The index of every key CONTAINS_SQL finds, read in one transaction on a connection
        of its own (lookups go on meanwhile)."""
        conn = self._connect(busy_timeout_ms=5000)
        first = itemgetter(0)
        builder = HashedKeysBuilder(self._index_hash) if self._compact_index else KeySetBuilder()
        try:
            conn.execute("PRAGMA query_only = 1")
            conn.execute("BEGIN")  # both tables from one snapshot
            for sql in INDEX_SQL:
                cursor = conn.execute(sql)
                while rows := cursor.fetchmany(INDEX_CHUNK_ROWS):
                    self._stop_reading_if_closed()
                    builder.add(map(first, rows))
            builder.add_catch_alls(map(first, conn.execute(CATCH_ALL_SQL)))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise DirectoryError(f"{self.path}: reading the index: {exc}") from exc
        finally:
            conn.close()
        return builder.build(self._stop_reading_if_closed)

    def _stop_reading_if_closed(self) -> None:
        if self._closed:  # close() waits for the reading thread: stop now
            raise DirectoryError(f"{self.path}: closed while reading the index")

    def _publish_index(self, generation: int, keys: KeySet | HashedKeys) -> bool:
        """Called with _read_lock held."""
        if generation != self._index_generation or self._closed:
            return False  # the store changed (or closed) since the read began
        self._index = keys
        return True

    def close(self) -> None:
        """Close both connections and wait for a background read of the index to stop (a
        chunk at most): none may run on when a daemon forks after its start-up check."""
        with self._read_lock:
            self._closed = True
            self._index = None
            self._reader.close()
            loader = self._loader
        if loader is not None and loader is not threading.current_thread():
            loader.join()
        with self._write_lock:
            self._writer.close()

    # --- the backend of MailboxStore's administration ---------------------------------

    def _serialise_admin(self, tx: Transaction) -> None:
        """Nothing to wait for: BEGIN IMMEDIATE has already excluded every other writer."""

    def _insert_rows(self, rows: Iterator[tuple[Any, ...]]) -> int:
        with self._writing() as conn:
            before = conn.total_changes
            conn.executemany(INSERT_NEW_MAILBOX, rows)
            return conn.total_changes - before
