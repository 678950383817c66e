"""Postfix tables and address lists: what counts as a key, and following changes on disk."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from traqmilter.core.engine import DirectoryUnavailable
from traqmilter.directory.maps import (
    AddressListSource,
    PostfixMapSource,
    normalise_entry,
    parse_address_list,
)

from .helpers import MAP_TYPES, POSTMAP, postfix_config_dir, postmap, write_table


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stat_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every stat() the sources make, by path."""
    calls: list[str] = []
    real_stat = os.stat

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        calls.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    return calls


# --- what a key is -------------------------------------------------------------------------

TABLE_SOURCE = [
    "# virtual mailboxes",
    "",
    "Alice@Example.COM        example.com/alice/",
    "bob@example.com          example.com/bob/",
    "user+tag@example.com     example.com/tagged/",
    "@catch.example           catchall@example.com",
    "example.org              anything      # a virtual alias domain's declaration",
    "bareuser                 x",
    "  continued value of the previous line",
    "carol@bücher.example     carol/",
]

TABLE_CASES = [
    ("upper case in the table is folded", "alice@example.com", True),
    ("lookups fold too, as Postfix's do", "ALICE@example.com", True),
    ("plain entry", "bob@example.com", True),
    ("entry with extension", "user+tag@example.com", True),
    ("catch-all", "anyone@catch.example", True),
    ("bare domain entry makes nobody known", "anyone@example.org", False),
    ("bare user entry is ignored", "bareuser@example.com", False),
    ("IDN domain in A-label form", "carol@xn--bcher-kva.example", True),
    ("absent", "nobody@example.com", False),
]


@pytest.fixture(params=MAP_TYPES)
def table(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PostfixMapSource]:
    source = tmp_path / "vmailbox"
    write_table(source, TABLE_SOURCE)
    spec = postmap(request.param, source)
    loaded = PostfixMapSource(spec, config_dir=postfix_config_dir(tmp_path), background=False)
    yield loaded
    loaded.close()


@pytest.mark.parametrize(("label", "key", "want"), TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_table_keys(table: PostfixMapSource, label: str, key: str, want: bool) -> None:
    assert table.contains(key) is want


def test_table_counts_what_it_ignored(table: PostfixMapSource) -> None:
    assert (len(table), table.ignored) == (5, 2)
    assert table.loaded and table.last_error is None


@pytest.mark.parametrize(
    ("entry", "fold_case", "want"),
    [
        ("alice@example.com", True, "alice@example.com"),
        ("Alice@Example.com", True, "alice@example.com"),
        ("Alice@Example.com", False, "Alice@example.com"),
        ("@Example.COM", True, "@example.com"),
        ("@bad..domain", True, None),
        ("alice", True, None),
        ("example.com", True, None),
        ("alice@", True, None),
        ("a..b@example.com", True, None),
        ("a b@example.com", True, None),
        ("alice@[192.0.2.1]", True, None),
        ("zoë@bücher.example", True, "zoë@xn--bcher-kva.example"),
    ],
)
def test_normalise_entry(entry: str, fold_case: bool, want: str | None) -> None:
    assert normalise_entry(entry, fold_case=fold_case) == want


LIST_CASES = [
    # label, lines, fold_case, want_keys, want_ignored
    (
        "blank and comment lines",
        ["", "   ", "# c", "  # indented c", "a@example.com"],
        True,
        {"a@example.com"},
        0,
    ),
    ("trailing comment", ["a@example.com   # the boss"], True, {"a@example.com"}, 0),
    ("hash inside an address is not a comment", ["a#b@example.com"], True, {"a#b@example.com"}, 0),
    ("folded", ["A@EXAMPLE.com"], True, {"a@example.com"}, 0),
    ("case kept when case-sensitive", ["A@EXAMPLE.com"], False, {"A@example.com"}, 0),
    ("catch-all", ["@Example.org"], True, {"@example.org"}, 0),
    ("bare user ignored", ["alice"], True, set(), 1),
    ("junk after the address", ["a@example.com b@example.com"], True, set(), 1),
    ("malformed address", ["a@@example.com", "<a@example.com"], True, set(), 2),
    ("duplicates", ["a@example.com", "A@example.com"], True, {"a@example.com"}, 0),
]


@pytest.mark.parametrize(
    ("label", "lines", "fold_case", "want_keys", "want_ignored"),
    LIST_CASES,
    ids=[c[0] for c in LIST_CASES],
)
def test_parse_address_list(
    label: str, lines: list[str], fold_case: bool, want_keys: set[str], want_ignored: int
) -> None:
    result = parse_address_list(lines, fold_case=fold_case)
    assert (set(result.keys), result.ignored) == (want_keys, want_ignored)


@pytest.mark.parametrize(
    "spec",
    [
        "regexp:/etc/postfix/virtual_regexp",
        "pcre:/etc/postfix/virtual.pcre",
        "proxy:hash:/etc/postfix/virtual",
        "sqlite:/etc/postfix/sqlite.cf",
        "hash:relative/path",
        "/etc/postfix/virtual",
        "hash:/etc/postfix/vir\x00tual",
    ],
)
def test_tables_that_cannot_be_listed_are_refused(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PostfixMapSource(spec, config_dir=postfix_config_dir(tmp_path))


def test_address_list_path_must_be_absolute() -> None:
    with pytest.raises(ValueError):
        AddressListSource("relative/list")


# --- following changes ---------------------------------------------------------------------


def _followed_table(
    tmp_path: Path, clock: FakeClock, map_type: str, local: str, *, background: bool
) -> tuple[Path, PostfixMapSource]:
    """A table of one entry, local@example.com, written two minutes ago and followed
    every 5 s of `clock`; and its source file, to change."""
    source_file = tmp_path / "vmailbox"
    write_table(source_file, [f"{local}@example.com x"], age_seconds=120)
    table = PostfixMapSource(
        postmap(map_type, source_file),
        config_dir=postfix_config_dir(tmp_path),
        reload_check_interval=5,
        clock=clock,
        background=background,
    )
    return source_file, table


def test_no_io_between_checks_and_one_stat_per_interval(
    tmp_path: Path, clock: FakeClock, stat_calls: list[str]
) -> None:
    path = tmp_path / "addresses"
    write_table(path, ["a@example.com"])
    source = AddressListSource(str(path), reload_check_interval=5, clock=clock, background=False)
    stat_calls.clear()

    for _ in range(100):
        assert source.contains("a@example.com")
    assert stat_calls == []

    clock.now += 5
    for _ in range(100):
        source.contains("a@example.com")
    assert stat_calls == [str(path)]


@pytest.mark.parametrize("map_type", MAP_TYPES)
@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_changed_table_is_read_again(
    tmp_path: Path, clock: FakeClock, map_type: str, background: bool
) -> None:
    source_file, table = _followed_table(tmp_path, clock, map_type, "old", background=background)
    assert table.contains("old@example.com")

    write_table(source_file, ["new@example.com x", "newer@example.com x"], age_seconds=60)
    postmap(map_type, source_file)
    assert table.contains("old@example.com"), "no check before the interval is over"

    clock.now += 5
    table.contains("old@example.com")  # the lookup that notices the change
    table.join_reload()
    assert (table.contains("old@example.com"), table.contains("new@example.com")) == (False, True)
    table.close()


def test_lookups_do_not_wait_for_a_slow_reload(tmp_path: Path, clock: FakeClock) -> None:
    """A reload runs in the background: lookups answer from the old set meanwhile."""
    gate = tmp_path / "gate"
    slow_postmap = tmp_path / "slow-postmap"
    slow_postmap.write_text(
        "#!/bin/sh\n"
        f"while [ ! -e {gate} ] && [ -e {tmp_path / 'first-done'} ]; do sleep 0.01; done\n"
        f'exec {POSTMAP} "$@"\n'
    )
    slow_postmap.chmod(stat.S_IRWXU)
    source_file = tmp_path / "vmailbox"
    write_table(source_file, ["old@example.com x"], age_seconds=120)
    spec = postmap("hash", source_file)
    table = PostfixMapSource(
        spec,
        config_dir=postfix_config_dir(tmp_path),
        reload_check_interval=5,
        clock=clock,
        postmap=str(slow_postmap),
    )
    (tmp_path / "first-done").touch()
    write_table(source_file, ["new@example.com x"], age_seconds=60)
    postmap("hash", source_file)

    clock.now += 5
    assert table.contains("old@example.com")  # starts the reload, answers at once
    assert table.contains("old@example.com")  # the reader is still blocked at the gate
    assert not table.contains("new@example.com")
    gate.touch()
    table.join_reload()
    assert table.contains("new@example.com")
    table.close()


FIRST_LOAD_FAILURES = [
    ("missing table", "missing"),
    ("corrupt table", "corrupt"),
    ("postmap not installed", "no-postmap"),
]


@pytest.mark.parametrize(
    ("label", "how"), FIRST_LOAD_FAILURES, ids=[c[0] for c in FIRST_LOAD_FAILURES]
)
def test_first_load_failure_makes_lookups_unavailable(
    tmp_path: Path, label: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    source_file = tmp_path / "vmailbox"
    postmap_binary = None
    if how == "corrupt":
        (tmp_path / "vmailbox.db").write_bytes(b"this is not a Berkeley DB file" * 100)
    elif how == "no-postmap":
        write_table(source_file, ["a@example.com x"])
        postmap("hash", source_file)
        postmap_binary = str(tmp_path / "no-such-postmap")
    with caplog.at_level(logging.ERROR, logger="traqmilter.directory"):
        table = PostfixMapSource(
            f"hash:{source_file}", config_dir=postfix_config_dir(tmp_path), postmap=postmap_binary
        )
    assert not table.loaded and table.last_error
    with pytest.raises(DirectoryUnavailable):
        table.contains("a@example.com")
    assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_unreadable_list_at_start_is_unavailable_until_it_appears(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "addresses"
    source = AddressListSource(str(path), reload_check_interval=5, clock=clock, background=False)
    with pytest.raises(DirectoryUnavailable, match="not loaded"):
        source.contains("a@example.com")
    write_table(path, ["a@example.com"])
    with pytest.raises(DirectoryUnavailable):
        source.contains("a@example.com")  # not checked again before the interval
    clock.now += 5
    assert source.contains("a@example.com")
    assert source.last_error is None


def test_list_that_is_not_utf8_fails_to_load(tmp_path: Path) -> None:
    path = tmp_path / "addresses"
    path.write_bytes(b"caf\xe9@example.com\n")
    source = AddressListSource(str(path))
    assert source.last_error is not None
    with pytest.raises(DirectoryUnavailable):
        source.contains("a@example.com")


@pytest.mark.parametrize("map_type", MAP_TYPES)
def test_failed_reload_keeps_the_last_good_set(
    tmp_path: Path, clock: FakeClock, map_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, table = _followed_table(tmp_path, clock, map_type, "a", background=False)
    watched = Path(table.watched_path)
    watched.rename(tmp_path / "moved-away")

    with caplog.at_level(logging.WARNING, logger="traqmilter.directory"):
        for _ in range(3):  # three checks, one log line
            clock.now += 5
            assert table.contains("a@example.com")
    assert table.last_error is not None
    assert [r.levelname for r in caplog.records] == ["WARNING"]

    (tmp_path / "moved-away").rename(watched)
    clock.now += 5
    assert table.contains("a@example.com")
    assert table.last_error is None


def test_refresh_reads_a_change_at_once(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "addresses"
    write_table(path, ["a@example.com"], age_seconds=120)
    source = AddressListSource(str(path), reload_check_interval=3600, clock=clock)
    write_table(path, ["b@example.com"], age_seconds=60)
    source.refresh()
    assert (source.contains("a@example.com"), source.contains("b@example.com")) == (False, True)


def test_same_size_rewrite_is_noticed_by_mtime(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "addresses"
    write_table(path, ["a@example.com"], age_seconds=120)
    source = AddressListSource(str(path), reload_check_interval=5, clock=clock)
    write_table(path, ["b@example.com"], age_seconds=60)  # same size, same inode
    clock.now += 5
    source.contains("x@example.com")
    source.join_reload()
    assert source.contains("b@example.com")
