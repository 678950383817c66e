"""One contract, every Directory: the SQLite store, the PostgreSQL store (on the session's
private cluster), Postfix tables of each type, address lists, the composite and the
in-memory fake must answer alike, so the fake cannot drift."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.postgresql import PgDatabase
from traqmilter.core.engine import Directory, DirectoryUnavailable
from traqmilter.directory import (
    AddressListSource,
    CompositeDirectory,
    PostfixMapSource,
    SqliteDirectory,
)
from traqmilter.directory.postgresql import PostgresDirectory

from .fakes import InMemoryDirectory
from .helpers import MAP_TYPES, make_table, postfix_config_dir, write_table

KNOWN = ("alice@example.com", "bob.smith@example.com", "user+tag@example.com", "@catch.example")

CASES = [
    # label, key, want_known
    ("exact address", "alice@example.com", True),
    ("dotted local part", "bob.smith@example.com", True),
    ("other local part", "carol@example.com", False),
    ("same local part, other domain", "alice@example.org", False),
    ("prefix of a known local part", "alic@example.com", False),
    ("known local part as suffix", "xalice@example.com", False),
    ("full key with extension", "user+tag@example.com", True),
    ("base address is not implied by an extension key", "user@example.com", False),
    ("other extension", "user+other@example.com", False),
    ("catch-all domain", "anyone@catch.example", True),
    ("catch-all covers odd local parts", "a.b-c_d@catch.example", True),
    ("catch-all does not cover subdomains", "anyone@sub.catch.example", False),
    ("catch-all does not cover parent domain", "anyone@example", False),
    ("bare domain", "example.com", False),
    ("bare local part", "alice", False),
]

Factory = Callable[[Path, tuple[str, ...]], Directory]


def _sqlite(
    tmp_path: Path, keys: tuple[str, ...], *, compact_index: bool = False
) -> SqliteDirectory:
    store = SqliteDirectory(str(tmp_path / "directory.sqlite"), compact_index=compact_index)
    store.bulk_add(k for k in keys if not k.startswith("@"))
    for key in keys:
        if key.startswith("@"):
            store.add_alias(key, "admin@example.com")
    return store


def _sqlite_index(tmp_path: Path, keys: tuple[str, ...]) -> SqliteDirectory:
    # The same store answering from its memory index (the other one may still be reading it).
    store = _sqlite(tmp_path, keys)
    assert store.load_index()
    return store


def _sqlite_compact_index(tmp_path: Path, keys: tuple[str, ...]) -> SqliteDirectory:
    # The memory index of hashes, every known key confirmed by SQLite.
    store = _sqlite(tmp_path, keys, compact_index=True)
    assert store.load_index()
    return store


def _table(map_type: str) -> Factory:
    def build(tmp_path: Path, keys: tuple[str, ...]) -> Directory:
        return PostfixMapSource(
            make_table(tmp_path, map_type, keys),
            config_dir=postfix_config_dir(tmp_path),
            background=False,
        )

    return build


def _address_list(tmp_path: Path, keys: tuple[str, ...]) -> Directory:
    path = tmp_path / "addresses"
    write_table(path, ("# known addresses", *keys))
    return AddressListSource(str(path), background=False)


def _composite(tmp_path: Path, keys: tuple[str, ...]) -> Directory:
    # The keys spread over several sources, one of them empty.
    half = len(keys) // 2
    return CompositeDirectory(
        [
            InMemoryDirectory(),
            _sqlite(tmp_path, keys[:half]),
            InMemoryDirectory(keys[half:]),
        ]
    )


def _fake(tmp_path: Path, keys: tuple[str, ...]) -> Directory:
    return InMemoryDirectory(keys)


FACTORIES: dict[str, Factory] = {
    "sqlite": _sqlite,
    "sqlite-index": _sqlite_index,
    "sqlite-compact-index": _sqlite_compact_index,
    **{f"postfix-{t}": _table(t) for t in MAP_TYPES},
    "address-list": _address_list,
    "composite": _composite,
    "fake": _fake,
}


def _unavailable_sqlite(tmp_path: Path) -> Directory:
    store = SqliteDirectory(str(tmp_path / "directory.sqlite"))
    store.close()
    return store


def _unavailable_table(tmp_path: Path) -> Directory:
    return PostfixMapSource(
        f"hash:{tmp_path / 'missing'}", config_dir=postfix_config_dir(tmp_path), background=False
    )


def _unavailable_list(tmp_path: Path) -> Directory:
    return AddressListSource(str(tmp_path / "missing"), background=False)


def _unavailable_composite(tmp_path: Path) -> Directory:
    return CompositeDirectory(
        [InMemoryDirectory(["someone@example.com"]), InMemoryDirectory(unavailable=True)]
    )


UNAVAILABLE: dict[str, Callable[[Path], Directory]] = {
    "sqlite": _unavailable_sqlite,
    "postfix-table": _unavailable_table,
    "address-list": _unavailable_list,
    "composite": _unavailable_composite,
    "fake": lambda tmp_path: InMemoryDirectory(unavailable=True),
}


def _close(directory: Directory) -> None:
    close = getattr(directory, "close", None)
    if close is not None:
        close()


def _postgresql(database: PgDatabase, keys: tuple[str, ...]) -> Directory:
    # Written as the SQLite store's are, through the store's own methods.
    store = PostgresDirectory(database.conninfo, timeout=5.0)  # a loaded machine: no tempfail
    store.bulk_add(k for k in keys if not k.startswith("@"))
    for key in keys:
        if key.startswith("@"):
            store.add_alias(key, "admin@example.com")
    return store


def _unavailable_postgresql(database: PgDatabase) -> Directory:
    # The server refuses: the store's database is gone (its connections ended with it).
    store = PostgresDirectory(database.conninfo)
    database.cluster.drop_database(database.name)
    return store


def _build(request: pytest.FixtureRequest, tmp_path: Path, keys: tuple[str, ...]) -> Directory:
    if request.param == "postgresql":
        return _postgresql(request.getfixturevalue("pg_database"), keys)
    return FACTORIES[request.param](tmp_path, keys)


@pytest.fixture(params=sorted([*FACTORIES, "postgresql"]))
def directory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Directory]:
    built = _build(request, tmp_path, KNOWN)
    yield built
    _close(built)


@pytest.mark.parametrize(("label", "key", "want_known"), CASES, ids=[c[0] for c in CASES])
def test_contains(directory: Directory, label: str, key: str, want_known: bool) -> None:
    assert directory.contains(key) is want_known, label


def test_every_known_key_is_found_again(directory: Directory) -> None:
    for key in KNOWN:
        if not key.startswith("@"):
            assert directory.contains(key) is True, key


@pytest.fixture(params=sorted([*FACTORIES, "postgresql"]))
def empty_directory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Directory]:
    built = _build(request, tmp_path, ())
    yield built
    _close(built)


def test_empty_directory_knows_nobody(empty_directory: Directory) -> None:
    assert empty_directory.contains("alice@example.com") is False


@pytest.mark.parametrize("kind", sorted([*UNAVAILABLE, "postgresql"]))
def test_unavailable_raises_and_never_says_unknown(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "postgresql":
        broken = _unavailable_postgresql(request.getfixturevalue("pg_database"))
    else:
        broken = UNAVAILABLE[kind](tmp_path)
    try:
        with pytest.raises(DirectoryUnavailable):
            broken.contains("nobody@example.com")
    finally:
        _close(broken)
