"""A minimal SQLite recipient directory for tests, in the schema of SCHEMA.md.

The real store (traqmilter/directory/sqlite.py) owns the schema; this helper only writes
the rows Postfix's sqlite: maps read, so Postfix tests do not depend on that module. It
follows the same layout: lower-case keys, Maildir "domain/local/", WAL journal.
"""

from __future__ import annotations

import grp
import os
import sqlite3
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

SCHEMA_SQL = """
PRAGMA user_version = 1;
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
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(SCHEMA_SQL)
        with connection:
            connection.executemany(
                "INSERT INTO domains (name) VALUES (?)", [(d.lower(),) for d in domains]
            )
            for address in mailboxes:
                add_mailbox(connection, address)
            for address, target in (aliases or {}).items():
                connection.execute(
                    "INSERT INTO aliases (address, target) VALUES (?, ?)",
                    (address.lower(), target),
                )
    finally:
        connection.close()
    os.chown(path, -1, grp.getgrnam("postfix").gr_gid)
    os.chmod(path, 0o660)
    return path


def add_mailbox(connection: sqlite3.Connection, address: str) -> None:
    """Insert one active mailbox row for `address` ("local@domain")."""
    local_part, _, domain = address.lower().rpartition("@")
    connection.execute(
        "INSERT INTO mailboxes (address, local_part, domain, maildir, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (
            f"{local_part}@{domain}",
            local_part,
            domain,
            f"{domain}/{local_part}/",
            datetime.now(UTC).isoformat(timespec="seconds"),
        ),
    )
