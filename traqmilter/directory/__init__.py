"""The recipient directory: which local addresses exist (SPEC section 3).

open_directory() builds what the config names: the SQLite store (always; it is the
writable one `create` and `traqmilter mailbox` use, and Postfix reads it through sqlite:
maps), then any followed Postfix tables and address lists. A recipient is known when any
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
from traqmilter.directory.sqlite import (
    DirectoryError,
    Mailbox,
    SchemaVersionError,
    SqliteDirectory,
    maildir_path,
)

__all__ = [
    "AddressListSource",
    "CompositeDirectory",
    "DirectoryError",
    "DirectoryUnavailable",
    "Mailbox",
    "PostfixMapSource",
    "SchemaVersionError",
    "SqliteDirectory",
    "maildir_path",
    "open_directory",
]


class ClosableDirectory(Directory, Protocol):
    def close(self) -> None: ...


class CompositeDirectory:
    """Known if any source knows the key; sources are asked in order and the first "yes"
    ends the lookup (put the fastest, most complete source first)."""

    def __init__(
        self, sources: Sequence[ClosableDirectory], *, sqlite: SqliteDirectory | None = None
    ) -> None:
        self.sources = tuple(sources)
        self._sqlite = sqlite

    @property
    def sqlite(self) -> SqliteDirectory:
        """The writable store, for `create`, postmaster aliases and the admin commands."""
        if self._sqlite is None:
            raise DirectoryError("this directory has no writable SQLite store")
        return self._sqlite

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

    def close(self) -> None:
        for source in self.sources:
            source.close()


def open_directory(
    settings: DirectorySettings,
    *,
    postfix_config_dir: str,
    clock: Callable[[], float] = time.monotonic,
    create: bool = True,
) -> CompositeDirectory:
    """Open every source the settings name. Raises DirectoryError when the SQLite store
    cannot be opened and ValueError for a map or list spec traqmilter cannot follow; a map
    or list that cannot be read yet does not stop start-up (its lookups tempfail until it
    can; each source's last_error says why, for `traqmilter check`). Postfix tables are
    read against the instance in postfix_config_dir (postfix.config_dir)."""
    fold_case = not settings.case_sensitive_local_parts
    store = SqliteDirectory(
        settings.sqlite,
        create=create,
        fold_case=fold_case,
        memory_index=settings.sqlite_memory_index,
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
    except BaseException:
        for source in sources:
            source.close()
        raise
    return CompositeDirectory(sources, sqlite=store)
