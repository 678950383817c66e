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

SECURITY: maildir paths are computed from the address by maildir_path() and checked to be
relative, without "..", without a leading dot and made only of safe characters; anything
else is refused, so a hostile local part can never name a path outside the mailbox root.
Keys and targets with control characters are refused.

Memory index: contains() answers from a set of every active mailbox and alias key, read
from the file in one pass, so a lookup is a set probe (0.3 us) instead of a statement
(6-9 us). The set is a snapshot: any change to the file makes it stale, and a stale set is
never consulted. Changes by another process (`traqmilter mailbox`, the milter's `create`)
are noticed through `PRAGMA data_version` on the reader connection, checked at most every
lookup_cache_seconds (default 1 s) by the lookup that finds the interval over; writes
through this object drop the set at once. That check is the staleness bound of a lookup:
a mailbox another process adds may be refused for up to that long, never longer. While the
set is stale or not yet read, lookups ask SQLite as below, so they stay exact; the set is
re-read in a background thread (one read transaction, a chunk of rows at a time so the
thread never holds the GIL for long), first by the first lookup, later by the check that
saw a change, and at most once per LOAD_BACKOFF times the last read's duration, so a
store written every second costs a bounded share of a core. A read that began before a
change is thrown away. Measured (1,000,000 mailboxes, bench/directory_bench.py): the read
takes about 0.7 s on a busy machine and the set holds about 110 MB (a key's str and its
set slot); memory_index=False (config directory.sqlite_memory_index) keeps only the cache.

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

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any

from traqmilter.core.address import MAX_LOCAL_OCTETS, Address, AddressError, normalise_domain
from traqmilter.core.engine import DirectoryUnavailable

log = logging.getLogger("traqmilter.directory")

SCHEMA_VERSION = 1
DATABASE_MODE = 0o660

# Exactly the schema of docs/directory.md; Postfix's sqlite: maps depend on these names.
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
LOOKUP_CACHE_ENTRIES = 65_536
DEFAULT_LOOKUP_CACHE_SECONDS = 1.0
# The memory index holds exactly the keys CONTAINS_SQL finds a row for.
INDEX_SQL = (
    "SELECT address FROM mailboxes WHERE active = 1",
    "SELECT address FROM aliases WHERE active = 1",
)
INDEX_CHUNK_ROWS = 4096  # rows per fetch: about 1 ms of the GIL between releases
# A read of the memory index waits at least this many times the previous read's duration.
LOAD_BACKOFF = 4.0
_MAILBOX_COLUMNS = (
    "address, local_part, domain, maildir, quota_bytes, active, settings, created_by, created_at"
)
_INSERT_MAILBOX = f"INSERT INTO mailboxes ({_MAILBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_NEW_MAILBOX = _INSERT_MAILBOX.replace("INSERT", "INSERT OR IGNORE", 1)

CREATED_BY = frozenset({"admin", "create", "traqmilter"})
DEFAULT_TEMPLATE = "default"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A maildir directory name: starts with a letter, digit or underscore (never ".", never "-"
# which shell tools read as an option), then only characters with no meaning in a path.
_SAFE_LOCAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")
_SAFE_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
_MAX_DOMAIN = 253


class DirectoryError(Exception):
    """An administrative operation on the directory failed; str() says why, for the admin."""


class SchemaVersionError(DirectoryError):
    """The file's schema is not one this version of traqmilter knows."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    address: str
    local_part: str
    domain: str
    maildir: str
    quota_bytes: int = 0
    active: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    created_by: str = "admin"
    created_at: str = ""


def maildir_path(local_part: str, domain: str) -> str:
    """The maildir of a mailbox, relative to Postfix's virtual_mailbox_base: "domain/local/".

    Raises ValueError unless the result is certainly a plain two-level relative path.
    """
    if not (0 < len(local_part) <= MAX_LOCAL_OCTETS and _SAFE_LOCAL.fullmatch(local_part)):
        raise ValueError(f"local part {local_part!r} is not safe as a maildir name")
    if ".." in local_part:
        raise ValueError(f"local part {local_part!r} contains '..'")
    if not (0 < len(domain) <= _MAX_DOMAIN and _SAFE_DOMAIN.fullmatch(domain)):
        raise ValueError(f"domain {domain!r} is not safe as a maildir name")
    path = f"{domain}/{local_part}/"
    parts = path.split("/")
    # Belt and braces: the patterns above already imply all of this.
    if path.startswith("/") or len(parts) != 3 or any(p in ("", ".", "..") for p in parts[:2]):
        raise ValueError(f"maildir {path!r} would leave the mailbox root")
    return path


def normalise_key(key: str, *, fold_case: bool = True) -> str:
    """Normalise an administrator's "local@domain" (or "@domain") the way lookups see it."""
    text = key.strip()
    if _CONTROL.search(text):
        raise ValueError("control character in address")
    local, at, domain = text.rpartition("@")
    if not at:
        raise ValueError(f"{text!r} is not local@domain")
    try:
        domain = normalise_domain(domain)
    except AddressError as exc:
        raise ValueError(f"{text!r}: {exc}") from exc
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_OCTETS:
        raise ValueError(f"{text!r}: local part too long")
    return f"{local.lower() if fold_case else local}@{domain}"


def _utc_text(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _mailbox(row: tuple[Any, ...]) -> Mailbox:
    address, local_part, domain, maildir, quota, active, settings, created_by, created_at = row
    try:
        parsed = json.loads(settings)
    except ValueError:
        parsed = {}
    return Mailbox(
        address=address,
        local_part=local_part,
        domain=domain,
        maildir=maildir,
        quota_bytes=int(quota),
        active=bool(active),
        settings=parsed if isinstance(parsed, dict) else {},
        created_by=created_by,
        created_at=created_at,
    )


# --- Row building and checks shared by every writable store (this one, PostgreSQL) -----


def check_created_by(created_by: str) -> None:
    if created_by not in CREATED_BY:
        raise ValueError(f"created_by must be one of {sorted(CREATED_BY)}")


def new_mailbox(
    address: Address,
    *,
    quota_bytes: int,
    settings: Mapping[str, Any] | None,
    created_by: str,
    active: bool,
    created_at: str,
) -> tuple[Mailbox, tuple[Any, ...]]:
    """The mailbox add_mailbox() stores for address.key, and its row (the columns of
    _MAILBOX_COLUMNS). Raises ValueError for an unsafe address or bad values."""
    if quota_bytes < 0:
        raise ValueError("quota_bytes must be 0 (unlimited) or more")
    check_created_by(created_by)
    settings_text = json.dumps(dict(settings or {}), sort_keys=True)
    mailbox = Mailbox(
        address=address.key,
        local_part=address.local,
        domain=address.domain,
        maildir=maildir_path(address.local, address.domain),
        quota_bytes=quota_bytes,
        active=active,
        settings=json.loads(settings_text),
        created_by=created_by,
        created_at=created_at,
    )
    row = (
        mailbox.address,
        mailbox.local_part,
        mailbox.domain,
        mailbox.maildir,
        mailbox.quota_bytes,
        int(mailbox.active),
        settings_text,
        mailbox.created_by,
        mailbox.created_at,
    )
    return mailbox, row


def alias_target(target: str) -> str:
    target = target.strip()
    if not target or _CONTROL.search(target):
        raise ValueError("alias target must be addresses without control characters")
    return target


def template_key(store: Callable[[str], str], address: Address, template: str) -> str | None:
    """The stored key of create's template mailbox (None: DEFAULT_TEMPLATE); a bare local
    part names a mailbox of the new address's domain. store: the store's stored_key."""
    if template == DEFAULT_TEMPLATE:
        return None
    return store(template if "@" in template else f"{template}@{address.domain}")


def postmaster_keys(domains: Iterable[str], target: str) -> tuple[str, list[str]]:
    """(the checked target, the postmaster@ keys of the local domains, sorted) for
    ensure_postmaster_aliases()."""
    target = target.strip()
    if not target or _CONTROL.search(target):
        raise ValueError("postmaster target must be an address")
    return target, sorted({f"postmaster@{_checked_domain(d)}" for d in domains})


def import_rows(
    addresses: Iterable[str], *, fold_case: bool, created_by: str, created_at: str
) -> Iterator[tuple[Any, ...]]:
    """bulk_add()'s rows (the columns of _MAILBOX_COLUMNS). Raises ValueError, while
    iterating, for a malformed or unsafe address."""
    check_created_by(created_by)
    domains: dict[str, str] = {}
    for text in addresses:
        local, at, raw_domain = text.strip().rpartition("@")
        if not at or not local:
            raise ValueError(f"{text!r} is not local@domain")
        domain = domains.get(raw_domain)
        if domain is None:
            try:
                domain = domains[raw_domain] = normalise_domain(raw_domain)
            except AddressError as exc:
                raise ValueError(f"{text!r}: {exc}") from exc
        if fold_case:
            local = local.lower()
        maildir = maildir_path(local, domain)
        yield (f"{local}@{domain}", local, domain, maildir, 0, 1, "{}", created_by, created_at)


class SqliteDirectory:
    """The writable directory store. Thread-safe; contains() is also safe to call from asyncio
    (a bounded, microsecond-scale blocking call)."""

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
    ) -> None:
        """Open (and with create=True, initialise) the directory at path.

        fold_case: how administrators' string keys are normalised (not contains(): the
        engine hands it keys already normalised). lookup_cache_seconds: how long contains()
        may answer from its cache before it checks for other processes' writes (0: before
        every lookup); lookup_cache_entries: how many answers it keeps (at least 16).
        memory_index: answer lookups from a set of all keys once it is read (see above).
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
        # The memory index: None while stale or not read. A published set is never mutated,
        # so lookups read it without a lock. The fields below are guarded by _read_lock.
        self._index: set[str] | None = None
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
            # As CONTAINS_SQL: the key, else its catch-all "@domain" (a key without "@",
            # or the catch-all key itself, was the whole probe).
            if key in index:
                return True
            at = key.rfind("@")
            return at > 0 and key[at:] in index
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
        """How many keys the memory index holds; None while it is stale or not read."""
        index = self._index
        return None if index is None else len(index)

    def _load_index(self, generation: int) -> None:
        """The background read of the memory index: failures only log, since lookups go on
        asking SQLite (which then says whether the store can answer)."""
        started = time.monotonic()
        keys: set[str] | None = None
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

    def _read_index(self) -> set[str]:
        """Every key CONTAINS_SQL finds, read in one transaction on a connection of its own
        (lookups go on meanwhile)."""
        conn = self._connect(busy_timeout_ms=5000)
        first = itemgetter(0)
        keys: set[str] = set()
        try:
            conn.execute("PRAGMA query_only = 1")
            conn.execute("BEGIN")  # both tables from one snapshot
            for sql in INDEX_SQL:
                cursor = conn.execute(sql)
                while rows := cursor.fetchmany(INDEX_CHUNK_ROWS):
                    if self._closed:  # close() waits for this thread: stop now
                        raise DirectoryError(f"{self.path}: closed while reading the index")
                    keys.update(map(first, rows))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise DirectoryError(f"{self.path}: reading the index: {exc}") from exc
        finally:
            conn.close()
        return keys

    def _publish_index(self, generation: int, keys: set[str]) -> bool:
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

    # --- administration (traqmilter mailbox ..., the create action) -----------------------

    def stored_key(self, text: str) -> str:
        """An administrator's address as stored (domain normalised, local part folded)."""
        return normalise_key(text, fold_case=self.fold_case)

    def add_mailbox(
        self,
        address: Address,
        *,
        quota_bytes: int = 0,
        settings: Mapping[str, Any] | None = None,
        created_by: str = "admin",
        active: bool = True,
    ) -> Mailbox:
        """Add a mailbox for address.key (its extension is ignored). Raises DirectoryError
        if it exists, ValueError for an unsafe address or bad values."""
        mailbox, row = new_mailbox(
            address,
            quota_bytes=quota_bytes,
            settings=settings,
            created_by=created_by,
            active=active,
            created_at=_utc_text(self._wall_clock()),
        )
        with self._writing() as conn:
            try:
                conn.execute(_INSERT_MAILBOX, row)
            except sqlite3.IntegrityError as exc:
                raise DirectoryError(f"mailbox {mailbox.address} already exists") from exc
        return mailbox

    def remove_mailbox(self, key: str) -> bool:
        """Remove a mailbox row (never its maildir on disk); return whether one was removed."""
        with self._writing() as conn:
            deleted = conn.execute(
                "DELETE FROM mailboxes WHERE address = ?", (self.stored_key(key),)
            )
            return deleted.rowcount > 0

    def get_mailbox(self, key: str) -> Mailbox | None:
        rows = self._query(
            f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes WHERE address = ?", (self.stored_key(key),)
        )
        return _mailbox(rows[0]) if rows else None

    def list_mailboxes(
        self, domain: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Mailbox]:
        """Mailboxes in address order, optionally of one domain, one page at a time."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        if domain is None:
            rows = self._query(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes ORDER BY address LIMIT ? OFFSET ?",
                (limit, offset),
            )
        else:
            try:
                name = normalise_domain(domain)
            except AddressError as exc:
                raise ValueError(f"{domain!r}: {exc}") from exc
            rows = self._query(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes WHERE domain = ?"
                " ORDER BY address LIMIT ? OFFSET ?",
                (name, limit, offset),
            )
        return [_mailbox(row) for row in rows]

    def count_mailboxes(self) -> int:
        return int(self._query("SELECT count(*) FROM mailboxes")[0][0])

    def count_created(self) -> int:
        """Mailboxes the `create` action has made so far (the total create.max_total caps)."""
        return int(self._query("SELECT count(*) FROM mailboxes WHERE created_by = 'create'")[0][0])

    def add_alias(self, key: str, target: str, *, created_by: str = "admin") -> None:
        """Add alias key -> target (one address or comma-separated addresses).
        A key "@domain" is a catch-all, as in Postfix's virtual(5)."""
        alias, target = self.stored_key(key), alias_target(target)
        check_created_by(created_by)
        with self._writing() as conn:
            try:
                conn.execute(
                    "INSERT INTO aliases (address, target, active, created_by) VALUES (?, ?, 1, ?)",
                    (alias, target, created_by),
                )
            except sqlite3.IntegrityError as exc:
                raise DirectoryError(f"alias {alias} already exists") from exc

    def remove_alias(self, key: str) -> bool:
        with self._writing() as conn:
            deleted = conn.execute("DELETE FROM aliases WHERE address = ?", (self.stored_key(key),))
            return deleted.rowcount > 0

    def get_alias(self, key: str) -> str | None:
        rows = self._query("SELECT target FROM aliases WHERE address = ?", (self.stored_key(key),))
        return str(rows[0][0]) if rows else None

    def list_domains(self) -> list[str]:
        return [str(row[0]) for row in self._query("SELECT name FROM domains ORDER BY name")]

    def mailbox_domains(self) -> list[str]:
        """The domains of the active mailboxes (`domains: auto` without a Postfix to read).
        A scan of the table: read at start and reload only."""
        rows = self._query("SELECT DISTINCT domain FROM mailboxes WHERE active ORDER BY domain")
        return [str(row[0]) for row in rows]

    def sync_domains(self, domains: Iterable[str]) -> None:
        """Make the domains table exactly the given local domains (config `domains:`)."""
        wanted = {_checked_domain(d) for d in domains}
        with self._writing() as conn:
            present = {row[0] for row in conn.execute("SELECT name FROM domains")}
            gone, new = present - wanted, wanted - present
            conn.executemany("DELETE FROM domains WHERE name = ?", ((d,) for d in gone))
            conn.executemany("INSERT INTO domains (name) VALUES (?)", ((d,) for d in new))

    def ensure_postmaster_aliases(self, domains: Iterable[str], target: str) -> list[str]:
        """Make postmaster@ every local domain deliverable (RFC 5321 section 4.5.1).

        For a domain with no postmaster mailbox or alias row, add alias postmaster@d ->
        target (created_by 'traqmilter'). Aliases traqmilter made earlier follow
        a changed target and are removed with their domain; the administrator's own rows are
        never touched. A domain whose postmaster *is* the target gets no alias (it would
        point at itself). Returns the domains whose alias was added or changed.
        """
        target, wanted = postmaster_keys(domains, target)
        changed: list[str] = []
        with self._writing() as conn:
            ours = {
                row[0]
                for row in conn.execute(
                    "SELECT address FROM aliases WHERE created_by = 'traqmilter'"
                    " AND address LIKE 'postmaster@%'"
                )
            }
            for stale in sorted(ours - set(wanted)):
                conn.execute(
                    "DELETE FROM aliases WHERE address = ? AND created_by = 'traqmilter'", (stale,)
                )
            for key in wanted:
                if key == target.lower():
                    continue  # an alias to itself would loop
                has_mailbox = conn.execute(
                    "SELECT 1 FROM mailboxes WHERE address = ?", (key,)
                ).fetchone()
                if has_mailbox:
                    continue
                cursor = conn.execute(
                    "INSERT INTO aliases (address, target, active, created_by)"
                    " VALUES (?, ?, 1, 'traqmilter')"
                    " ON CONFLICT (address) DO UPDATE SET target = excluded.target, active = 1"
                    " WHERE aliases.created_by = 'traqmilter'"
                    " AND (aliases.target != excluded.target OR aliases.active != 1)",
                    (key, target),
                )
                if cursor.rowcount > 0:
                    changed.append(key.partition("@")[2])
        return changed

    def create_from_template(self, address: Address, template: str) -> bool:
        """Create the mailbox address.key for the `create` action; True if this call created it.

        template: DEFAULT_TEMPLATE (quota 0, no settings), a mailbox key, or a local part of
        the new address's domain; its quota_bytes and settings are copied. The new mailbox is
        always active, even from an inactive template: it exists to receive this mail.
        Safe under any number of concurrent creators (INSERT OR IGNORE: exactly one wins).
        Raises ValueError for an unsafe address, DirectoryError when the template is missing
        or the store cannot be written.
        """
        key, local, domain = address.key, address.local, address.domain
        maildir = maildir_path(local, domain)
        template_row = template_key(self.stored_key, address, template)
        created_at = _utc_text(self._wall_clock())
        with self._writing() as conn:
            if template_row is None:
                quota, settings = 0, "{}"
            else:
                row = conn.execute(
                    "SELECT quota_bytes, settings FROM mailboxes WHERE address = ?",
                    (template_row,),
                ).fetchone()
                if row is None:
                    raise DirectoryError(f"template mailbox {template_row} does not exist")
                quota, settings = row
            cursor = conn.execute(
                _INSERT_NEW_MAILBOX,
                (key, local, domain, maildir, quota, 1, settings, "create", created_at),
            )
            return cursor.rowcount == 1

    def bulk_add(self, addresses: Iterable[str], *, created_by: str = "admin") -> int:
        """Add many mailboxes in one transaction (tests, benchmarks, imports); existing keys
        are left alone. Returns how many rows were added. Raises ValueError (and adds
        nothing) if any address is malformed or unsafe as a maildir."""
        rows = import_rows(
            addresses,
            fold_case=self.fold_case,
            created_by=created_by,
            created_at=_utc_text(self._wall_clock()),
        )
        with self._writing() as conn:
            before = conn.total_changes
            conn.executemany(_INSERT_NEW_MAILBOX, rows)
            return conn.total_changes - before


def _checked_domain(domain: str) -> str:
    try:
        return normalise_domain(domain.strip())
    except AddressError as exc:
        raise ValueError(f"{domain!r}: {exc}") from exc
