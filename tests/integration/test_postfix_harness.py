"""The Postfix test harness and contrib/postfix/, proven against a real Postfix.

Bare Postfix here (no policyd, no milter): the directory maps deliver and alias, Postfix
rejects unknown recipients itself, remote mail reaches the capture server unaltered, and
an unreachable policy service or milter tempfails instead of losing or admitting mail.
One Postfix instance serves the module; the failure tests start their own.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

import pytest

from tests.support.capture import CaptureServer, RcptReply
from tests.support.directory_fixture import create_directory
from tests.support.fixtures import postfix_root, require_postfix
from tests.support.postfix import (
    CONTRIB_DIR,
    CONTRIB_PLACEHOLDERS,
    PGSQL_MAP_FILES,
    SQLITE_MAP_FILES,
    TRUSTED_CLIENT,
    PostfixError,
    PostfixInstance,
    parse_main_cf,
    prepare_sqlite_directory,
    process_group_members,
    split_restrictions,
)
from tests.support.smtp import make_message, send_message

SENDER = "sender@remote.test"
DOCS_DIR = CONTRIB_DIR.parents[1] / "docs"
QUEUE_SECONDS = 15


def defer_first_attempt(deferred: set[str]) -> RcptReply:
    """RCPT replies for the capture server: 451 on the first attempt for *@retry.test."""

    def reply(address: str) -> str:
        if address.endswith("@retry.test") and address not in deferred:
            deferred.add(address)
            return "451 4.3.0 Try again later"
        return "250 2.1.5 Ok"

    return reply


@dataclass
class World:
    postfix: PostfixInstance
    capture: CaptureServer
    root: Path
    sqlite_path: Path


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    require_postfix()
    with (
        CaptureServer(rcpt_reply=defer_first_attempt(set())) as capture,
        postfix_root() as root,
    ):
        sqlite_path = create_directory(
            prepare_sqlite_directory(root / "directory") / "directory.sqlite",
            domains=["example.com"],
            mailboxes=["alice@example.com", "admin@example.com"],
            aliases={"postmaster@example.com": "admin@example.com"},
        )
        # No policy service here: Postfix rejects unknown recipients itself, the value
        # main.cf.fragment documents for sites where every domain uses `reject`.
        with PostfixInstance(
            root / "postfix",
            sqlite_path=sqlite_path,
            relay_port=capture.port,
            extra_main_cf={"smtpd_reject_unlisted_recipient": "yes"},
        ) as postfix:
            yield World(postfix, capture, root, sqlite_path)


def message_ids(messages: list[EmailMessage]) -> set[str]:
    return {str(message["Message-ID"]) for message in messages}


def without_received_headers(data: bytes) -> bytes:
    """The message as the client sent it: Postfix only prepends Received: (folded)."""
    return re.sub(rb"\AReceived: .*?\r\n(?:[ \t].*?\r\n)*", b"", data, flags=re.DOTALL)


@pytest.mark.postfix
def test_known_recipient_is_delivered_to_its_maildir(world: World) -> None:
    mark = world.postfix.log_mark()
    message = make_message(SENDER, ["alice@example.com"], subject="for alice")
    result = send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=SENDER,
        recipients=["alice@example.com"],
        message=message,
    )

    assert result.rcpts["alice@example.com"].code == 250
    assert result.data is not None and result.data.code == 250
    world.postfix.wait_queue_empty(QUEUE_SECONDS)
    world.postfix.wait_for_log(r"to=<alice@example\.com>, relay=virtual, .*status=sent", since=mark)
    sent_id = BytesParser(policy=default_policy).parsebytes(message)["Message-ID"]
    delivered = [p for p in (world.root / "postfix/mail/example.com/alice/new").iterdir()]
    assert delivered, "nothing in the Maildir SCHEMA.md names: example.com/alice/"
    assert sent_id in message_ids(world.postfix.maildir_messages("alice@example.com"))


@pytest.mark.postfix
def test_extension_and_case_reach_the_base_mailbox(world: World) -> None:
    message = make_message(SENDER, ["Alice+News@Example.COM"])
    result = send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=SENDER,
        recipients=["Alice+News@Example.COM"],
        message=message,
    )

    assert result.rcpts["Alice+News@Example.COM"].code == 250
    world.postfix.wait_queue_empty(QUEUE_SECONDS)
    sent_id = BytesParser(policy=default_policy).parsebytes(message)["Message-ID"]
    assert sent_id in message_ids(world.postfix.maildir_messages("alice@example.com"))


@pytest.mark.postfix
def test_postmaster_alias_is_delivered(world: World) -> None:
    message = make_message(SENDER, ["postmaster@example.com"], subject="abuse report")
    result = send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=SENDER,
        recipients=["postmaster@example.com"],
        message=message,
    )

    assert result.rcpts["postmaster@example.com"].code == 250
    world.postfix.wait_queue_empty(QUEUE_SECONDS)
    sent_id = BytesParser(policy=default_policy).parsebytes(message)["Message-ID"]
    assert sent_id in message_ids(world.postfix.maildir_messages("admin@example.com"))


@pytest.mark.postfix
@pytest.mark.parametrize("client", ["127.0.0.1", TRUSTED_CLIENT])
def test_unknown_local_recipient_is_rejected_by_postfix(world: World, client: str) -> None:
    result = send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=SENDER,
        recipients=["nobody@example.com"],
        source_address=client,
    )

    reply = result.rcpts["nobody@example.com"]
    assert reply.code == 550
    assert reply.text.startswith("5.1.1 <nobody@example.com>: Recipient address rejected")
    assert result.data is None


@pytest.mark.postfix
def test_remote_recipient_is_relayed_unaltered_with_dsn_parameters(world: World) -> None:
    world.capture.clear()
    message = make_message(SENDER, ["carol@remote.test"], subject="relayed")
    result = send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=SENDER,
        recipients=["carol@remote.test"],
        message=message,
        mail_options=["RET=HDRS", "ENVID=envelope-1"],
        rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;carol@remote.test"],
        source_address=TRUSTED_CLIENT,
    )

    assert result.data is not None and result.data.code == 250
    [relayed] = world.capture.wait_for(1, QUEUE_SECONDS)
    assert relayed.mail_from == SENDER
    assert relayed.rcpt_tos == ["carol@remote.test"]
    assert relayed.mail_options["RET"] == "HDRS"
    assert relayed.mail_options["ENVID"] == "envelope-1"
    assert relayed.recipients[0].options == {
        "NOTIFY": "SUCCESS,FAILURE",
        "ORCPT": "rfc822;carol@remote.test",
    }
    assert relayed.data.startswith(b"Received: from client.test (unknown [127.0.0.2])")
    assert without_received_headers(relayed.data) == message


@pytest.mark.postfix
def test_default_test_client_is_untrusted_and_cannot_relay(world: World) -> None:
    result = send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=SENDER,
        recipients=["carol@remote.test"],
    )

    reply = result.rcpts["carol@remote.test"]
    assert not reply.positive
    assert "Relay access denied" in reply.text


@pytest.mark.postfix
def test_deferred_remote_mail_is_retried_on_flush(world: World) -> None:
    world.capture.clear()
    mark = world.postfix.log_mark()
    result = send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=SENDER,
        recipients=["dave@retry.test"],
        source_address=TRUSTED_CLIENT,
    )

    assert result.data is not None and result.data.code == 250
    world.postfix.wait_for_log(r"to=<dave@retry\.test>.*status=deferred", QUEUE_SECONDS, mark)
    world.postfix.flush()
    [relayed] = world.capture.wait_for(1, QUEUE_SECONDS)
    assert relayed.rcpt_tos == ["dave@retry.test"]
    world.postfix.wait_queue_empty(QUEUE_SECONDS)


@pytest.mark.postfix
def test_held_messages_stay_queued_until_released(world: World) -> None:
    delivered_before = len(world.postfix.maildir_messages("alice@example.com"))

    world.postfix.hold_messages(3, "alice@example.com")

    assert world.postfix.queue_size() == 3
    assert world.postfix.queue_size(["hold"]) == 3
    world.postfix.release_held()
    world.postfix.wait_queue_empty(QUEUE_SECONDS)
    assert len(world.postfix.maildir_messages("alice@example.com")) == delivered_before + 3


@pytest.mark.postfix
def test_reload_applies_changed_settings(world: World) -> None:
    world.postfix.reload({"smtpd_banner": "$myhostname ESMTP reloaded"})
    try:
        with socket.create_connection((world.postfix.host, world.postfix.smtp_port), 10) as s:
            banner = s.makefile("rb").readline()
    finally:
        world.postfix.reload({"smtpd_banner": "$myhostname ESMTP"})

    assert banner == b"220 mx.traqmilter.test ESMTP reloaded\r\n"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused, and nothing
    else can take it while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.postfix
def test_policy_service_down_defers_and_loses_nothing(world: World, closed_port: int) -> None:
    with PostfixInstance(
        world.root / "policy-down",
        sqlite_path=world.sqlite_path,
        relay_port=world.capture.port,
        policy_port=closed_port,
    ) as postfix:
        result = send_message(
            postfix.host,
            postfix.smtp_port,
            sender=SENDER,
            recipients=["alice@example.com", "nobody@example.com"],
        )

        # DEFER_IF_PERMIT: every recipient that passed reject_unauth_destination is deferred
        # (Postfix defers before its own unknown-recipient check), so the sender retries.
        for reply in result.rcpts.values():
            assert reply.code == 450
            assert reply.text.endswith("Recipient address rejected: Service unavailable")
        assert result.data is None
        postfix.wait_for_log(rf"connect to 127\.0\.0\.1:{closed_port}: Connection refused")
        assert postfix.queue_size() == 0


@pytest.mark.postfix
def test_milter_down_tempfails_the_session(world: World, closed_port: int) -> None:
    with PostfixInstance(
        world.root / "milter-down",
        sqlite_path=world.sqlite_path,
        relay_port=world.capture.port,
        milter_port=closed_port,
    ) as postfix:
        result = send_message(
            postfix.host, postfix.smtp_port, sender=SENDER, recipients=["alice@example.com"]
        )

        # milter_default_action = tempfail: Postfix refuses the transaction at MAIL FROM.
        assert str(result.mail) == "451 4.7.1 Service unavailable - try again later"
        assert result.rcpts == {} and result.data is None
        postfix.wait_for_log(rf"connect to Milter service inet:127\.0\.0\.1:{closed_port}")
        assert postfix.queue_size() == 0
        master = postfix.master_pid

    assert master is not None and process_group_members(master) == []


@pytest.mark.postfix
def test_failed_start_reports_the_log_and_leaves_no_process(world: World) -> None:
    postfix = PostfixInstance(
        world.root / "port-taken", sqlite_path=world.sqlite_path, relay_port=world.capture.port
    )
    with socket.socket() as squatter:
        squatter.bind((postfix.host, postfix.smtp_port))
        squatter.listen()

        with pytest.raises(PostfixError, match="Address already in use"):
            postfix.start()

    assert postfix.master_pid is None
    master = postfix.wait_for_log(r"postfix/master\[(\d+)\]: fatal: bind")
    assert process_group_members(int(master.group(1))) == []


# --- The contrib files themselves (no Postfix needed) ------------------------------------


def test_main_cf_follows_contrib_and_leaves_out_absent_daemons(tmp_path: Path) -> None:
    contrib = parse_main_cf((CONTRIB_DIR / "main.cf.fragment").read_text())
    bare = PostfixInstance(tmp_path, sqlite_path=tmp_path / "d.sqlite", relay_port=2525)
    full = PostfixInstance(
        tmp_path, sqlite_path=tmp_path / "d.sqlite", relay_port=2525, policy_port=1, milter_port=2
    )

    bare_cf, full_cf = bare.main_cf(), full.main_cf()

    contrib_restrictions = split_restrictions(contrib["smtpd_recipient_restrictions"])
    assert (
        split_restrictions(bare_cf["smtpd_recipient_restrictions"]) == (contrib_restrictions[:-2])
    )
    assert split_restrictions(full_cf["smtpd_recipient_restrictions"])[-2:] == [
        "check_policy_service",
        "{ inet:127.0.0.1:1, timeout=10s, default_action=DEFER_IF_PERMIT }",
    ]
    assert "smtpd_milters" not in bare_cf
    assert full_cf["smtpd_milters"] == "inet:127.0.0.1:2"
    for name in ("milter_default_action", "smtpd_reject_unlisted_recipient", "recipient_delimiter"):
        assert bare_cf[name] == full_cf[name] == contrib[name]


def numbered_listing(readme: str, header: str) -> list[str]:
    """The lines of the README's numbered listing that starts with `header`, unnumbered."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"1 {header}")
    listing = []
    for number, line in enumerate(lines[start + 1 :], start=2):
        match = re.match(rf"\s*{number} (.*)$", line)
        if not match:
            break
        listing.append(match.group(1))
    return listing


@pytest.mark.parametrize(
    ("file_name", "header"),
    [
        ("main.cf.fragment", "/etc/postfix/main.cf:"),
        ("master.cf.fragment", "/etc/postfix/master.cf:"),
        ("sqlite-domains.cf", "/etc/postfix/traqmilter/sqlite-domains.cf:"),
        ("sqlite-mailboxes.cf", "/etc/postfix/traqmilter/sqlite-mailboxes.cf:"),
        ("sqlite-aliases.cf", "/etc/postfix/traqmilter/sqlite-aliases.cf:"),
        ("pgsql-domains.cf", "/etc/postfix/traqmilter/pgsql-domains.cf:"),
        ("pgsql-mailboxes.cf", "/etc/postfix/traqmilter/pgsql-mailboxes.cf:"),
        ("pgsql-aliases.cf", "/etc/postfix/traqmilter/pgsql-aliases.cf:"),
    ],
)
def test_readme_listings_match_the_tested_files(file_name: str, header: str) -> None:
    readme = (CONTRIB_DIR / "README.md").read_text()
    settings = [
        line.rstrip()
        for line in (CONTRIB_DIR / file_name).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]

    assert [line.strip() for line in numbered_listing(readme, header)] == [
        line.strip() for line in settings
    ]


def listed_placeholders() -> list[str]:
    """The values main.cf.fragment's header lists as placeholders (`#   VALUE  what`)."""
    lines = (CONTRIB_DIR / "main.cf.fragment").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Placeholders"))
    values = []
    for line in lines[start + 1 :]:
        if not line.startswith("#"):
            break
        if match := re.match(r"#   (\S+)\s", line):
            values.append(match.group(1))
    return values


# What names a site in a Postfix setting: an absolute path, an address with a port, a
# fixed uid or gid. (Loopback networks such as mynetworks=127.0.0.0/8 name no site.)
SITE_SPECIFIC = re.compile(r"(?<![\w.])/[\w./-]+|(?:inet:)?\d+\.\d+\.\d+\.\d+:\d+|static:\d+")
PLACEHOLDER_FILES = ("main.cf.fragment", "master.cf.fragment", *SQLITE_MAP_FILES)


def test_placeholder_list_names_every_site_specific_value() -> None:
    listed = listed_placeholders()
    found = {
        value
        for name in PLACEHOLDER_FILES
        for line in (CONTRIB_DIR / name).read_text().splitlines()
        if not line.lstrip().startswith("#")
        for value in SITE_SPECIFIC.findall(line)
    }

    unlisted = {value for value in found if not any(p in value for p in listed)}
    assert not unlisted, f"main.cf.fragment does not list these placeholders: {sorted(unlisted)}"
    # The harness replaces exactly the listed values, so the tests run the rest as shipped.
    assert sorted(listed) == sorted(CONTRIB_PLACEHOLDERS)
    for value in listed:
        assert any(value in (CONTRIB_DIR / name).read_text() for name in PLACEHOLDER_FILES)


# A reference to a line of a README listing: "[FILE ]line N (`name`)" or
# "[FILE ]lines N-M (`name`)", where `name` is text of the line (or of one of the lines).
LINE_REFERENCE = re.compile(
    r"(?:\b(main\.cf|master\.cf|(?:sqlite|pgsql)-\w+\.cf) )?\b[Ll]ines? (\d+)(?:-(\d+))?"
)
NAMED = re.compile(r" \(`([^`]+)`\)")
LISTING_HEADERS = {
    "main.cf": "/etc/postfix/main.cf:",
    "master.cf": "/etc/postfix/master.cf:",
    **{name: f"/etc/postfix/traqmilter/{name}:" for name in SQLITE_MAP_FILES + PGSQL_MAP_FILES},
}
README_SECTIONS = {"main.cf": ["main.cf"], "master.cf": ["master.cf"]}
README_SECTIONS["The SQLite maps"] = list(SQLITE_MAP_FILES)
README_SECTIONS["The PostgreSQL maps (several MX hosts, one directory)"] = list(PGSQL_MAP_FILES)


def line_references(
    text: str, section_files: dict[str, list[str]]
) -> list[tuple[str, int, int, list[str], str | None]]:
    """Every line reference in `text` (white space folded): (reference, first, last, the
    listings it may mean, the name it gives or None). A reference without a file name
    means the listings of the section (## heading) it is in."""
    references = []
    for section in re.split(r"^(?=## )", text, flags=re.M):
        heading = section.splitlines()[0].removeprefix("## ").strip() if section else ""
        body = " ".join(section.split())
        for match in LINE_REFERENCE.finditer(body):
            file_name, first, last = match.group(1), int(match.group(2)), match.group(3)
            files = [file_name] if file_name else section_files.get(heading, [])
            named = NAMED.match(body, match.end())
            references.append(
                (
                    match.group(0),
                    first,
                    int(last or first),
                    files,
                    named.group(1) if named else None,
                )
            )
    return references


@pytest.mark.parametrize(
    ("page", "section_files"),
    [(CONTRIB_DIR / "README.md", README_SECTIONS), (DOCS_DIR / "actions.md", {})],
    ids=["contrib/postfix/README.md", "docs/actions.md"],
)
def test_line_references_name_what_is_on_the_line(
    page: Path, section_files: dict[str, list[str]]
) -> None:
    readme = (CONTRIB_DIR / "README.md").read_text()
    references = line_references(page.read_text(), section_files)

    assert references
    for reference, first, last, files, name in references:
        assert name, f"{page.name}: {reference!r} does not name what is on the line: add (`name`)"
        assert files, f"{page.name}: {reference!r} does not say which file it means"
        for file_name in files:
            listing = numbered_listing(readme, LISTING_HEADERS[file_name])
            lines = listing[first - 2 : last - 1]  # the listing starts at line 2
            assert len(lines) == last - first + 1, f"{reference!r}: {file_name} is shorter"
            assert any(name in line for line in lines), (
                f"{page.name}: {reference} (`{name}`): {file_name} lines {first}-{last} are {lines}"
            )
