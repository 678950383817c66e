"""The SQLite store: schema, lookups, administration, the create action's safety."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from traqmilter.core.address import Address, parse_address
from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.directory import DirectoryError, SchemaVersionError, SqliteDirectory
from traqmilter.directory.store import maildir_path
from traqmilter.postfix_tools import postfix_command

from .helpers import POSTMAP, address, postfix_config_dir, write_table

EXPECTED_COLUMNS = {
    # table: [(name, type, notnull, default, pk)] as PRAGMA table_info reports them
    "domains": [("name", "TEXT", 1, None, 1)],
    "mailboxes": [
        ("address", "TEXT", 1, None, 1),
        ("local_part", "TEXT", 1, None, 0),
        ("domain", "TEXT", 1, None, 0),
        ("maildir", "TEXT", 1, None, 0),
        ("quota_bytes", "INTEGER", 1, "0", 0),
        ("active", "INTEGER", 1, "1", 0),
        ("settings", "TEXT", 1, "'{}'", 0),
        ("created_by", "TEXT", 1, "'admin'", 0),
        ("created_at", "TEXT", 1, None, 0),
    ],
    "aliases": [
        ("address", "TEXT", 1, None, 1),
        ("target", "TEXT", 1, None, 0),
        ("active", "INTEGER", 1, "1", 0),
        ("created_by", "TEXT", 1, "'admin'", 0),
    ],
}

FIXED_NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "directory.sqlite"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteDirectory]:
    opened = SqliteDirectory(str(db_path), wall_clock=lambda: FIXED_NOW)
    yield opened
    opened.close()


def _raw(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path, isolation_level=None)


# --- schema ------------------------------------------------------------------------------


def test_new_file_has_exactly_the_documented_schema(store: SqliteDirectory, db_path: Path) -> None:
    conn = _raw(db_path)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == set(EXPECTED_COLUMNS)
    for table, want in EXPECTED_COLUMNS.items():
        got = [tuple(row[1:]) for row in conn.execute(f"PRAGMA table_info({table})")]
        assert got == want, table
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_new_file_is_readable_and_writable_by_owner_and_group_only(
    store: SqliteDirectory, db_path: Path
) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o660


def test_reopen_keeps_data(db_path: Path) -> None:
    first = SqliteDirectory(str(db_path))
    first.bulk_add(["alice@example.com"])
    first.close()
    again = SqliteDirectory(str(db_path), create=False)
    assert again.contains("alice@example.com")
    again.close()


@pytest.mark.parametrize(
    ("label", "prepare", "create", "want_error", "want_text"),
    [
        ("missing file without create", None, False, DirectoryError, "no such"),
        ("empty database without create", "", False, DirectoryError, "not an initialised"),
        (
            "newer schema version",
            "PRAGMA user_version = 2",
            True,
            SchemaVersionError,
            "newer traqmilter",
        ),
        (
            "somebody else's database",
            "CREATE TABLE users (name TEXT)",
            True,
            DirectoryError,
            "did not create",
        ),
    ],
)
def test_open_refuses(
    db_path: Path,
    label: str,
    prepare: str | None,
    create: bool,
    want_error: type[Exception],
    want_text: str,
) -> None:
    if prepare is not None:
        conn = _raw(db_path)
        if prepare:
            conn.execute(prepare)
        conn.close()
    with pytest.raises(want_error, match=want_text):
        SqliteDirectory(str(db_path), create=create)


def test_unopenable_path_is_a_directory_error(tmp_path: Path) -> None:
    with pytest.raises(DirectoryError):
        SqliteDirectory(str(tmp_path / "no" / "such" / "dir" / "directory.sqlite"))


# --- lookups -----------------------------------------------------------------------------

LOOKUP_ROWS = [
    # (table, key, active)
    ("mailboxes", "alice@example.com", 1),
    ("mailboxes", "gone@example.com", 0),
    ("aliases", "sales@example.com", 1),
    ("aliases", "old@example.com", 0),
    ("aliases", "@alias-catch.example", 1),
    ("mailboxes", "@box-catch.example", 1),
    ("aliases", "@dead-catch.example", 0),
    ("mailboxes", "moved@example.com", 0),
    ("aliases", "moved@example.com", 1),
    ("mailboxes", "left@alias-catch.example", 0),
    ("mailboxes", "bob@dead-catch.example", 1),
    ("aliases", "old@box-catch.example", 0),
]


def insert_lookup_rows(db_path: Path) -> None:
    """LOOKUP_ROWS written by another writer (as Postfix's admin tools or psql would)."""
    conn = _raw(db_path)
    for table, row_key, active in LOOKUP_ROWS:
        if table == "mailboxes":
            conn.execute(
                "INSERT INTO mailboxes (address, local_part, domain, maildir, active, created_at)"
                " VALUES (?, '', '', 'x/y/', ?, '')",
                (row_key, active),
            )
        else:
            conn.execute(
                "INSERT INTO aliases (address, target, active) VALUES (?, 'a@example.com', ?)",
                (row_key, active),
            )
    conn.close()


LOOKUP_CASES = [
    ("active mailbox", "alice@example.com", True),
    ("inactive mailbox", "gone@example.com", False),
    ("active alias", "sales@example.com", True),
    ("inactive alias", "old@example.com", False),
    ("catch-all alias", "x@alias-catch.example", True),
    ("catch-all mailbox", "x@box-catch.example", True),
    ("inactive catch-all", "x@dead-catch.example", False),
    ("inactive mailbox, active alias of the same key", "moved@example.com", True),
    ("inactive mailbox, active catch-all alias", "left@alias-catch.example", True),
    ("active mailbox, inactive catch-all", "bob@dead-catch.example", True),
    ("inactive alias, active catch-all mailbox", "old@box-catch.example", True),
    ("a catch-all key itself", "@alias-catch.example", True),
    ("nobody", "nobody@example.com", False),
    ("lookups are exact: no folding at lookup time", "ALICE@example.com", False),
]


@pytest.mark.parametrize(
    ("label", "key", "want_known"), LOOKUP_CASES, ids=[c[0] for c in LOOKUP_CASES]
)
def test_contains(
    store: SqliteDirectory, db_path: Path, label: str, key: str, want_known: bool
) -> None:
    insert_lookup_rows(db_path)
    assert store.contains(key) is want_known


def test_lookup_sees_rows_written_by_another_process(db_path: Path) -> None:
    """Within lookup_cache_seconds a cached answer may be stale; after it, never."""
    now = [100.0]
    store = SqliteDirectory(str(db_path), lookup_cache_seconds=1.0, monotonic_clock=lambda: now[0])
    assert not store.contains("late@example.com")
    other = SqliteDirectory(str(db_path))
    other.bulk_add(["late@example.com"])
    other.close()
    now[0] += 1.0
    assert store.contains("late@example.com")
    store.close()


def test_lookup_cache_zero_seconds_checks_before_every_lookup(db_path: Path) -> None:
    store = SqliteDirectory(str(db_path), lookup_cache_seconds=0, monotonic_clock=lambda: 5.0)
    assert not store.contains("late@example.com")
    conn = _raw(db_path)
    conn.execute(
        "INSERT INTO aliases (address, target, active) VALUES ('late@example.com', 'a@b.c', 1)"
    )
    assert store.contains("late@example.com")
    conn.execute("UPDATE aliases SET active = 0")
    conn.close()
    assert not store.contains("late@example.com")
    store.close()


def test_writes_through_the_store_invalidate_its_lookup_cache_at_once(db_path: Path) -> None:
    frozen = SqliteDirectory(str(db_path), lookup_cache_seconds=3600, monotonic_clock=lambda: 0.0)
    assert not frozen.contains("new@shop.example")
    assert frozen.create_from_template(parse_address("new@shop.example"), "default")
    assert frozen.contains("new@shop.example")
    assert frozen.remove_mailbox("new@shop.example")
    assert not frozen.contains("new@shop.example")
    frozen.add_mailbox(parse_address("alice@example.com"))
    frozen.add_alias("sales@example.com", "alice@example.com")
    assert frozen.contains("alice@example.com") and frozen.contains("sales@example.com")
    frozen.close()


def test_lookups_leave_no_read_transaction_open(store: SqliteDirectory, db_path: Path) -> None:
    # A snapshot held between lookups would hide other processes' writes and keep every
    # checkpoint from emptying the WAL; TRUNCATE reports busy (1) if any reader holds one.
    store.bulk_add(["alice@example.com"])
    other = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    for key, want_known in (("alice@example.com", True), ("nobody@example.com", False)):
        other.execute("INSERT INTO domains (name) VALUES (?)", (key.partition("@")[0],))
        assert store.contains(key) is want_known
        assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0), key
    other.close()


def test_lookup_on_closed_store_is_unavailable(store: SqliteDirectory) -> None:
    store.close()
    with pytest.raises(DirectoryUnavailable):
        store.contains("alice@example.com")


# --- mailboxes ---------------------------------------------------------------------------


def test_add_and_get_mailbox(store: SqliteDirectory) -> None:
    added = store.add_mailbox(
        parse_address("Alice+news@Example.COM"), quota_bytes=1024, settings={"lang": "de"}
    )
    got = store.get_mailbox("ALICE@example.com")
    assert got == added
    assert got is not None
    assert (got.address, got.local_part, got.domain, got.maildir) == (
        "alice@example.com",
        "alice",
        "example.com",
        "example.com/alice/",
    )
    assert (got.quota_bytes, got.active, got.settings) == (1024, True, {"lang": "de"})
    assert (got.created_by, got.created_at) == ("admin", "2026-01-01T00:00:00Z")
    assert store.contains("alice@example.com")


@pytest.mark.parametrize(
    ("label", "kwargs", "want_error"),
    [
        ("negative quota", {"quota_bytes": -1}, ValueError),
        ("unknown creator", {"created_by": "mallory"}, ValueError),
        ("settings not JSON", {"settings": {"x": object()}}, TypeError),
    ],
)
def test_add_mailbox_refuses_bad_values(
    store: SqliteDirectory, label: str, kwargs: dict[str, object], want_error: type[Exception]
) -> None:
    with pytest.raises(want_error):
        store.add_mailbox(parse_address("alice@example.com"), **kwargs)  # type: ignore[arg-type]
    assert store.get_mailbox("alice@example.com") is None


def test_add_existing_mailbox_is_an_error(store: SqliteDirectory) -> None:
    store.add_mailbox(parse_address("alice@example.com"))
    with pytest.raises(DirectoryError, match="already exists"):
        store.add_mailbox(parse_address("alice@example.com"))


def test_case_sensitive_store_keeps_local_case(db_path: Path) -> None:
    store = SqliteDirectory(str(db_path), fold_case=False)
    store.add_mailbox(parse_address("Alice@example.com", fold_case=False))
    assert store.contains("Alice@example.com")
    assert not store.contains("alice@example.com")
    assert store.get_mailbox("Alice@EXAMPLE.com") is not None
    assert store.get_mailbox("alice@example.com") is None
    store.close()


def test_remove_mailbox(store: SqliteDirectory) -> None:
    store.add_mailbox(parse_address("alice@example.com"))
    assert store.remove_mailbox("Alice@Example.com") is True
    assert store.remove_mailbox("alice@example.com") is False
    assert not store.contains("alice@example.com")


def test_list_mailboxes_pages_in_address_order(store: SqliteDirectory) -> None:
    store.bulk_add(["c@example.com", "a@example.com", "b@example.org", "d@example.com"])
    assert [m.address for m in store.list_mailboxes()] == [
        "a@example.com",
        "b@example.org",
        "c@example.com",
        "d@example.com",
    ]
    assert [m.address for m in store.list_mailboxes("EXAMPLE.com", limit=2, offset=1)] == [
        "c@example.com",
        "d@example.com",
    ]
    assert store.list_mailboxes("example.net") == []
    assert store.count_mailboxes() == 4
    with pytest.raises(ValueError):
        store.list_mailboxes(limit=-1)


def test_bulk_add_is_all_or_nothing(store: SqliteDirectory) -> None:
    assert store.bulk_add(["a@example.com", "B@Example.com", "a@example.com"]) == 2
    assert store.contains("b@example.com")
    with pytest.raises(ValueError):
        store.bulk_add(["new@example.com", "../evil@example.com"])
    assert not store.contains("new@example.com")
    assert store.count_mailboxes() == 2


# --- aliases and domains -----------------------------------------------------------------


def test_aliases(store: SqliteDirectory) -> None:
    store.add_alias("Sales@Example.com", "alice@example.com, bob@example.com")
    assert store.get_alias("sales@example.com") == "alice@example.com, bob@example.com"
    assert store.contains("sales@example.com")
    with pytest.raises(DirectoryError, match="already exists"):
        store.add_alias("sales@example.com", "carol@example.com")
    assert store.remove_alias("sales@example.com") is True
    assert store.remove_alias("sales@example.com") is False
    assert not store.contains("sales@example.com")


@pytest.mark.parametrize(
    ("key", "target"),
    [
        ("sales@example.com", ""),
        ("sales@example.com", "a@example.com\r\nBcc: x@evil.example"),
        ("sales", "a@example.com"),
        ("sales@bad..domain", "a@example.com"),
        ("sa\x00les@example.com", "a@example.com"),
    ],
)
def test_add_alias_refuses_bad_input(store: SqliteDirectory, key: str, target: str) -> None:
    with pytest.raises(ValueError):
        store.add_alias(key, target)


def test_sync_domains_mirrors_the_config(store: SqliteDirectory) -> None:
    store.sync_domains(["Example.COM", "example.org", "bücher.example"])
    assert store.list_domains() == ["example.com", "example.org", "xn--bcher-kva.example"]
    store.sync_domains(["example.org", "example.net"])
    assert store.list_domains() == ["example.net", "example.org"]
    with pytest.raises(ValueError):
        store.sync_domains(["bad..domain"])
    assert store.list_domains() == ["example.net", "example.org"]


def test_postmaster_aliases(store: SqliteDirectory) -> None:
    store.add_mailbox(parse_address("postmaster@has-mailbox.example"))
    store.add_alias("postmaster@has-alias.example", "hostmaster@has-alias.example")
    domains = ["has-mailbox.example", "has-alias.example", "bare.example", "example.com"]

    changed = store.ensure_postmaster_aliases(domains, "postmaster@example.com")

    assert changed == ["bare.example"]  # example.com's postmaster is the target itself
    assert store.get_alias("postmaster@bare.example") == "postmaster@example.com"
    assert store.get_alias("postmaster@has-alias.example") == "hostmaster@has-alias.example"
    assert store.get_alias("postmaster@has-mailbox.example") is None
    assert store.get_alias("postmaster@example.com") is None
    assert store.ensure_postmaster_aliases(domains, "postmaster@example.com") == []

    # A changed target moves traqmilter's aliases, never the administrator's.
    changed = store.ensure_postmaster_aliases(domains, "admin@example.com")
    assert changed == ["bare.example", "example.com"]
    assert store.get_alias("postmaster@bare.example") == "admin@example.com"
    assert store.get_alias("postmaster@has-alias.example") == "hostmaster@has-alias.example"

    # A domain that is no longer local loses traqmilter's alias.
    store.ensure_postmaster_aliases(["example.com"], "admin@example.com")
    assert store.get_alias("postmaster@bare.example") is None
    assert store.get_alias("postmaster@has-alias.example") == "hostmaster@has-alias.example"


# --- the create action -------------------------------------------------------------------


def test_create_with_default_template(store: SqliteDirectory) -> None:
    assert store.create_from_template(parse_address("New+tag@Shop.example"), "default")
    box = store.get_mailbox("new@shop.example")
    assert box is not None
    assert (box.maildir, box.quota_bytes, box.settings, box.active, box.created_by) == (
        "shop.example/new/",
        0,
        {},
        True,
        "create",
    )
    assert store.contains("new@shop.example")
    assert not store.create_from_template(parse_address("new@shop.example"), "default")


@pytest.mark.parametrize("template", ["template@shop.example", "Template", "TEMPLATE@SHOP.example"])
def test_create_copies_the_template(store: SqliteDirectory, template: str) -> None:
    store.add_mailbox(
        parse_address("template@shop.example"), quota_bytes=5000, settings={"spam": "tag"}
    )
    assert store.create_from_template(parse_address("new@shop.example"), template)
    box = store.get_mailbox("new@shop.example")
    assert box is not None
    assert (box.quota_bytes, box.settings, box.active, box.created_by) == (
        5000,
        {"spam": "tag"},
        True,
        "create",
    )


def test_create_from_an_inactive_template_is_active(store: SqliteDirectory) -> None:
    # An inactive template (a common way to keep it from receiving mail) must not make
    # mailboxes that cannot receive the very mail they were created for.
    store.add_mailbox(parse_address("template@shop.example"), quota_bytes=7, active=False)
    assert store.create_from_template(parse_address("new@shop.example"), "template")
    assert store.contains("new@shop.example")
    box = store.get_mailbox("new@shop.example")
    assert box is not None and box.quota_bytes == 7


def test_create_from_missing_template_is_an_error(store: SqliteDirectory) -> None:
    with pytest.raises(DirectoryError, match="template"):
        store.create_from_template(parse_address("new@shop.example"), "nosuch")
    assert store.get_mailbox("new@shop.example") is None


UNSAFE = [
    ("parent directory", "../x@shop.example"),
    ("parent directory alone", "..@shop.example"),
    ("slash", "a/b@shop.example"),
    ("leading dot", ".hidden@shop.example"),
    ("dot dot inside", "a..b@shop.example"),
    ("leading hyphen", "-rf@shop.example"),
    ("very long", "a" * 65 + "@shop.example"),
    ("NUL", "a\x00b@shop.example"),
    ("newline", "a\nb@shop.example"),
    ("backslash", "a\\b@shop.example"),
    ("quoted with space", '"a b"@shop.example'),
    ("empty local part", "@shop.example"),
    ("non-ASCII", "zoë@shop.example"),
    ("absolute domain", "x@/etc"),
    ("domain with parent", "x@../etc"),
    ("domain with slash", "x@shop.example/.."),
    ("upper-case domain", "x@SHOP.example"),
    ("empty domain", "postmaster@"),
]


@pytest.mark.parametrize(("label", "key"), UNSAFE, ids=[c[0] for c in UNSAFE])
def test_create_refuses_path_tricks(store: SqliteDirectory, label: str, key: str) -> None:
    with pytest.raises(ValueError):
        store.create_from_template(address(key), "default")
    with pytest.raises(ValueError):
        store.add_mailbox(address(key))
    assert store.count_mailboxes() == 0


@pytest.mark.parametrize(
    ("local", "domain", "want"),
    [
        ("alice", "example.com", "example.com/alice/"),
        ("a.b_c-d+e=f", "mx-1.example.com", "mx-1.example.com/a.b_c-d+e=f/"),
        ("Alice", "example.com", "example.com/Alice/"),
        ("a" * 64, "example.com", f"example.com/{'a' * 64}/"),
    ],
)
def test_maildir_path(local: str, domain: str, want: str) -> None:
    assert maildir_path(local, domain) == want


def _create_concurrently(stores: list[SqliteDirectory], target: Address) -> list[bool]:
    barrier = threading.Barrier(len(stores))
    results: list[bool] = []
    lock = threading.Lock()

    def create(store: SqliteDirectory) -> None:
        barrier.wait()
        created = store.create_from_template(target, "default")
        with lock:
            results.append(created)

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("connections", ["one shared store", "a store per thread"])
def test_fifty_concurrent_creators_make_one_mailbox(db_path: Path, connections: str) -> None:
    first = SqliteDirectory(str(db_path))
    if connections == "one shared store":
        stores = [first] * 50
    else:
        stores = [first] + [SqliteDirectory(str(db_path)) for _ in range(49)]
    target = parse_address("race@shop.example")

    results = _create_concurrently(stores, target)

    assert sorted(results) == [False] * 49 + [True]
    rows = _raw(db_path).execute(
        "SELECT count(*) FROM mailboxes WHERE address = 'race@shop.example'"
    )
    assert rows.fetchone()[0] == 1
    for store in set(stores):
        store.close()


# --- Postfix reads the same file -----------------------------------------------------------

POSTFIX_QUERIES = {
    # The lines docs/directory.md gives for main.cf's sqlite: maps.
    "domains": "SELECT name FROM domains WHERE name='%s'",
    "mailboxes": "SELECT maildir FROM mailboxes WHERE address='%s' AND active=1",
    "aliases": "SELECT target FROM aliases WHERE address='%s' AND active=1",
}


@pytest.mark.parametrize(
    ("table", "key", "want"),
    [
        ("domains", "example.com", "example.com"),
        ("domains", "example.org", None),
        ("mailboxes", "alice@example.com", "example.com/alice/"),
        ("mailboxes", "gone@example.com", None),
        ("aliases", "postmaster@example.com", "alice@example.com"),
        ("aliases", "nobody@example.com", None),
    ],
)
def test_postfix_sqlite_maps_read_the_store(
    store: SqliteDirectory, tmp_path: Path, table: str, key: str, want: str | None
) -> None:
    store.sync_domains(["example.com"])
    store.add_mailbox(parse_address("alice@example.com"))
    store.add_mailbox(parse_address("gone@example.com"), active=False)
    store.ensure_postmaster_aliases(["example.com"], "alice@example.com")
    cf = tmp_path / f"sqlite-{table}.cf"
    write_table(cf, [f"dbpath = {store.path}", f"query = {POSTFIX_QUERIES[table]}"])
    assert POSTMAP is not None
    command = postfix_command(POSTMAP, postfix_config_dir(tmp_path), "-q", key, f"sqlite:{cf}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if want is None:
        assert (done.returncode, done.stdout) == (1, "")
    else:
        assert (done.returncode, done.stdout.strip()) == (0, want)


def test_lookup_cache_stays_within_its_bound_and_keeps_answering(db_path: Path) -> None:
    store = SqliteDirectory(str(db_path), lookup_cache_entries=32)
    store.bulk_add([f"user{i}@example.com" for i in range(0, 100, 2)])
    for round_number in range(2):
        for i in range(100):
            assert store.contains(f"user{i}@example.com") is (i % 2 == 0), (round_number, i)
            assert len(store._lookup_cache) <= 32
    store.close()
