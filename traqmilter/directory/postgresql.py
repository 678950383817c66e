"""The recipient directory on PostgreSQL: the SQLite store's schema on a server that every
MX host shares, so a mailbox added (or made by `create`) on one host exists on all of them.

Same contract as SqliteDirectory (traqmilter/directory/sqlite.py): the same tables and
columns (traqmilter/data/postgresql/*.sql, applied by `traqmilter directory init`), the
same administration (written once, in store.py), the same answers. Postfix reads the
tables through pgsql: maps (contrib/postfix/pgsql-*.cf).

Failure semantics: a lookup that fails or does not finish within `timeout` raises
DirectoryUnavailable (the engine's lookup_failed rule: 451, the sender retries); it never
answers "unknown". The deadline is ours, not the server's: the statement is sent on
libpq's non-blocking interface and its socket polled until the deadline, so a hung
server, a lost network or a lock held by someone else costs at most `timeout`. The
connection of a lookup that timed out is closed (the pool replaces it). While the server
is known to be down, lookups wait only FAST_FAIL_SECONDS for a connection, so a policy
daemon answering many requests is not held `timeout` by each of them.

Lookup cache and invalidation: contains() remembers up to LOOKUP_CACHE_ENTRIES answers,
known and unknown. A listener thread holds one more connection with LISTEN
traqmilter_directory; the schema's triggers NOTIFY on every committed change to mailboxes
and aliases, by anyone, and each notification empties the cache. So the staleness of a
cached answer is the delivery time of a notification (milliseconds), not a TTL. While the
listener is not connected (server down, restarting, unreachable) the cache is not used at
all, and it is emptied when the listener connects again: an answer is then never older
than the last moment the listener knew of every change. A lookup that was already running
when a notification arrived does not store its answer (a generation counter).
The listener checks its connection every PROBE_SECONDS with a query under the same
deadline, so a server that stops answering disables the cache within that time.

Connections: a psycopg_pool pool (MIN_POOL_SIZE..MAX_POOL_SIZE) for lookups and writes, plus
the listener's. Both daemons serialise engine calls, so one connection serves lookups;
the others serve `create` and the administration commands.

SECURITY: every statement is parameterised. The password comes from the conninfo, libpq's
passfile / PGPASSFILE, or `password_file` (read once, never logged); conninfo text is
never logged with its password (errors name host, port and database only).

BUGS: with many hosts, every host's cache is emptied by every change anywhere; a site that
creates mailboxes all the time sees more misses (each one 0.1-0.3 ms on a LAN), never
wrong answers.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any, ClassVar, NoReturn

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.directory.stats import LookupStats
from traqmilter.directory.store import (
    LOOKUP_CACHE_ENTRIES,
    MAILBOX_COLUMNS,
    DirectoryError,
    MailboxStore,
    SchemaVersionError,
    Transaction,
)

log = logging.getLogger("traqmilter.directory")

NOTIFY_CHANNEL = "traqmilter_directory"
DEFAULT_TIMEOUT_SECONDS = 1.0
FAST_FAIL_SECONDS = 0.05
PROBE_SECONDS = 2.0
LISTEN_POLL_SECONDS = 0.5
RECONNECT_SECONDS = 1.0
MIN_POOL_SIZE = 1
MAX_POOL_SIZE = 4
BACKEND = "postgresql"

# The SQLite store's lookup, in PostgreSQL's parameter syntax: the same four probes in the
# same order, ended by the first row found.
CONTAINS_SQL = (
    b"SELECT 1 FROM mailboxes WHERE address = $1 AND active = 1"
    b" UNION ALL SELECT 1 FROM aliases WHERE address = $1 AND active = 1"
    b" UNION ALL SELECT 1 FROM aliases WHERE address = $2 AND active = 1"
    b" UNION ALL SELECT 1 FROM mailboxes WHERE address = $2 AND active = 1"
    b" LIMIT 1"
)
_CONTAINS_STATEMENT = b"traqmilter_contains"
_TABLES = ("domains", "mailboxes", "aliases")
# Serialises migrations and domain syncs of every host (pg_advisory_xact_lock keys).
_MIGRATE_LOCK = 0x7472_6171_0001
_SYNC_LOCK = 0x7472_6171_0002


class _Timeout(Exception):
    pass


def _paramstyle(sql: str) -> str:
    """A statement of MailboxStore (`?` placeholders) in psycopg's paramstyle."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Transaction:
    """MailboxStore's Transaction on a psycopg cursor."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        return self.cursor.execute(_paramstyle(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> None:
        self.cursor.executemany(_paramstyle(sql), rows)


def migrations() -> list[tuple[int, str, str]]:
    """The shipped schema migrations: (version, file name, SQL), in order."""
    folder = importlib.resources.files("traqmilter") / "data" / "postgresql"
    found = []
    for entry in folder.iterdir():
        number = entry.name.partition("-")[0]
        if entry.name.endswith(".sql") and number.isdigit():
            found.append((int(number), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


SCHEMA_VERSION = migrations()[-1][0]


def describe(conninfo: str) -> str:
    """host:port/dbname of a conninfo, for messages (never its password)."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "postgresql (unparsable conninfo)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    return f"postgresql://{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


def connection_kwargs(conninfo: str, password_file: str, timeout: float) -> dict[str, Any]:
    """libpq parameters added to the administrator's conninfo. Raises DirectoryError."""
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise DirectoryError(f"directory.postgresql: not a conninfo: {exc}") from None
    kwargs: dict[str, Any] = {"client_encoding": "UTF8"}
    if "connect_timeout" not in given:
        kwargs["connect_timeout"] = max(2, round(timeout))  # libpq's minimum is 2 s
    if "application_name" not in given:
        kwargs["application_name"] = "traqmilter"
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as handle:
                kwargs["password"] = handle.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise DirectoryError(f"directory.postgresql_password_file: {exc}") from None
    return kwargs


def migrate(conninfo: str, *, password_file: str = "", timeout: float = 30.0) -> list[str]:
    """Bring the database to SCHEMA_VERSION; return the migration files applied (none when
    it is current). Safe to run from several hosts at once. Raises DirectoryError."""
    where = describe(conninfo)
    kwargs = connection_kwargs(conninfo, password_file, timeout)
    applied: list[str] = []
    try:
        with psycopg.connect(conninfo, **kwargs) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            version = _schema_version(conn)
            if version is None:
                present = conn.execute(
                    "SELECT count(*) FROM pg_catalog.pg_tables WHERE tablename = ANY(%s)"
                    " AND schemaname = current_schema()",
                    (list(_TABLES),),
                ).fetchone()
                if present and present[0]:
                    raise DirectoryError(
                        f"{where}: holds directory tables but no traqmilter_schema; "
                        "refusing to touch a database traqmilter did not create"
                    )
                conn.execute("CREATE TABLE traqmilter_schema (version INTEGER NOT NULL)")
                version = 0
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(_newer(where, version))
            for number, name, text in migrations():
                if number > version:
                    conn.execute(text.encode())
                    conn.execute("INSERT INTO traqmilter_schema (version) VALUES (%s)", (number,))
                    applied.append(name)
    except psycopg.Error as exc:
        raise DirectoryError(f"{where}: {_error_text(exc)}") from None
    return applied


def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
    exists = conn.execute("SELECT to_regclass('traqmilter_schema') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT coalesce(max(version), 0) FROM traqmilter_schema").fetchone()
    return int(row[0]) if row else 0


def _newer(where: str, version: int) -> str:
    return (
        f"{where}: schema version {version} was written by a newer traqmilter; "
        f"this one knows version {SCHEMA_VERSION} (upgrade traqmilter)"
    )


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PostgresDirectory(MailboxStore):
    """The writable directory store on PostgreSQL. Thread-safe; contains() may be called
    from asyncio (it blocks for at most `timeout`, a cache hit for about a microsecond)."""

    kind: ClassVar[str] = BACKEND
    # The byte order SQLite's listings have, whatever the database's locale.
    collate_bytes: ClassVar[str] = ' COLLATE "C"'

    @property
    def name(self) -> str:
        return f"store {self.path}"  # the path names the kind: postgresql://host:port/db

    def __init__(
        self,
        conninfo: str,
        *,
        password_file: str = "",
        fold_case: bool = True,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        wall_clock: Callable[[], float] = time.time,
        lookup_cache_entries: int = LOOKUP_CACHE_ENTRIES,
        stats: LookupStats | None = None,
    ) -> None:
        """Connect, check the schema version and start the cache listener.

        Raises DirectoryError when the server cannot be reached or its schema is missing
        (run `traqmilter directory init`) or unknown.
        """
        if timeout <= 0 or lookup_cache_entries < 16:
            raise ValueError("timeout > 0 and lookup_cache_entries >= 16")
        self.path = describe(conninfo)  # what messages name, as the SQLite store's path
        self.fold_case = fold_case
        self.timeout = timeout
        self.stats = stats if stats is not None else LookupStats()
        self.stats.backend = BACKEND
        self.stats.in_use = True
        self._conninfo = conninfo
        self._kwargs = connection_kwargs(conninfo, password_file, timeout)
        self._wall_clock = wall_clock
        self._cache_entries = lookup_cache_entries
        self._cache: dict[str, bool] = {}  # guarded by _cache_lock
        self._cache_lock = threading.Lock()
        self._generation = 0  # bumped (under _cache_lock) by every invalidation
        self._listening = False  # the cache may be used only while True
        self._down = False  # the last attempt to reach the server failed
        self._stop = threading.Event()
        self._wake_read, self._wake_write = os.pipe()  # close() wakes the listener at once
        self._check_schema()
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            make_conninfo(conninfo, **self._kwargs),
            min_size=MIN_POOL_SIZE,
            max_size=MAX_POOL_SIZE,
            open=False,
            configure=self._configure,
            name="traqmilter-directory",
            timeout=timeout,
            # Give up a failed connection attempt soon: the pool then grows again as soon
            # as a lookup asks or the listener is back (_listen), instead of waiting out
            # its exponential back-off after an outage.
            reconnect_timeout=max(1.0, timeout),
            reconnect_failed=self._pool_gave_up,
        )
        self._pool.open(wait=False)
        self._listener = threading.Thread(
            target=self._listen, name="traqmilter-directory-listen", daemon=True
        )
        self._listener.start()

    # --- connections

    def _check_schema(self) -> None:
        try:
            with psycopg.connect(self._conninfo, **self._kwargs) as conn:
                version = _schema_version(conn)
        except psycopg.Error as exc:
            raise DirectoryError(f"{self.path}: cannot connect: {_error_text(exc)}") from None
        if version is None or version == 0:
            raise DirectoryError(
                f"{self.path}: not an initialised traqmilter directory "
                "(run `traqmilter directory init`)"
            )
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(_newer(self.path, version))
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path}: schema version {version}; run `traqmilter directory init` "
                f"to migrate it to {SCHEMA_VERSION}"
            )

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Each new pooled connection: autocommit, and the lookup prepared once. psycopg's
        own automatic preparing stays off: it sends DEALLOCATE ALL after DDL or a
        rollback, which would take our statement with its own."""
        conn.autocommit = True
        conn.prepare_threshold = None
        result = conn.pgconn.prepare(_CONTAINS_STATEMENT, CONTAINS_SQL)
        if result.status != pq.ExecStatus.COMMAND_OK:
            raise psycopg.OperationalError(
                result.error_message.decode("utf-8", "replace") or "prepare failed"
            )

    def _pool_gave_up(self, pool: ConnectionPool[Any]) -> None:
        self._down = True

    def _run(self, pgconn: pq.abc.PGconn, deadline: float, name: bytes, params: list[bytes]) -> int:
        """Run a prepared statement on libpq's asynchronous interface, waiting on the
        socket until `deadline`; return its number of rows. Raises _Timeout or
        psycopg.OperationalError."""
        pgconn.send_query_prepared(name, params)
        return self._collect(pgconn, deadline)

    @staticmethod
    def _collect(pgconn: pq.abc.PGconn, deadline: float) -> int:
        rows, error = 0, b""
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
        while True:
            while pgconn.is_busy():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Timeout()
                poller.poll(remaining * 1000)
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None:
                break
            if result.status == pq.ExecStatus.TUPLES_OK:
                rows = result.ntuples
            elif result.status != pq.ExecStatus.COMMAND_OK:
                error = result.error_message or b"query failed"
        if error:
            raise psycopg.OperationalError(error.decode("utf-8", "replace").strip())
        return rows

    # --- the Directory protocol ---------------------------------------------------------

    def contains(self, key: str) -> bool:
        with self._cache_lock:
            if self._listening:
                known = self._cache.get(key)
                if known is not None:
                    self.stats.cache_hits += 1
                    return known
            generation = self._generation
        domain_at = key.rfind("@")
        catch_all = key[domain_at:] if domain_at >= 0 else key
        try:
            params = [key.encode("utf-8"), catch_all.encode("utf-8")]
        except UnicodeEncodeError:
            return False  # no stored row can hold it (the server refuses invalid UTF-8)
        if b"\x00" in params[0]:
            return False  # libpq would cut the key at the NUL: never look that up
        started = time.monotonic()
        known = self._lookup(params, started) > 0
        with self._cache_lock:
            if self._listening and generation == self._generation:
                cache = self._cache
                if len(cache) >= self._cache_entries:
                    for old in list(islice(cache, self._cache_entries // 16)):
                        del cache[old]
                cache[key] = known
        return known

    def _lookup(self, params: list[bytes], started: float) -> int:
        deadline = started + self.timeout
        wait = FAST_FAIL_SECONDS if self._down else self.timeout
        for attempt in (1, 2):
            try:
                conn = self._pool.getconn(timeout=min(wait, max(deadline - time.monotonic(), 0)))
            except psycopg.OperationalError as exc:  # PoolTimeout, PoolClosed
                self._failed(started, f"no connection to the server ({_error_text(exc)})")
            try:
                rows = self._run(conn.pgconn, deadline, _CONTAINS_STATEMENT, params)
            except _Timeout:
                conn.close()  # mid-statement: no longer usable
                self._pool.putconn(conn)
                self._failed(started, f"no answer within {self.timeout:g} s")
            except psycopg.Error as exc:
                broken = conn.pgconn.status != pq.ConnStatus.OK
                if broken:
                    conn.close()
                self._pool.putconn(conn)
                # A pooled connection the server dropped (it restarted): one more try on
                # a fresh one, within the same deadline.
                if broken and attempt == 1 and time.monotonic() < deadline:
                    continue
                self._failed(started, _error_text(exc))
            except OSError as exc:  # the socket went away under poll()
                conn.close()
                self._pool.putconn(conn)
                self._failed(started, str(exc))
            else:
                self._pool.putconn(conn)
                self._down = False
                self.stats.record(time.monotonic() - started, known=rows > 0)
                return rows
        raise AssertionError("unreachable")

    def _failed(self, started: float, why: str) -> NoReturn:
        self._down = True
        self.stats.record_error(time.monotonic() - started)
        raise DirectoryUnavailable(f"{self.path}: {why}")

    # --- the cache listener

    def _invalidate(self) -> None:
        with self._cache_lock:
            self._generation += 1
            self._cache.clear()

    def _set_listening(self, listening: bool) -> None:
        with self._cache_lock:
            self._listening = listening
            self._generation += 1
            self._cache.clear()
        if listening or not self._stop.is_set():  # a closed store leaves the gauge to its successor
            self.stats.backend_up = listening

    def _listen(self) -> None:
        logged = False
        while not self._stop.is_set():
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True, **self._kwargs)
            except psycopg.Error as exc:
                self._down = True
                if not logged:
                    log.warning(
                        "%s: cannot connect: %s; lookups tempfail until it answers",
                        self.path,
                        _error_text(exc),
                    )
                    logged = True
                self._stop.wait(RECONNECT_SECONDS)
                continue
            try:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self._set_listening(True)
                self._down = False
                if logged:
                    log.info("%s: connected again", self.path)
                    logged = False
                    self._pool.check()  # replace connections the outage broke, grow again
                self._follow(conn.pgconn)
            except (psycopg.Error, OSError, _Timeout) as exc:
                if not self._stop.is_set():
                    log.warning(
                        "%s: connection lost: %s; lookups tempfail until it answers",
                        self.path,
                        _error_text(exc),
                    )
                    logged = True
            finally:
                self._set_listening(False)
                self._down = True  # lookups fail fast until a connection is back
                conn.close()
            self._stop.wait(RECONNECT_SECONDS)

    def _follow(self, pgconn: pq.abc.PGconn) -> None:
        """Empty the cache on each notification until stopped or the connection fails."""
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        next_probe = time.monotonic() + PROBE_SECONDS
        while not self._stop.is_set():
            poller.poll(LISTEN_POLL_SECONDS * 1000)
            pgconn.consume_input()
            if pgconn.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError("connection closed")
            self._drain(pgconn)
            if time.monotonic() >= next_probe:
                pgconn.send_query(b"SELECT 1")
                self._collect(pgconn, time.monotonic() + self.timeout)
                self._drain(pgconn)
                next_probe = time.monotonic() + PROBE_SECONDS

    def _drain(self, pgconn: pq.abc.PGconn) -> None:
        notified = False
        while pgconn.notifies() is not None:
            notified = True
        if notified:
            self._invalidate()

    def wait_listening(self, timeout: float) -> bool:
        """Wait until the cache listener is connected (tests, `check`)."""
        deadline = time.monotonic() + timeout
        while not self._listening:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_write, b"x")
        self._listener.join(timeout=LISTEN_POLL_SECONDS + self.timeout + 1)
        self._pool.close(timeout=self.timeout)
        os.close(self._wake_read)
        os.close(self._wake_write)

    # --- the backend of MailboxStore's administration -------------------------------

    @contextmanager
    def _transaction(self, *, timeout_ms: int | None = None) -> Iterator[psycopg.Cursor[Any]]:
        """One write transaction on a pooled connection; psycopg errors -> DirectoryError.
        The lookup cache is emptied afterwards (other hosts learn by NOTIFY)."""
        try:
            with (
                self._pool.connection(timeout=self.timeout) as conn,
                conn.transaction(),
                conn.cursor() as cursor,
            ):
                limit = timeout_ms if timeout_ms is not None else self._statement_ms()
                cursor.execute(f"SET LOCAL statement_timeout = {int(limit)}")
                yield cursor
        except PoolTimeout as exc:
            raise DirectoryError(f"{self.path}: no connection to the server") from exc
        except psycopg.Error as exc:
            raise DirectoryError(f"{self.path}: {_error_text(exc)}") from exc
        finally:
            self._invalidate()

    def _statement_ms(self) -> int:
        # Writes run while an SMTP client waits (create): give them a few lookups' time.
        return max(1000, int(self.timeout * 5000))

    def _query(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._pool.connection(timeout=self.timeout) as conn:
                return conn.execute(_paramstyle(statement), params).fetchall()
        except PoolTimeout as exc:
            raise DirectoryError(f"{self.path}: no connection to the server") from exc
        except psycopg.Error as exc:
            raise DirectoryError(f"{self.path}: {_error_text(exc)}") from exc

    @contextmanager
    def _writing(self) -> Iterator[_Transaction]:
        with self._transaction() as cursor:
            yield _Transaction(cursor)

    def _serialise_admin(self, tx: Transaction) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(?)", (_SYNC_LOCK,))

    def _insert_rows(self, rows: Iterator[tuple[Any, ...]]) -> int:
        """COPY into a temporary table, then one INSERT."""
        checked = list(rows)  # every row checked before the transaction starts
        with self._transaction(timeout_ms=0) as cursor:
            cursor.execute(
                "CREATE TEMPORARY TABLE traqmilter_import"
                " (LIKE mailboxes INCLUDING DEFAULTS) ON COMMIT DROP"
            )
            with cursor.copy(f"COPY traqmilter_import ({MAILBOX_COLUMNS}) FROM STDIN") as copy:
                for row in checked:
                    copy.write_row(row)
            cursor.execute(
                f"INSERT INTO mailboxes ({MAILBOX_COLUMNS})"
                f" SELECT DISTINCT ON (address) {MAILBOX_COLUMNS} FROM traqmilter_import"
                " ON CONFLICT (address) DO NOTHING"
            )
            return max(cursor.rowcount, 0)
