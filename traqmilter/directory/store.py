"""What every writable mailbox store shares: the row model, the checks an address or value
passes before it is stored, and the administration (`traqmilter mailbox`, the postmaster
aliases, the `create` action) written once over a small backend interface.

SqliteDirectory (sqlite.py) and PostgresDirectory (postgresql.py) subclass MailboxStore
and hold only what differs: connections, lookups and their cache, the SQL dialect and a
bulk insert. Both keep the same tables and columns (docs/directory.md), so one statement
serves both; the backend interface is:
- `_query(sql, params)`: a read, every row;
- `_writing()`: one write transaction, yielding a Transaction; the driver's errors become
  DirectoryError and the store's cached answers are dropped afterwards;
- `_serialise_admin(tx)`: inside a transaction, wait for other writers' domain and
  postmaster syncs (PostgreSQL: an advisory lock shared by every host; SQLite's
  BEGIN IMMEDIATE already serialises writers);
- `_insert_rows(rows)`: add the rows whose address is new, return how many (bulk_add);
- `collate_bytes`: what ORDER BY needs to sort by bytes, as SQLite does by default.
Statements are written with `?` placeholders; a backend with another paramstyle converts
them in `_query` and its Transaction.

SECURITY: maildir paths are computed from the address by maildir_path() and checked to be
relative, without "..", without a leading dot and made only of safe characters; anything
else is refused, so a hostile local part can never name a path outside the mailbox root.
Keys and targets with control characters are refused.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

from traqmilter.core.address import MAX_LOCAL_OCTETS, Address, AddressError, normalise_domain

LOOKUP_CACHE_ENTRIES = 65_536  # answers a store's lookup cache keeps, by default
MAILBOX_COLUMNS = (
    "address, local_part, domain, maildir, quota_bytes, active, settings, created_by, created_at"
)
INSERT_NEW_MAILBOX = (
    f"INSERT INTO mailboxes ({MAILBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (address) DO NOTHING"
)

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
    """The store's schema is not one this version of traqmilter knows."""


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


def checked_domain(domain: str) -> str:
    try:
        return normalise_domain(domain.strip())
    except AddressError as exc:
        raise ValueError(f"{domain!r}: {exc}") from exc


def utc_text(epoch_seconds: float) -> str:
    """created_at as stored: ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def mailbox_from_row(row: Sequence[Any]) -> Mailbox:
    """A Mailbox from a row of MAILBOX_COLUMNS; settings that are not a JSON object read
    as none (the table is also written by hand)."""
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
    MAILBOX_COLUMNS). Raises ValueError for an unsafe address or bad values."""
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
    return target, sorted({f"postmaster@{checked_domain(d)}" for d in domains})


def import_rows(
    addresses: Iterable[str], *, fold_case: bool, created_by: str, created_at: str
) -> Iterator[tuple[Any, ...]]:
    """bulk_add()'s rows (the columns of MAILBOX_COLUMNS). Raises ValueError, while
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


class Rows(Protocol):
    """What a statement returns (a DB-API cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Transaction(Protocol):
    """One write transaction of a store (`?` placeholders)."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Rows: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> object: ...


class MailboxStore(ABC):
    """The writable store (the Directory `create` and the admin commands write): its
    lookups and connections are the subclass's, its administration is written here once.
    Thread-safe as far as the subclass's _query and _writing are."""

    kind: ClassVar[str]  # the store's kind for messages and metrics: "sqlite", "postgresql"
    collate_bytes: ClassVar[str] = ""  # appended to ORDER BY columns: sort by bytes
    path: str  # what messages name: the file, or the server without its password
    fold_case: bool  # how administrators' keys are folded (stored_key)
    _wall_clock: Callable[[], float]  # created_at

    @property
    def name(self) -> str:
        """The store as `explain` names the source that knows a recipient."""
        return f"{self.kind} store {self.path}"

    # --- the backend ------------------------------------------------------------------

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def _writing(self) -> AbstractContextManager[Transaction]: ...

    @abstractmethod
    def _insert_rows(self, rows: Iterator[tuple[Any, ...]]) -> int: ...

    @abstractmethod
    def _serialise_admin(self, tx: Transaction) -> None:
        """Inside tx: wait for other writers' sync_domains and ensure_postmaster_aliases."""

    # --- administration (traqmilter mailbox ..., the create action) -------------------

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
            created_at=utc_text(self._wall_clock()),
        )
        with self._writing() as tx:
            if tx.execute(INSERT_NEW_MAILBOX, row).rowcount != 1:
                raise DirectoryError(f"mailbox {mailbox.address} already exists")
        return mailbox

    def remove_mailbox(self, key: str) -> bool:
        """Remove a mailbox row (never its maildir on disk); return whether one was removed."""
        stored = self.stored_key(key)
        with self._writing() as tx:
            return tx.execute("DELETE FROM mailboxes WHERE address = ?", (stored,)).rowcount > 0

    def get_mailbox(self, key: str) -> Mailbox | None:
        rows = self._query(
            f"SELECT {MAILBOX_COLUMNS} FROM mailboxes WHERE address = ?", (self.stored_key(key),)
        )
        return mailbox_from_row(rows[0]) if rows else None

    def list_mailboxes(
        self, domain: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Mailbox]:
        """Mailboxes in address order (by bytes), optionally of one domain, one page at a
        time."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        order = f"ORDER BY address{self.collate_bytes} LIMIT ? OFFSET ?"
        if domain is None:
            rows = self._query(f"SELECT {MAILBOX_COLUMNS} FROM mailboxes {order}", (limit, offset))
        else:
            try:
                name = normalise_domain(domain)
            except AddressError as exc:
                raise ValueError(f"{domain!r}: {exc}") from exc
            rows = self._query(
                f"SELECT {MAILBOX_COLUMNS} FROM mailboxes WHERE domain = ? {order}",
                (name, limit, offset),
            )
        return [mailbox_from_row(row) for row in rows]

    def count_mailboxes(self) -> int:
        return int(self._query("SELECT count(*) FROM mailboxes")[0][0])

    def count_created(self) -> int:
        """Mailboxes the `create` action has made so far, by any host sharing the store
        (the total create.max_total caps)."""
        return int(self._query("SELECT count(*) FROM mailboxes WHERE created_by = 'create'")[0][0])

    def add_alias(self, key: str, target: str, *, created_by: str = "admin") -> None:
        """Add alias key -> target (one address or comma-separated addresses).
        A key "@domain" is a catch-all, as in Postfix's virtual(5)."""
        alias, target = self.stored_key(key), alias_target(target)
        check_created_by(created_by)
        with self._writing() as tx:
            added = tx.execute(
                "INSERT INTO aliases (address, target, active, created_by) VALUES (?, ?, 1, ?)"
                " ON CONFLICT (address) DO NOTHING",
                (alias, target, created_by),
            )
            if added.rowcount != 1:
                raise DirectoryError(f"alias {alias} already exists")

    def remove_alias(self, key: str) -> bool:
        stored = self.stored_key(key)
        with self._writing() as tx:
            return tx.execute("DELETE FROM aliases WHERE address = ?", (stored,)).rowcount > 0

    def get_alias(self, key: str) -> str | None:
        rows = self._query("SELECT target FROM aliases WHERE address = ?", (self.stored_key(key),))
        return str(rows[0][0]) if rows else None

    def list_domains(self) -> list[str]:
        rows = self._query(f"SELECT name FROM domains ORDER BY name{self.collate_bytes}")
        return [str(row[0]) for row in rows]

    def mailbox_domains(self) -> list[str]:
        """The domains of the active mailboxes (`domains: auto` without a Postfix to read).
        A scan of the table: read at start and reload only."""
        rows = self._query(  # GROUP BY, not DISTINCT: PostgreSQL sorts a collated domain
            "SELECT domain FROM mailboxes WHERE active = 1"
            f" GROUP BY domain ORDER BY domain{self.collate_bytes}"
        )
        return [str(row[0]) for row in rows]

    def sync_domains(self, domains: Iterable[str]) -> None:
        """Make the domains table exactly the given local domains (config `domains:`).
        Every host sharing the store runs this at start and reload: they must agree
        (docs/scale-out.md)."""
        wanted = {checked_domain(d) for d in domains}
        with self._writing() as tx:
            self._serialise_admin(tx)
            present = {row[0] for row in tx.execute("SELECT name FROM domains").fetchall()}
            gone, new = sorted(present - wanted), sorted(wanted - present)
            tx.executemany("DELETE FROM domains WHERE name = ?", [(d,) for d in gone])
            tx.executemany(
                "INSERT INTO domains (name) VALUES (?) ON CONFLICT DO NOTHING", [(d,) for d in new]
            )

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
        with self._writing() as tx:
            self._serialise_admin(tx)
            ours = {
                row[0]
                for row in tx.execute(
                    "SELECT address FROM aliases WHERE created_by = 'traqmilter'"
                    " AND address LIKE 'postmaster@%'"
                ).fetchall()
            }
            for stale in sorted(ours - set(wanted)):
                tx.execute(
                    "DELETE FROM aliases WHERE address = ? AND created_by = 'traqmilter'", (stale,)
                )
            for key in wanted:
                if key == target.lower():
                    continue  # an alias to itself would loop
                if tx.execute("SELECT 1 FROM mailboxes WHERE address = ?", (key,)).fetchone():
                    continue
                upserted = tx.execute(
                    "INSERT INTO aliases (address, target, active, created_by)"
                    " VALUES (?, ?, 1, 'traqmilter')"
                    " ON CONFLICT (address) DO UPDATE SET target = excluded.target, active = 1"
                    " WHERE aliases.created_by = 'traqmilter'"
                    " AND (aliases.target != excluded.target OR aliases.active != 1)",
                    (key, target),
                )
                if upserted.rowcount > 0:
                    changed.append(key.partition("@")[2])
        return changed

    def create_from_template(self, address: Address, template: str) -> bool:
        """Create the mailbox address.key for the `create` action; True if this call created it.

        template: DEFAULT_TEMPLATE (quota 0, no settings), a mailbox key, or a local part of
        the new address's domain; its quota_bytes and settings are copied. The new mailbox is
        always active, even from an inactive template: it exists to receive this mail.
        Safe under any number of concurrent creators, on any number of hosts sharing the
        store (ON CONFLICT DO NOTHING: exactly one wins). Raises ValueError for an unsafe
        address, DirectoryError when the template is missing or the store cannot be written.
        """
        key, local, domain = address.key, address.local, address.domain
        maildir = maildir_path(local, domain)
        template_row = template_key(self.stored_key, address, template)
        created_at = utc_text(self._wall_clock())
        with self._writing() as tx:
            if template_row is None:
                quota, settings = 0, "{}"
            else:
                row = tx.execute(
                    "SELECT quota_bytes, settings FROM mailboxes WHERE address = ?",
                    (template_row,),
                ).fetchone()
                if row is None:
                    raise DirectoryError(f"template mailbox {template_row} does not exist")
                quota, settings = row
            created = tx.execute(
                INSERT_NEW_MAILBOX,
                (key, local, domain, maildir, quota, 1, settings, "create", created_at),
            )
            return created.rowcount == 1

    def bulk_add(self, addresses: Iterable[str], *, created_by: str = "admin") -> int:
        """Add many mailboxes in one transaction (tests, benchmarks, imports); existing keys
        are left alone. Returns how many rows were added. Raises ValueError (and adds
        nothing) if any address is malformed or unsafe as a maildir."""
        rows = import_rows(
            addresses,
            fold_case=self.fold_case,
            created_by=created_by,
            created_at=utc_text(self._wall_clock()),
        )
        return self._insert_rows(rows)
