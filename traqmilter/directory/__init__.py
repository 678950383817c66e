"""The recipient directory: which local addresses exist (SPEC section 3).

open_directory() builds what the config names: the writable store (the SQLite file, or
the shared PostgreSQL database when `directory.postgresql` is set; it is the one `create`
and `traqmilter mailbox` use, and Postfix reads it through sqlite: or pgsql: maps), then
any followed Postfix tables and address lists, then (directory.postfix: auto) the
recipient tables the Postfix instance itself names (postfix_auto.py). A recipient is known when any
source knows it. A source that cannot answer only matters when no other source knows the
key: then the lookup raises DirectoryUnavailable and the engine tempfails, because
answering "unknown" on an error would reject (or bounce, or re-route) a real user's mail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from traqmilter.core.engine import Directory, DirectoryUnavailable
from traqmilter.core.settings import DirectorySettings
from traqmilter.directory.maps import AddressListSource, PostfixMapSource
from traqmilter.directory.postfix_auto import AskedTable, PostfixDiscovery, discover_postfix
from traqmilter.directory.sqlite import SqliteDirectory
from traqmilter.directory.stats import LookupStats
from traqmilter.directory.store import (
    DirectoryError,
    Mailbox,
    MailboxStore,
    SchemaVersionError,
    maildir_path,
)

__all__ = [
    "AddressListSource",
    "CompositeDirectory",
    "DirectoryError",
    "DirectoryUnavailable",
    "Mailbox",
    "MailboxStore",
    "PostfixDiscovery",
    "PostfixMapSource",
    "SchemaVersionError",
    "SqliteDirectory",
    "maildir_path",
    "open_directory",
    "open_store",
]


class ClosableDirectory(Directory, Protocol):
    def close(self) -> None: ...


class CompositeDirectory:
    """Known if any source knows the key; sources are asked in order and the first "yes"
    ends the lookup (put the fastest, most complete source first)."""

    def __init__(
        self,
        sources: Sequence[ClosableDirectory],
        *,
        store: MailboxStore | None = None,
        discovery: PostfixDiscovery | None = None,
    ) -> None:
        self.sources = tuple(sources)
        self._store = store
        self.discovery = discovery  # directory.postfix: auto: what Postfix told

    @property
    def store(self) -> MailboxStore:
        """The writable store, for `create`, postmaster aliases and the admin commands."""
        if self._store is None:
            raise DirectoryError("this directory has no writable store")
        return self._store

    def contains(self, key: str) -> bool:
        failures: list[str] = []
        for source in self.sources:
            try:
                if source.contains(key):
                    return True
            except DirectoryUnavailable as exc:
                failures.append(str(exc))
        if failures:
            raise DirectoryUnavailable("; ".join(failures))
        return False

    def source_of(self, key: str) -> str | None:
        """The name of the first source that knows `key` (for explain), None if none does.
        Raises DirectoryUnavailable as contains() does."""
        failures: list[str] = []
        for source in self.sources:
            try:
                if source.contains(key):
                    return source_name(source)
            except DirectoryUnavailable as exc:
                failures.append(str(exc))
        if failures:
            raise DirectoryUnavailable("; ".join(failures))
        return None

    def close(self) -> None:
        for source in self.sources:
            source.close()
        if self.discovery is not None:
            self.discovery.close()  # its tables are among the sources; this ends its pool


def source_name(source: object) -> str:
    return str(getattr(source, "name", type(source).__name__))


def open_store(
    settings: DirectorySettings,
    *,
    create: bool = True,
    stats: LookupStats | None = None,
    memory_index: bool = True,
    compact_index: bool = False,
) -> MailboxStore:
    """The writable store the settings name: PostgreSQL when `postgresql` is set (psycopg
    is imported only then), else the SQLite file (created if missing and `create`;
    memory_index: a daemon's store, see sqlite_memory_index; compact_index:
    sqlite_compact_index). Raises DirectoryError."""
    fold_case = not settings.case_sensitive_local_parts
    if settings.postgresql:
        from traqmilter.directory.postgresql import PostgresDirectory

        return PostgresDirectory(
            settings.postgresql,
            password_file=settings.postgresql_password_file,
            fold_case=fold_case,
            timeout=settings.postgresql_timeout,
            stats=stats,
        )
    return SqliteDirectory(
        settings.sqlite,
        create=create,
        fold_case=fold_case,
        memory_index=memory_index,
        compact_index=compact_index,
    )


def open_directory(
    settings: DirectorySettings,
    *,
    postfix_config_dir: str,
    clock: Callable[[], float] = time.monotonic,
    create: bool = True,
    stats: LookupStats | None = None,
) -> CompositeDirectory:
    """Open every source the settings name. Raises DirectoryError when the writable store
    cannot be opened and ValueError for a map or list spec traqmilter cannot follow; a map
    or list that cannot be read yet does not stop start-up (its lookups tempfail until it
    can; each source's last_error says why, for `traqmilter check`). Postfix tables are
    read against the instance in postfix_config_dir (postfix.config_dir). `stats` collects
    the lookups of a PostgreSQL store (the metrics read it)."""
    fold_case = not settings.case_sensitive_local_parts
    store = open_store(
        settings,
        create=create,
        stats=stats,
        memory_index=settings.sqlite_memory_index,
        compact_index=settings.sqlite_compact_index,
    )
    sources: list[ClosableDirectory] = [store]
    try:
        for spec in settings.postfix_maps:
            sources.append(
                PostfixMapSource(
                    spec,
                    config_dir=postfix_config_dir,
                    reload_check_interval=settings.reload_check_interval,
                    clock=clock,
                )
            )
        for path in settings.address_lists:
            sources.append(
                AddressListSource(
                    path,
                    fold_case=fold_case,
                    reload_check_interval=settings.reload_check_interval,
                    clock=clock,
                )
            )
        if settings.postfix == "auto":  # "" (a Config not loaded from a file): none
            discovery = discover_postfix(
                postfix_config_dir,
                reload_check_interval=settings.reload_check_interval,
                clock=clock,
            )
            # Tables asked per address cost a process each: after every table in memory.
            sources.extend(t for t in discovery.tables if not isinstance(t.source, AskedTable))
            sources.extend(t for t in discovery.tables if isinstance(t.source, AskedTable))
        else:
            discovery = None
    except BaseException:
        for source in sources:
            source.close()
        raise
    return CompositeDirectory(sources, store=store, discovery=discovery)
