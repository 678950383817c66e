"""directory.postfix: auto against a private Postfix configuration directory: the domains and
recipient tables its main.cf names, read with the real postconf and postmap."""

from __future__ import annotations

import json
import logging
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.support.fixtures import require
from tests.unit.directory.helpers import POSTMAP, write_table
from traqmilter.cli import main
from traqmilter.config import parse_config
from traqmilter.core.engine import DirectoryUnavailable, RcptFacts
from traqmilter.directory.postfix_auto import AskedTable, discover_postfix
from traqmilter.runtime import StartupError, open_runtime


@pytest.fixture(autouse=True)
def _postmap() -> None:
    require(None if POSTMAP else "postmap is missing (Debian package postfix)")


A_USER = pwd.getpwuid(0).pw_name  # root: in every password database


def make_postfix_dir(root: Path, **overrides: str) -> Path:
    """A Postfix configuration directory whose main.cf uses every source auto follows:
    mydestination with unix:passwd.byname and $alias_maps, virtual mailbox domains in a
    hash and an lmdb table, a regexp alias table, and a relay domain."""
    config = root / "postfix"
    config.mkdir()
    write_table(config / "aliases", ["postmaster: root", "info: root"])
    write_table(config / "vmailbox", ["alice@hash.example hash.example/alice/"])
    write_table(config / "vmailbox-lmdb", ["bob@lmdb.example lmdb.example/bob/"])
    write_table(config / "virtual.re", [r"/^sales-[0-9]+@alias\.example$/ alice@hash.example"])
    settings = {
        "compatibility_level": "3.6",
        "mydestination": "example.org, localhost",
        "alias_maps": f"hash:{config}/aliases",
        "alias_database": f"hash:{config}/aliases",
        "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
        "virtual_mailbox_domains": "hash.example, lmdb.example",
        "virtual_mailbox_maps": f"hash:{config}/vmailbox, proxy:lmdb:{config}/vmailbox-lmdb",
        "virtual_alias_domains": "alias.example",
        "virtual_alias_maps": f"regexp:{config}/virtual.re",
        "relay_domains": "relay.example",
        **overrides,
    }
    (config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    for command in (
        ["/usr/sbin/postalias", "-c", str(config), f"hash:{config}/aliases"],
        [POSTMAP, "-c", str(config), f"hash:{config}/vmailbox"],
        [POSTMAP, "-c", str(config), f"lmdb:{config}/vmailbox-lmdb"],
    ):
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    return config


def write_config(root: Path, postfix_dir: Path | str, extra: str = "") -> Path:
    """A traqmilter config with nothing of its own about domains or recipients."""
    path = root / "traqmilter.yaml"
    path.write_text(
        f"state_dir: {root}/state\ndirectory: {{sqlite: {root}/d.sqlite}}\n"
        f"postfix: {{config_dir: {postfix_dir}}}\n{extra}"
    )
    return path


def test_discovery_reads_domains_and_tables(tmp_path: Path) -> None:
    discovery = discover_postfix(str(make_postfix_dir(tmp_path)), reload_check_interval=5)
    try:
        assert discovery.available
        assert discovery.local_domains == ("example.org", "localhost")
        assert discovery.virtual_mailbox_domains == ("hash.example", "lmdb.example")
        assert discovery.virtual_alias_domains == ("alias.example",)
        assert discovery.relay_domains == ("relay.example",)  # never served
        assert "relay.example" not in discovery.served_domains
        described = {t.name.split()[1]: t.describe() for t in discovery.tables}
        assert set(described) == {
            "proxy:unix:passwd.byname",
            f"hash:{tmp_path}/postfix/aliases",  # $alias_maps, expanded by postconf
            f"hash:{tmp_path}/postfix/vmailbox",
            f"proxy:lmdb:{tmp_path}/postfix/vmailbox-lmdb",
            f"regexp:{tmp_path}/postfix/virtual.re",
        }
        assert described[f"hash:{tmp_path}/postfix/vmailbox"].endswith(": 1 keys (postmap -s)")
        assert "postmap -q" in described[f"regexp:{tmp_path}/postfix/virtual.re"]
        assert discovery.problems == []
    finally:
        discovery.close()


@pytest.mark.parametrize(
    ("address", "known_by"),
    [
        (f"{A_USER}@example.org", "local_recipient_maps proxy:unix:passwd.byname"),
        ("postmaster@localhost", "local_recipient_maps hash:{d}/aliases"),
        ("info@example.org", "local_recipient_maps hash:{d}/aliases"),
        ("alice@hash.example", "virtual_mailbox_maps hash:{d}/vmailbox"),
        ("bob@lmdb.example", "virtual_mailbox_maps proxy:lmdb:{d}/vmailbox-lmdb"),
        ("sales-42@alias.example", "virtual_alias_maps regexp:{d}/virtual.re"),
        ("no-such-user@example.org", None),
        (f"{A_USER}@hash.example", None),  # a user name is local to mydestination only
        ("bob@hash.example", None),  # lmdb.example's mailbox, not hash.example's
        ("sales-x@alias.example", None),
        ("info@relay.example", None),
    ],
)
def test_the_table_that_knows_an_address(
    tmp_path: Path, address: str, known_by: str | None
) -> None:
    postfix_dir = make_postfix_dir(tmp_path)
    runtime = open_runtime(parse_config(write_config(tmp_path, postfix_dir).read_bytes()))
    try:
        want = known_by.format(d=postfix_dir) if known_by else None
        assert runtime.directory.source_of(address) == want
        assert runtime.directory.contains(address) is (want is not None)
    finally:
        runtime.close()


def test_zero_config_serves_postfix_domains_with_reject(tmp_path: Path) -> None:
    postfix_dir = make_postfix_dir(tmp_path)
    runtime = open_runtime(parse_config(write_config(tmp_path, postfix_dir).read_bytes()))
    try:
        assert list(runtime.config.domains) == [
            "example.org",
            "localhost",
            "hash.example",
            "lmdb.example",
            "alias.example",
        ]
        decide = runtime.engine.rcpt
        assert decide(RcptFacts("nobody@hash.example", "s@x.example", "192.0.2.9")).reply
        unknown = decide(RcptFacts("nobody@alias.example", "s@x.example", "192.0.2.9"))
        assert unknown.rule == "unknown_reject" and unknown.reply is not None
        assert unknown.reply.code == 550
        assert decide(RcptFacts("sales-1@alias.example", "s@x.example", "192.0.2.9")).accepted
        assert decide(RcptFacts("x@relay.example", "s@x.example", "192.0.2.9")).rule == (
            "not_local"
        )
    finally:
        runtime.close()


def test_a_relay_domain_may_only_be_given_outbox(tmp_path: Path) -> None:
    postfix_dir = make_postfix_dir(tmp_path)
    text = (
        f"state_dir: {tmp_path}/state\n"
        f"directory: {{sqlite: {tmp_path}/d.sqlite, postfix: auto}}\n"
        f"postfix: {{config_dir: {postfix_dir}}}\npostmaster: root@example.org\n"
    )
    with pytest.raises(StartupError, match=r"domains\.relay\.example: a relay domain of Postfix"):
        open_runtime(parse_config(text + "domains: {relay.example: {}}\n")).close()
    outbox = "domains: {relay.example: {action: outbox, outbox_relay: '[127.0.0.1]:2525'}}\n"
    open_runtime(parse_config(text + outbox)).close()


def test_a_table_that_cannot_be_asked_tempfails_and_check_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "postfix" / "gone.re"
    postfix_dir = make_postfix_dir(tmp_path, virtual_alias_maps=f"regexp:{missing}")
    runtime = open_runtime(parse_config(write_config(tmp_path, postfix_dir).read_bytes()))
    try:
        assert runtime.directory.contains("alice@hash.example")  # another table knows it
        with pytest.raises(DirectoryUnavailable, match=r"gone\.re"):
            runtime.directory.contains("nobody@alias.example")  # never "unknown" on an error
    finally:
        runtime.close()
    status = main(["-c", str(write_config(tmp_path, postfix_dir)), "check"])
    out, err = capsys.readouterr()
    assert status == 2
    assert f"virtual_alias_maps regexp:{missing}: UNAVAILABLE" in out
    assert "cannot be asked" in err and "configure the directory explicitly" in err


def test_asked_answers_are_cached_and_the_pool_is_bounded(tmp_path: Path) -> None:
    postfix_dir = make_postfix_dir(tmp_path)
    discovery = discover_postfix(str(postfix_dir), reload_check_interval=60)
    try:
        (table,) = [t.source for t in discovery.tables if isinstance(t.source, AskedTable)]
        assert table.contains("sales-1@alias.example")
        (postfix_dir / "virtual.re").write_text("")  # a change the cache hides until it ends
        assert table.contains("sales-1@alias.example")
        assert discovery.pool is not None and discovery.pool._max_workers == 4
    finally:
        discovery.close()


def test_empty_local_recipient_maps_accepts_every_local_address(tmp_path: Path) -> None:
    postfix_dir = make_postfix_dir(tmp_path, local_recipient_maps="")
    runtime = open_runtime(parse_config(write_config(tmp_path, postfix_dir).read_bytes()))
    try:
        assert runtime.directory.contains("anyone@example.org")  # as Postfix accepts it
        assert not runtime.directory.contains("anyone@hash.example")
    finally:
        runtime.close()


def test_check_and_explain_print_what_was_discovered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    postfix_dir = make_postfix_dir(tmp_path)
    config = str(write_config(tmp_path, postfix_dir))
    assert main(["-c", config, "check"]) == 0
    out = capsys.readouterr().out
    assert f"postfix: {postfix_dir}/main.cf (read with postconf)" in out
    assert "  local domains (mydestination): example.org, localhost\n" in out
    assert "  relay domains (not served as local; action outbox only): relay.example\n" in out
    assert f"    virtual_mailbox_maps hash:{postfix_dir}/vmailbox: 1 keys (postmap -s)\n" in out
    assert out.endswith("traqmilter: config ok (5 local domains from Postfix)\n")
    assert main(["-c", config, "explain", "bob+tag@lmdb.example", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rule"] == "known"
    assert result["known_by"] == f"virtual_mailbox_maps proxy:lmdb:{postfix_dir}/vmailbox-lmdb"
    assert main(["-c", config, "explain", "nobody@lmdb.example"]) == 0
    out = capsys.readouterr().out
    assert "rule: unknown_reject\n" in out and "known_by: -\n" in out


def test_reload_rediscovers(tmp_path: Path) -> None:
    postfix_dir = make_postfix_dir(tmp_path)
    config_path = write_config(tmp_path, postfix_dir)
    runtime = open_runtime(parse_config(config_path.read_bytes()))
    try:
        assert "new.example" not in runtime.config.domains
        main_cf = postfix_dir / "main.cf"
        main_cf.write_text(
            main_cf.read_text().replace(
                "virtual_alias_domains = alias.example", "virtual_alias_domains = new.example"
            )
        )
        runtime.reload(str(config_path))
        assert "new.example" in runtime.config.domains
        assert "alias.example" not in runtime.config.domains
    finally:
        runtime.close()


def test_without_main_cf_the_sqlite_store_serves_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh machine: no Postfix configuration. The embedded default still starts, says
    so, and serves the domains of the store's mailboxes."""
    unconfigured = tmp_path / "no-postfix"
    unconfigured.mkdir()
    config = parse_config(write_config(tmp_path, unconfigured).read_bytes())
    with caplog.at_level(logging.WARNING, logger="traqmilter"):
        runtime = open_runtime(config)
    runtime.close()
    assert runtime.config.domains == {}
    assert "domains: auto: no Postfix configuration to read; serving the SQLite store" in (
        caplog.text
    )
    assert "none yet (add one with `traqmilter mailbox add user@DOMAIN`" in caplog.text
    config_path = str(write_config(tmp_path, unconfigured))
    assert main(["-c", config_path, "check"]) == 0
    assert capsys.readouterr().out == (
        f"postfix: {unconfigured}: {unconfigured} has no main.cf (no Postfix instance is "
        "configured there)\ntraqmilter: config ok (0 local domains from the SQLite store's "
        "mailboxes)\n"
    )
    assert main(["-c", config_path, "mailbox", "add", "a@b.example"]) == 0
    runtime = open_runtime(config)
    try:
        assert list(runtime.config.domains) == ["b.example"]
        decision = runtime.engine.rcpt(RcptFacts("z@b.example", "s@x.example", "192.0.2.9"))
        assert decision.rule == "unknown_reject"
        assert runtime.engine.rcpt(RcptFacts("a@b.example", "s@x.example", "192.0.2.9")).accepted
    finally:
        runtime.close()
