"""CompositeDirectory and open_directory(): several sources, one answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.core.settings import DirectorySettings
from traqmilter.directory import (
    AddressListSource,
    CompositeDirectory,
    DirectoryError,
    PostfixMapSource,
    SqliteDirectory,
    open_directory,
)

from .fakes import InMemoryDirectory
from .helpers import make_table, postfix_config_dir, write_table

CASES = [
    # label, sources as (known keys, unavailable), key, want ("known", "unknown", "unavailable")
    ("first source knows", [({"a@x.example"}, False), (set(), False)], "a@x.example", "known"),
    ("second source knows", [(set(), False), ({"a@x.example"}, False)], "a@x.example", "known"),
    ("nobody knows", [(set(), False), (set(), False)], "a@x.example", "unknown"),
    (
        "broken source, another knows",
        [(set(), True), ({"a@x.example"}, False)],
        "a@x.example",
        "known",
    ),
    ("broken source, nobody knows", [(set(), True), (set(), False)], "a@x.example", "unavailable"),
    ("every source broken", [(set(), True), (set(), True)], "a@x.example", "unavailable"),
    ("no sources", [], "a@x.example", "unknown"),
]


@pytest.mark.parametrize(("label", "sources", "key", "want"), CASES, ids=[c[0] for c in CASES])
def test_composite(label: str, sources: list[tuple[set[str], bool]], key: str, want: str) -> None:
    composite = CompositeDirectory(
        [InMemoryDirectory(keys, unavailable=broken) for keys, broken in sources]
    )
    if want == "unavailable":
        with pytest.raises(DirectoryUnavailable):
            composite.contains(key)
    else:
        assert composite.contains(key) is (want == "known")


def test_first_yes_ends_the_lookup() -> None:
    first, second = InMemoryDirectory(["a@x.example"]), InMemoryDirectory()
    assert CompositeDirectory([first, second]).contains("a@x.example")
    assert (first.lookups, second.lookups) == (["a@x.example"], [])


def test_composite_without_a_store_says_so() -> None:
    with pytest.raises(DirectoryError, match="no writable"):
        CompositeDirectory([InMemoryDirectory()]).store.close()


def test_close_closes_every_source() -> None:
    sources = [InMemoryDirectory(), InMemoryDirectory()]
    CompositeDirectory(sources).close()
    assert all(s.closed for s in sources)


def test_open_directory_builds_every_configured_source(tmp_path: Path) -> None:
    address_list = tmp_path / "addresses"
    write_table(address_list, ["Listed@Example.com"])
    settings = DirectorySettings(
        sqlite=str(tmp_path / "directory.sqlite"),
        postfix_maps=(make_table(tmp_path, "hash", ["mapped@example.com"]),),
        address_lists=(str(address_list),),
    )
    directory = open_directory(settings, postfix_config_dir=postfix_config_dir(tmp_path))
    assert [type(s) for s in directory.sources] == [
        SqliteDirectory,
        PostfixMapSource,
        AddressListSource,
    ]
    assert directory.store is directory.sources[0]
    directory.store.bulk_add(["stored@example.com"])
    for key in ("stored@example.com", "mapped@example.com", "listed@example.com"):
        assert directory.contains(key), key
    assert not directory.contains("nobody@example.com")
    directory.close()


def test_open_directory_case_sensitive_local_parts(tmp_path: Path) -> None:
    address_list = tmp_path / "addresses"
    write_table(address_list, ["Listed@Example.com"])
    settings = DirectorySettings(
        sqlite=str(tmp_path / "directory.sqlite"),
        address_lists=(str(address_list),),
        case_sensitive_local_parts=True,
    )
    directory = open_directory(settings, postfix_config_dir=postfix_config_dir(tmp_path))
    assert directory.contains("Listed@example.com")
    assert not directory.contains("listed@example.com")
    assert not directory.store.fold_case
    directory.close()


def test_open_directory_with_an_unreadable_map_starts_but_tempfails(tmp_path: Path) -> None:
    settings = DirectorySettings(
        sqlite=str(tmp_path / "directory.sqlite"),
        postfix_maps=(f"hash:{tmp_path / 'missing'}",),
    )
    directory = open_directory(settings, postfix_config_dir=postfix_config_dir(tmp_path))
    directory.store.bulk_add(["stored@example.com"])
    assert directory.contains("stored@example.com")
    with pytest.raises(DirectoryUnavailable):
        directory.contains("nobody@example.com")
    directory.close()


def test_open_directory_refuses_a_map_it_cannot_list(tmp_path: Path) -> None:
    settings = DirectorySettings(
        sqlite=str(tmp_path / "directory.sqlite"),
        postfix_maps=("regexp:/etc/postfix/virtual_regexp",),
    )
    with pytest.raises(ValueError, match="regexp"):
        open_directory(settings, postfix_config_dir=postfix_config_dir(tmp_path))
