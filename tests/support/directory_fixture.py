"""A SQLite recipient directory for Postfix tests, written by traqmilter's own store
(traqmilter/directory/sqlite.py owns the schema), with the file mode a deployment needs."""

from __future__ import annotations

import grp
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from traqmilter.core.address import parse_address
from traqmilter.directory.sqlite import SqliteDirectory


def create_directory(
    path: Path,
    *,
    domains: Iterable[str],
    mailboxes: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> Path:
    """Create the SQLite file at `path` with the given domains, mailboxes and aliases.

    Mailboxes are "local@domain" strings; aliases map an address to its target. The file
    gets group `postfix` and mode 0660, as in a deployment: Postfix's daemons read it as
    user `postfix`. Put it in a directory made by prepare_sqlite_directory().
    """
    store = SqliteDirectory(str(path))
    try:
        store.sync_domains(domains)
        for address in mailboxes:
            store.add_mailbox(parse_address(address))
        for address, target in (aliases or {}).items():
            store.add_alias(address, target)
    finally:
        store.close()
    os.chown(path, -1, grp.getgrnam("postfix").gr_gid)
    os.chmod(path, 0o660)
    return path
