"""The PostgreSQL store against a real private server: the SQLite store's administration
contract, the lookup cache and its invalidation across hosts, and failure semantics (a
failed or slow lookup raises DirectoryUnavailable, never answers "unknown")."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.fixtures import require
from tests.support.postgresql import PgDatabase, PostgresCluster, new_database, private_cluster
from traqmilter.core.address import parse_address
from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.core.settings import DirectorySettings
from traqmilter.directory import DirectoryError, SchemaVersionError, SqliteDirectory, open_directory
from traqmilter.directory.postgresql import SCHEMA_VERSION, PostgresDirectory, migrate

from .helpers import POSTMAP, address

WAIT_SECONDS = 10.0
# Lookups in tests that do not time them get a generous deadline: a loaded test machine
# must not turn a correct answer into DirectoryUnavailable.
SLACK_TIMEOUT = 5.0


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def _answers(store: PostgresDirectory, key: str) -> bool | None:
    """The answer, or None while the store tempfails."""
    try:
        return store.contains(key)
    except DirectoryUnavailable:
        return None


@pytest.fixture
def store(pg_database: PgDatabase) -> Iterator[PostgresDirectory]:
    opened = PostgresDirectory(
        pg_database.conninfo, wall_clock=lambda: 1_700_000_000.0, timeout=SLACK_TIMEOUT
    )
    assert opened.wait_listening(WAIT_SECONDS)
    yield opened
    opened.close()


# --- the same administration contract as the SQLite store -----------------------------


def _script(s: Any) -> list[Any]:
    """One administrator's session; every result (or error class) is recorded."""
    results: list[Any] = []

    def step(call: Callable[[], Any]) -> None:
        try:
            value = call()
        except (DirectoryError, ValueError) as exc:
            value = type(exc).__name__
        results.append(value)

    step(
        lambda: s.add_mailbox(parse_address("Alice@Example.COM"), quota_bytes=5, settings={"a": 1})
    )
    step(lambda: s.add_mailbox(parse_address("alice@example.com")))  # exists
    step(lambda: s.add_mailbox(address("../x@example.com")))  # unsafe maildir
    step(lambda: s.get_mailbox("ALICE@example.com"))
    step(
        lambda: s.bulk_add(["b@example.com", "c@example.org", "b@example.com", "alice@example.com"])
    )
    step(lambda: s.bulk_add(["bad"]))
    step(lambda: [m.address for m in s.list_mailboxes()])
    step(lambda: [m.address for m in s.list_mailboxes("EXAMPLE.org")])
    step(lambda: [m.address for m in s.list_mailboxes(limit=1, offset=1)])
    step(lambda: s.count_mailboxes())
    step(lambda: s.add_mailbox(parse_address("off@inactive.example"), active=False))
    step(lambda: s.mailbox_domains())  # of the active mailboxes only
    step(lambda: s.add_alias("@catch.example", "alice@example.com"))
    step(lambda: s.add_alias("@catch.example", "b@example.com"))  # exists
    step(lambda: s.add_alias("x@example.com", "bad\ntarget"))
    step(lambda: s.get_alias("@CATCH.example"))
    step(lambda: s.sync_domains(["example.com", "Example.org", "catch.example"]))
    step(lambda: s.sync_domains(["example.com", "catch.example"]))
    step(lambda: s.list_domains())
    step(lambda: s.ensure_postmaster_aliases(["example.com", "catch.example"], "alice@example.com"))
    step(lambda: s.ensure_postmaster_aliases(["example.com", "catch.example"], "alice@example.com"))
    step(lambda: s.ensure_postmaster_aliases(["example.com"], "b@example.com"))
    step(lambda: s.get_alias("postmaster@catch.example"))
    step(lambda: s.get_alias("postmaster@example.com"))
    step(lambda: s.create_from_template(parse_address("new@example.com"), "alice"))
    step(lambda: s.create_from_template(parse_address("new@example.com"), "alice"))
    step(lambda: s.create_from_template(parse_address("two@example.com"), "default"))
    step(lambda: s.create_from_template(parse_address("three@example.com"), "missing"))
    step(lambda: s.get_mailbox("new@example.com"))
    step(lambda: s.count_created())
    step(lambda: [s.contains(k) for k in ("new@example.com", "x@catch.example", "zz@example.com")])
    step(lambda: s.remove_mailbox("NEW@example.com"))
    step(lambda: s.remove_mailbox("new@example.com"))
    step(lambda: s.remove_alias("@catch.example"))
    step(lambda: [s.contains(k) for k in ("new@example.com", "x@catch.example")])
    return results


def test_administration_answers_as_the_sqlite_store(
    pg_database: PgDatabase, tmp_path: Path
) -> None:
    clock = lambda: 1_700_000_000.0  # noqa: E731
    sqlite = SqliteDirectory(str(tmp_path / "directory.sqlite"), wall_clock=clock)
    postgres = PostgresDirectory(pg_database.conninfo, wall_clock=clock, timeout=SLACK_TIMEOUT)
    try:
        want, got = _script(sqlite), _script(postgres)
    finally:
        sqlite.close()
        postgres.close()
    assert got == want
    assert "ValueError" in want and "DirectoryError" in want  # the script reaches errors


def test_schema_is_the_sqlite_stores(pg_database: PgDatabase, tmp_path: Path) -> None:
    """The schema is written twice, on purpose: the migrations are history (an applied one
    is never edited) and sqlite.SCHEMA_SQL is today's. They must describe the same tables:
    the same columns in the same order, nullability, defaults and primary keys (PostgreSQL's
    BIGINT holds what SQLite's INTEGER does)."""
    path = tmp_path / "directory.sqlite"
    SqliteDirectory(str(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master ORDER BY name")]
        want = {
            table: [
                (name, kind, bool(notnull), default, bool(pk))
                for _cid, name, kind, notnull, default, pk in conn.execute(
                    f"PRAGMA table_info({table})"
                )
            ]
            for table in tables
            if not table.startswith("sqlite_")
        }
    types = {"text": "TEXT", "integer": "INTEGER", "bigint": "INTEGER"}
    with psycopg.connect(pg_database.conninfo) as conn:
        keys = set(
            conn.execute(
                "SELECT u.table_name, u.column_name"
                " FROM information_schema.table_constraints c"
                " JOIN information_schema.key_column_usage u USING (constraint_name, table_name)"
                " WHERE c.constraint_type = 'PRIMARY KEY' AND c.table_schema = current_schema()"
            ).fetchall()
        )
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name <> 'traqmilter_schema' ORDER BY table_name, ordinal_position"
        ).fetchall()
    got: dict[str, list[tuple[Any, ...]]] = {}
    for table, name, kind, nullable, default in columns:
        got.setdefault(table, []).append(
            (
                name,
                types[kind],
                nullable == "NO",
                None if default is None else re.sub(r"::[a-z ]+$", "", default),
                (table, name) in keys,
            )
        )
    assert got == want


def test_case_sensitive_store_keeps_local_parts(pg_database: PgDatabase) -> None:
    store = PostgresDirectory(pg_database.conninfo, fold_case=False, timeout=SLACK_TIMEOUT)
    try:
        store.add_mailbox(parse_address("Bob@Example.com", fold_case=False))
        assert store.contains("Bob@example.com")
        assert not store.contains("bob@example.com")
        assert store.stored_key("Bob@EXAMPLE.com") == "Bob@example.com"
    finally:
        store.close()


@pytest.mark.parametrize("key", ["nul\x00@example.com", "surrogate\udcff@example.com"])
def test_keys_no_row_can_hold_are_unknown(store: PostgresDirectory, key: str) -> None:
    store.add_mailbox(parse_address("nul@example.com"))
    assert store.contains(key) is False


# --- the cache and its invalidation ----------------------------------------------------


def test_repeated_lookup_is_answered_from_the_cache(store: PostgresDirectory) -> None:
    store.add_mailbox(parse_address("alice@example.com"))

    def second_lookups_hit() -> bool:
        # The add's own notification may still empty the cache once: ask until it has.
        first = (store.contains("alice@example.com"), store.contains("nobody@example.com"))
        before = (store.stats.cache_hits, store.stats.known, store.stats.unknown)
        again = (store.contains("alice@example.com"), store.contains("nobody@example.com"))
        after = (store.stats.cache_hits, store.stats.known, store.stats.unknown)
        assert first == again == (True, False)
        return after == (before[0] + 2, before[1], before[2])

    wait_until(second_lookups_hit)


def test_a_write_on_one_host_reaches_the_other_hosts_cache(pg_database: PgDatabase) -> None:
    host_a = PostgresDirectory(pg_database.conninfo, timeout=SLACK_TIMEOUT)
    host_b = PostgresDirectory(pg_database.conninfo, timeout=SLACK_TIMEOUT)
    try:
        assert host_b.wait_listening(WAIT_SECONDS)
        assert host_b.contains("new@shop.example") is False  # cached as unknown on B
        assert host_b.contains("new@shop.example") is False
        assert host_a.create_from_template(parse_address("new@shop.example"), "default")
        wait_until(lambda: _answers(host_b, "new@shop.example"))
        # And a removal, made outside traqmilter (psql, an admin panel), the same way.
        with psycopg.connect(pg_database.conninfo, autocommit=True) as admin:
            admin.execute("DELETE FROM mailboxes WHERE address = 'new@shop.example'")
        wait_until(lambda: _answers(host_b, "new@shop.example") is False)
    finally:
        host_a.close()
        host_b.close()


def test_changes_made_while_the_listener_is_gone_are_seen(
    store: PostgresDirectory, pg_database: PgDatabase
) -> None:
    assert store.contains("late@example.com") is False  # cached as unknown
    with psycopg.connect(pg_database.conninfo, autocommit=True) as admin:
        # End every other connection of the database, the listener's among them, and
        # write before it can be back: no notification reaches this store.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        admin.execute(
            "INSERT INTO mailboxes (address, local_part, domain, maildir, created_at)"
            " VALUES ('late@example.com', 'late', 'example.com', 'example.com/late/', 'now')"
        )
    # The pooled connection died too: a lookup may tempfail once, never say "unknown".
    wait_until(lambda: _answers(store, "late@example.com"))
    assert store.wait_listening(WAIT_SECONDS)
    assert store.contains("late@example.com")


# --- failure semantics -------------------------------------------------------------------


def test_slow_lookup_tempfails_within_the_timeout(pg_database: PgDatabase) -> None:
    store = PostgresDirectory(pg_database.conninfo, timeout=0.3)
    store.add_mailbox(parse_address("alice@example.com"))
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(pg_database.conninfo) as other, other.transaction():
            other.execute("LOCK TABLE mailboxes IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(WAIT_SECONDS)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(WAIT_SECONDS)
        started = time.monotonic()
        with pytest.raises(DirectoryUnavailable, match=r"no answer within 0\.3 s"):
            store.contains("nobody@example.com")
        assert time.monotonic() - started < 2.0  # the lock is held for 10 s
        assert store.stats.errors == 1
    finally:
        release.set()
        holder.join()
    wait_until(lambda: _answers(store, "alice@example.com"))
    store.close()


def test_server_outage_tempfails_and_recovers_by_itself() -> None:
    with private_cluster() as cluster:
        database = new_database(cluster)
        store = PostgresDirectory(database.conninfo, timeout=0.5)
        try:
            store.add_mailbox(parse_address("alice@example.com"))
            assert store.wait_listening(WAIT_SECONDS)
            assert store.contains("alice@example.com")  # now cached
            cluster.stop()  # fast shutdown: every connection is ended
            wait_until(lambda: not store.stats.backend_up)
            for key in ("alice@example.com", "nobody@example.com"):  # cached or not
                started = time.monotonic()
                with pytest.raises(DirectoryUnavailable):
                    store.contains(key)
                assert time.monotonic() - started < 2.0
            cluster.start()
            wait_until(lambda: _answers(store, "alice@example.com"))
            assert store.contains("nobody@example.com") is False
            wait_until(lambda: store.stats.backend_up)
        finally:
            store.close()


# --- schema, migration, connection settings ---------------------------------------------


def test_uninitialised_database_is_refused_with_the_fix(postgres_cluster: PostgresCluster) -> None:
    database = new_database(postgres_cluster, migrate=False)
    try:
        with pytest.raises(DirectoryError, match="traqmilter directory init"):
            PostgresDirectory(database.conninfo)
        assert migrate(database.conninfo) == ["001-schema.sql"]
        assert migrate(database.conninfo) == []  # current: nothing to do
        PostgresDirectory(database.conninfo).close()
    finally:
        postgres_cluster.drop_database(database.name)


def test_foreign_tables_are_never_touched(postgres_cluster: PostgresCluster) -> None:
    database = new_database(postgres_cluster, migrate=False)
    try:
        with psycopg.connect(database.conninfo, autocommit=True) as conn:
            conn.execute("CREATE TABLE mailboxes (address TEXT)")
        with pytest.raises(DirectoryError, match="did not create"):
            migrate(database.conninfo)
    finally:
        postgres_cluster.drop_database(database.name)


def test_newer_schema_is_refused(pg_database: PgDatabase) -> None:
    with psycopg.connect(pg_database.conninfo, autocommit=True) as conn:
        conn.execute("INSERT INTO traqmilter_schema VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaVersionError, match="newer traqmilter"):
        PostgresDirectory(pg_database.conninfo)
    with pytest.raises(SchemaVersionError, match="newer traqmilter"):
        migrate(pg_database.conninfo)


def test_password_from_a_file(pg_database: PgDatabase, tmp_path: Path) -> None:
    cluster = pg_database.cluster
    without = f"host={cluster.host} port={cluster.port} user=traqmilter dbname={pg_database.name}"
    secret = tmp_path / "password"
    secret.write_text("wrong\n")
    with pytest.raises(DirectoryError, match="password authentication failed"):
        PostgresDirectory(without, password_file=str(secret))
    secret.write_text("traqmilter-test-secret\n")
    store = PostgresDirectory(without, password_file=str(secret))
    store.add_mailbox(parse_address("alice@example.com"))
    assert store.contains("alice@example.com")
    assert "secret" not in store.path
    store.close()


def test_unreachable_server_stops_start_up_with_a_clear_error() -> None:
    with (
        tempfile.TemporaryDirectory() as empty,
        pytest.raises(DirectoryError, match="cannot connect"),
    ):
        PostgresDirectory(f"host={empty} dbname=nothing user=nobody")


def test_open_directory_uses_postgresql_instead_of_sqlite(
    pg_database: PgDatabase, tmp_path: Path
) -> None:
    settings = DirectorySettings(
        sqlite=str(tmp_path / "never.sqlite"), postgresql=pg_database.conninfo
    )
    directory = open_directory(settings, postfix_config_dir=str(tmp_path))
    try:
        assert isinstance(directory.store, PostgresDirectory)
        assert directory.sources == (directory.store,)
        directory.store.add_mailbox(parse_address("alice@example.com"))
        assert directory.contains("alice@example.com")
    finally:
        directory.close()
    assert not (tmp_path / "never.sqlite").exists()


# --- Postfix reads the same tables ----------------------------------------------------------

CONTRIB = Path(__file__).resolve().parents[3] / "contrib" / "postfix"


@pytest.mark.parametrize(
    ("table", "key", "want"),
    [
        ("domains", "example.com", "example.com"),
        ("mailboxes", "alice@example.com", "example.com/alice/"),
        ("aliases", "postmaster@example.com", "alice@example.com"),
    ],
)
def test_postfix_pgsql_maps_read_the_store(
    store: PostgresDirectory,
    pg_database: PgDatabase,
    tmp_path: Path,
    table: str,
    key: str,
    want: str,
) -> None:
    if POSTMAP is None or not Path("/usr/lib/postfix/postfix-pgsql.so").exists():
        require("postmap and the pgsql: map type are missing (Debian package postfix-pgsql)")
    store.sync_domains(["example.com"])
    store.add_mailbox(parse_address("alice@example.com"))
    store.add_mailbox(parse_address("inactive@example.com"), active=False)
    store.ensure_postmaster_aliases(["example.com"], "alice@example.com")
    cluster = pg_database.cluster
    text = (CONTRIB / f"pgsql-{table}.cf").read_text()
    for placeholder, value in {
        "hosts = 127.0.0.1": f"hosts = {cluster.host}:{cluster.port}",
        "dbname = traqmilter": f"dbname = {pg_database.name}",
        "password = CHANGE-ME": "password = reader-test-secret",
    }.items():
        assert placeholder in text, placeholder
        text = text.replace(placeholder, value)
    (tmp_path / "map.cf").write_text(text)
    (tmp_path / "main.cf").write_text("")  # postmap's own config: none of the machine's
    query = [POSTMAP, "-c", str(tmp_path), "-q"]
    found = subprocess.run(
        [*query, key, f"pgsql:{tmp_path}/map.cf"], capture_output=True, text=True, timeout=30
    )
    assert (found.returncode, found.stdout.strip()) == (0, want), found.stderr
    missing = subprocess.run(
        [*query, "inactive@example.com", f"pgsql:{tmp_path}/map.cf"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1, missing.stderr  # inactive or absent: not found
