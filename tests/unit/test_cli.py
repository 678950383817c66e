"""The traqmilter command, in-process: check, explain, mailbox, blocks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.dns_server import DnsServer
from tests.unit.directory.helpers import make_table, postfix_config_dir
from traqmilter import cli
from traqmilter.cli import main
from traqmilter.core.attack import Block
from traqmilter.state import STATE_FILE_NAME, SqliteBlockStore


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "traqmilter.yaml"
    path.write_text(
        f"""\
state_dir: {tmp_path}/state
directory: {{sqlite: {tmp_path}/directory.sqlite}}
queue: {{directory: {tmp_path}/spool}}
postmaster: admin@example.com
domains:
  example.com: {{}}
  example.org: {{action: forward, forward_to: admin@example.com}}
"""
    )
    assert main(["-c", str(path), "mailbox", "add", "admin@example.com"]) == 0
    return str(path)


def private_config(tmp_path: Path, more: str) -> Path:
    """A config whose state, directory and queue lie in tmp_path, with `more` keys."""
    path = tmp_path / "private.yaml"
    path.write_text(
        f"state_dir: {tmp_path}/s\ndirectory: {{sqlite: {tmp_path}/d.sqlite}}\n"
        f"queue: {{directory: {tmp_path}/spool}}\n{more}"
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_check_ok(config_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "-c", config_file, "check")
    assert status == 0 and "config ok (2 local domains)" in out


def test_without_c_the_default_path_is_read_when_it_exists(
    config_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """-c's documented default, at the command line's edge: DEFAULT_PATH if present, else
    the embedded default (a private path stands in for /etc/traqmilter/traqmilter.yaml)."""
    monkeypatch.setattr(cli, "DEFAULT_PATH", config_file)
    assert cli.config_file(None) == config_file
    assert cli.config_file("other.yaml") == "other.yaml"
    status, out, _ = run(capsys, "check")
    assert status == 0 and "config ok (2 local domains)" in out
    monkeypatch.setattr(cli, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    assert cli.config_file(None) is None


def test_check_refuses_undeliverable_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"state_dir: {tmp_path}/s\ndirectory: {{sqlite: {tmp_path}/d.sqlite}}\n"
        "domains:\n  example.org: {action: forward, forward_to: catchall}\n"
    )
    status, _, err = run(capsys, "-c", str(path), "check")
    assert status == 2
    assert "postmaster@example.org does not exist and `postmaster` is not set" in err
    assert "domains.example.org.forward_to: catchall@example.org is not a known mailbox" in err


@pytest.mark.parametrize("main_cf", [True, False], ids=["main.cf", "no main.cf"])
def test_check_follows_postfix_maps_with_the_configured_postfix_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], main_cf: bool
) -> None:
    table = make_table(tmp_path, "hash", ["mapped@example.com"])  # built with a private main.cf
    config_dir = postfix_config_dir(tmp_path) if main_cf else str(tmp_path / "unconfigured")
    Path(config_dir).mkdir(exist_ok=True)
    path = tmp_path / "t.yaml"
    path.write_text(
        f"state_dir: {tmp_path}/s\ndirectory: {{sqlite: {tmp_path}/d.sqlite, "
        f"postfix_maps: ['{table}']}}\npostfix: {{config_dir: {config_dir}}}\n"
        "postmaster: postmaster@remote.example\ndomains:\n  example.com: {}\n"
    )
    status, out, err = run(capsys, "-c", str(path), "check")
    if main_cf:
        assert (status, err) == (0, "")
        assert "config ok" in out
        status, out, _ = run(capsys, "-c", str(path), "explain", "mapped@example.com", "--json")
        assert json.loads(out)["rule"] == "known"
    else:
        assert status == 2
        assert (
            f"traqmilter: fatal: postfix.config_dir: {config_dir} has no main.cf (no Postfix "
            "instance is configured there); postmap cannot read directory.postfix_maps"
        ) in err


def test_check_reports_config_errors_with_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("queue:\n  high_water: many\n")
    status, _, err = run(capsys, "-c", str(path), "check")
    assert status == 2 and f"{path}:2: queue.high_water: 'many' is not an integer" in err


@pytest.mark.parametrize(
    ("address", "rule", "reply"),
    [
        ("admin@example.com", "known", "DUNNO"),
        ("nobody@example.com", "unknown_reject", "550 5.1.1 <nobody@example.com>"),
        ("nobody@example.org", "unknown_forward", "DUNNO"),
        ("postmaster@example.org", "postmaster", "DUNNO"),
        ("x@remote.example", "not_local", "DUNNO"),
    ],
)
def test_explain(
    config_file: str, capsys: pytest.CaptureFixture[str], address: str, rule: str, reply: str
) -> None:
    status, out, _ = run(capsys, "-c", config_file, "explain", address, "--json")
    assert status == 0
    result = json.loads(out)
    assert result["rule"] == rule and result["reply"].startswith(reply)


def test_explain_says_how_a_bounce_sender_is_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = {("spf.example", "TXT"): ['"v=spf1 ip4:198.51.100.7 -all"']}
    with DnsServer(records) as dns:
        path = private_config(
            tmp_path,
            "domains:\n  b.example: {action: bounce}\n"
            "  d.example: {action: bounce, unverified: discard}\n"
            "bounce: {authserv_id: mx.b.example, spf_check: true, "
            f'spf_resolver: "{dns.address}"}}\n',
        )

        def explain(*argv: str) -> dict[str, str]:
            base = ["-c", str(path), "explain", "--json", "--client", "198.51.100.7"]
            status, out, _ = run(capsys, *base, *argv)
            assert status == 0
            return json.loads(out)  # type: ignore[no-any-return]

        later = explain("z@b.example", "--sender", "a@spf.example")
        assert later["rule"] == "unknown_bounce_verify_at_eom"
        assert "550 5.1.1 for the message" in later["sender"]
        assert "452 4.5.3" in later["transaction"]
        assert "rule separate_transaction" in later["transaction"]
        header = "mx.b.example; dkim=pass header.d=spf.example"
        good = explain("z@b.example", "--sender", "a@spf.example", "--auth-results", header)
        assert good["sender"] == "verified at end of message: dkim=pass (rule authres_dkim_pass)"
        dropped = explain("z@d.example", "--sender", "a@other.example", "--auth-results", header)
        assert "rule unverified_discard" in dropped["sender"]
        assert dropped["transaction"] is None  # dropped alone: mixes with anything
        assert explain("z@b.example", "--sasl-username", "u")["rule"] == (
            "unknown_bounce_trusted_client"
        )
        spf = explain("z@b.example", "--sender", "a@spf.example", "--spf")
        assert (spf["rule"], spf["reply"]) == (
            "unknown_bounce_spf_pass",
            "DUNNO (accepted at RCPT time)",
        )
        failed = explain("z@b.example", "--sender", "a@elsewhere.example", "--spf")
        assert failed["rule"] == "unknown_bounce_unverified"
        assert failed["reply"].startswith("550 5.1.1 <z@b.example>")


def test_explain_names_the_notify_target_and_on_create_hook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = private_config(
        tmp_path,
        "undelivered: {notify: hostmaster@example.com}\n"
        "domains:\n  example.com: {}\n"
        "  shop.example: {action: create, on_create: [/usr/local/sbin/hook, --welcome]}\n"
        "  quiet.example: {action: bounce, notify: ''}\n",
    )

    def explain(address: str) -> tuple[dict[str, object], str]:
        status, out, _ = run(capsys, "-c", str(path), "explain", address, "--json")
        assert status == 0
        status, text, _ = run(capsys, "-c", str(path), "explain", address)
        assert status == 0
        return json.loads(out), text

    created, text = explain("new@shop.example")
    assert created["notify"] == "hostmaster@example.com"
    assert created["on_create"] == ["/usr/local/sbin/hook", "--welcome", "ADDRESS"]
    assert 'on_create: ["/usr/local/sbin/hook", "--welcome", "ADDRESS"]\n' in text
    rejected, text = explain("nobody@example.com")  # reject: nobody is told
    assert (rejected["notify"], rejected["on_create"]) == (None, None)
    assert "notify: -\non_create: -\n" in text
    quiet, _ = explain("z@quiet.example")
    assert (quiet["rule"], quiet["notify"]) == ("unknown_bounce_verify_at_eom", None)


def test_explain_has_no_side_effects(config_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(10):
        run(capsys, "-c", config_file, "explain", "nobody@example.com", "--client", "198.51.100.7")
    status, out, _ = run(capsys, "-c", config_file, "blocks", "list")
    assert status == 0 and out == ""


def test_mailbox_lifecycle(config_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "-c", config_file, "mailbox", "add", "Bob@Example.COM")[:2] == (
        0,
        "added bob@example.com\n",
    )
    status, _, err = run(capsys, "-c", config_file, "mailbox", "add", "bob@example.com")
    assert status == 1 and "bob@example.com" in err
    status, out, _ = run(capsys, "-c", config_file, "mailbox", "list")
    assert "bob@example.com\texample.com/bob/\tactive" in out
    status, out, _ = run(capsys, "-c", config_file, "mailbox", "show", "BOB@example.com")
    assert status == 0 and "maildir: example.com/bob/" in out
    assert run(capsys, "-c", config_file, "mailbox", "remove", "bob@example.com")[0] == 0
    assert run(capsys, "-c", config_file, "mailbox", "show", "bob@example.com")[0] == 1
    assert run(capsys, "-c", config_file, "mailbox", "add", "bad address@example.com")[0] == 2


def test_blocks_list_and_clear(
    config_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state").mkdir()
    store = SqliteBlockStore(str(tmp_path / "state" / STATE_FILE_NAME))
    until = time.time() + 3600
    store.save(Block("192.0.2.7", until, 5))
    store.save(Block("2001:db8:1:2::/64", until, 6))
    store.close()
    _status, out, _ = run(capsys, "-c", config_file, "blocks", "list")
    assert "192.0.2.7\tuntil " in out and "2001:db8:1:2::/64" in out
    # Any address of the blocked /64 names that block.
    assert (
        run(capsys, "-c", config_file, "blocks", "clear", "2001:db8:1:2::99")[1]
        == "cleared 2001:db8:1:2::/64\n"
    )
    assert run(capsys, "-c", config_file, "blocks", "clear", "192.0.2.8")[0] == 1
    assert run(capsys, "-c", config_file, "blocks", "clear", "nonsense")[0] == 2
    assert run(capsys, "-c", config_file, "blocks", "clear", "--all")[0] == 0
    assert run(capsys, "-c", config_file, "blocks", "list")[1] == ""


def test_check_refuses_a_broken_bounce_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "bounce.txt.j2"
    template.write_text("Hello {{ nosuchvariable }}\n")
    path = tmp_path / "t.yaml"
    path.write_text(
        f"state_dir: {tmp_path}/s\ndirectory: {{sqlite: {tmp_path}/d.sqlite}}\n"
        f"postmaster: pm@remote.example\n"
        f"domains:\n  old.example: {{action: bounce, bounce_template: {template}}}\n"
    )
    status, _, err = run(capsys, "-c", str(path), "check")
    assert status == 2 and f"domains.old.example.bounce_template: {template}" in err


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("admin@example.com", "the catch-all target of domains.example.org.forward_to"),
        ("Admin@EXAMPLE.com", "the catch-all target of domains.example.org.forward_to"),
        ("postmaster@example.org", "a local domain's postmaster"),
    ],
)
def test_mailbox_remove_keeps_the_postmaster_and_catch_all_targets(
    config_file: str, capsys: pytest.CaptureFixture[str], address: str, why: str
) -> None:
    assert main(["-c", config_file, "mailbox", "add", address]) in (0, 1)  # 1: already there
    status, _, err = run(capsys, "-c", config_file, "mailbox", "remove", address)
    assert status == 2
    assert f"traqmilter: {address} is {why}:" in err and "--force" in err
    assert run(capsys, "-c", config_file, "mailbox", "show", address)[0] == 0  # still there
    status, out, _ = run(capsys, "-c", config_file, "mailbox", "remove", "--force", address)
    assert status == 0 and f"removed {address}" in out


def test_mailbox_remove_of_an_ordinary_mailbox_needs_no_force(
    config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-c", config_file, "mailbox", "add", "bob@example.com"]) == 0
    status, out, _ = run(capsys, "-c", config_file, "mailbox", "remove", "bob@example.com")
    assert status == 0 and "removed bob@example.com" in out
