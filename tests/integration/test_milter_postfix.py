"""Every accept-time action end to end: real SMTP into a private Postfix with traqmilter's
milter in front; each test checks what landed where (Maildir, the outside world, mx2).

One Postfix, milter and socketmap serve the module; the failure tests start their own.
"""

from __future__ import annotations

import email
import email.policy
import re
import signal
import smtplib
import sqlite3
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from milter_world import QUEUE_SECONDS, World, milter_world, rcpt_each

from tests.support.capture import CaptureServer
from tests.support.daemon_process import traqmilter_command
from tests.support.postfix import MYHOSTNAME
from tests.support.smtp import make_message, send_message
from traqmilter.core.plan import HOP_HEADER, ORIGINAL_TO_HEADER

pytestmark = pytest.mark.postfix

SENDER = "sender@remote.example"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with milter_world() as started:
        yield started


@pytest.fixture
def fresh(world: World) -> World:
    world.settle()
    world.clear()
    return world


def send(world: World, recipients: list[str], **options: object) -> dict[str, object]:
    result = send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=options.pop("sender", SENDER),  # type: ignore[arg-type]
        recipients=recipients,
        **options,  # type: ignore[arg-type]
    )
    assert result.data is not None, result
    return {"data": result.data, "rcpts": result.rcpts}


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_forward_delivers_one_copy_naming_the_originals(fresh: World) -> None:
    result = send(fresh, ["x@fwd.example", "y@fwd.example"])
    assert result["data"].code == 250  # type: ignore[attr-defined]
    fresh.settle()
    (copy,) = fresh.postfix.maildir_messages("admin@fwd.example")
    assert copy[ORIGINAL_TO_HEADER] == "<x@fwd.example>, <y@fwd.example>"
    assert copy[HOP_HEADER] == f"{MYHOSTNAME} (forward)"
    assert copy["Delivered-To"] == "admin@fwd.example"
    assert not fresh.postfix.maildir("x@fwd.example").exists()


def test_bounce_hands_one_dsn_to_the_mta_and_discards(fresh: World) -> None:
    message = make_message(SENDER, ["zed@bounce.example"], subject="Hi {{7*7}} 100% sure")
    result = rcpt_each(
        fresh.postfix.smtp_port,
        SENDER,
        [
            ("zed@bounce.example", ["NOTIFY=FAILURE", "ORCPT=rfc822;zed@bounce.example"]),
            ("zoe@bounce.example", []),
        ],
        message,
        mail_options=["RET=HDRS", "ENVID=QQ314159"],
    )
    assert result["data"][0] == 250
    (dsn,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    report = parse(dsn.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["From"] == f"Mail Delivery System <MAILER-DAEMON@{MYHOSTNAME}>"
    assert report["Auto-Submitted"] == "auto-replied"
    human, status, headers = report.iter_parts()
    assert "Hi {{7*7}} 100% sure" in human.get_content()
    fields = status.as_string()
    assert f"Reporting-MTA: dns; {MYHOSTNAME}" in fields
    assert "Original-Envelope-Id: QQ314159" in fields
    assert "Original-Recipient: rfc822;zed@bounce.example" in fields
    assert fields.count("Action: failed") == 2 and fields.count("Status: 5.1.1") == 2
    assert "Final-Recipient: rfc822; zoe@bounce.example" in fields
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: Hi {{7*7}} 100% sure" in headers.get_payload(decode=True)
    fresh.settle()
    assert len(fresh.outside.transactions) == 1  # the original went nowhere
    assert "discarded: no recipient left" in fresh.milter.log()


def test_readdress_changes_only_the_domain(fresh: World) -> None:
    result = rcpt_each(
        fresh.postfix.smtp_port,
        SENDER,
        [("Zed+Tag@old.example", ["NOTIFY=SUCCESS,FAILURE"])],
        make_message(SENDER, ["Zed+Tag@old.example"]),
    )
    assert result["data"][0] == 250
    (relayed,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert relayed.mail_from == SENDER
    (recipient,) = relayed.recipients
    assert recipient.address == "Zed+Tag@example.net"
    assert recipient.options["NOTIFY"] == "SUCCESS,FAILURE"
    assert recipient.options["ORCPT"] == "rfc822;Zed+2BTag@old.example"
    assert parse(relayed.data)[HOP_HEADER] == f"{MYHOSTNAME} (readdress)"


def test_create_makes_the_mailbox_and_delivers(fresh: World) -> None:
    assert send(fresh, ["newbie+shop@shop.example"])["data"].code == 250  # type: ignore[attr-defined]
    fresh.settle()
    (delivered,) = fresh.postfix.maildir_messages("newbie@shop.example")
    assert delivered["Subject"] == "test"
    box = fresh.store.get_mailbox("newbie@shop.example")
    assert box is not None and box.created_by == "create" and box.maildir == "shop.example/newbie/"


def test_outbox_relays_unaltered_through_the_outbound_route(fresh: World) -> None:
    message = make_message(SENDER, ["far@split.example"])
    assert send(fresh, ["far@split.example"], message=message)["data"].code == 250  # type: ignore[attr-defined]
    (relayed,) = fresh.mx2.wait_for(1, QUEUE_SECONDS)
    assert relayed.rcpt_tos == ["far@split.example"] and relayed.mail_from == SENDER
    original = parse(message)
    copy = parse(relayed.data)
    assert copy[HOP_HEADER] == f"{MYHOSTNAME} (outbox)"
    for name in ("Message-ID", "Subject", "From", "To", "Date"):
        assert copy[name] == original[name]
    assert copy.get_content() == original.get_content()
    fresh.settle()
    assert fresh.outside.transactions == []


def test_outbox_relays_a_bounce_for_a_user_of_the_other_server(fresh: World) -> None:
    # "Unknown here" in a split domain may exist on the other server: a DSN for it must
    # go there, not be refused as backscatter.
    message = make_message("", ["far@split.example"], subject="Undelivered Mail")
    assert send(fresh, ["far@split.example"], sender="", message=message)["data"].code == 250  # type: ignore[attr-defined]
    (relayed,) = fresh.mx2.wait_for(1, QUEUE_SECONDS)
    assert relayed.rcpt_tos == ["far@split.example"] and relayed.mail_from == ""


def test_loop_is_stopped_with_554(fresh: World) -> None:
    before = len(fresh.postfix.maildir_messages("admin@fwd.example"))
    hops = "".join(f"{HOP_HEADER}: mx{i}.example (forward)\r\n" for i in range(5)).encode()
    message = hops + make_message(SENDER, ["x@fwd.example"])
    data = send(fresh, ["x@fwd.example"], message=message)["data"]
    assert data.code == 554 and "5.4.6" in data.text  # type: ignore[attr-defined]
    fresh.settle()
    assert len(fresh.postfix.maildir_messages("admin@fwd.example")) == before
    assert fresh.outside.transactions == []


def test_mixed_message_gives_each_recipient_its_fate(fresh: World) -> None:
    before = len(fresh.postfix.maildir_messages("admin@fwd.example"))
    recipients = [
        "alice@example.com",
        "nobody@example.com",
        "zed@bounce.example",
        "x@fwd.example",
        "y@old.example",
        "far@split.example",
    ]
    result = send(fresh, recipients)
    rcpts = result["rcpts"]
    assert rcpts["nobody@example.com"].code == 550  # type: ignore[index]
    assert "5.1.1" in rcpts["nobody@example.com"].text  # type: ignore[index]
    assert result["data"].code == 250  # type: ignore[attr-defined]
    fresh.settle()
    (alice,) = fresh.postfix.maildir_messages("alice@example.com")[-1:]
    assert alice[HOP_HEADER] is not None and alice[ORIGINAL_TO_HEADER] is None
    assert len(fresh.postfix.maildir_messages("admin@fwd.example")) == before + 1
    (outbox,) = fresh.mx2.transactions
    assert outbox.rcpt_tos == ["far@split.example"]
    by_recipient = {tuple(t.rcpt_tos): t for t in fresh.outside.transactions}
    assert set(by_recipient) == {("y@example.net",), (SENDER,)}
    status = list(parse(by_recipient[(SENDER,)].data).iter_parts())[1].as_string()
    assert re.findall(r"Final-Recipient: rfc822; (\S+)", status) == ["zed@bounce.example"]


def test_messages_accepted_at_data_and_rewritten_share_one_session(fresh: World) -> None:
    """The milter answers ACCEPT at DATA for a message without actions, and Postfix then
    skips it for that message only: the next message of the same SMTP session (and milter
    connection) still gets headers and end of message, and is rewritten."""
    plan = [
        (["alice@example.com"], "session known 1"),
        (["x@fwd.example"], "session forward 1"),
        (["alice@example.com"], "session known 2"),
        (["y@fwd.example", "alice@example.com"], "session forward 2"),
    ]
    with smtplib.SMTP(fresh.postfix.host, fresh.postfix.smtp_port, timeout=30) as client:
        for recipients, subject in plan:
            refused = client.sendmail(
                SENDER, recipients, make_message(SENDER, recipients, subject=subject)
            )
            assert refused == {}, subject
    fresh.settle()

    def ours(mailbox: str) -> list[EmailMessage]:
        messages = fresh.postfix.maildir_messages(mailbox)
        return [m for m in messages if str(m["Subject"]).startswith("session ")]

    alice = ours("alice@example.com")
    assert sorted(m["Subject"] for m in alice) == [
        "session forward 2",
        "session known 1",
        "session known 2",
    ]
    for message in alice:  # unchanged, except where the same message was also forwarded
        assert (message[HOP_HEADER] is None) is ("known" in message["Subject"])
    forwarded = {m["Subject"]: m for m in ours("admin@fwd.example")}
    assert sorted(forwarded) == ["session forward 1", "session forward 2"]
    assert forwarded["session forward 1"][ORIGINAL_TO_HEADER] == "<x@fwd.example>"
    assert all(m[HOP_HEADER] is not None for m in forwarded.values())


def test_hostile_addresses_and_subjects(fresh: World) -> None:
    # Raw bytes: Python's email package would decode the encoded word and emit the CR LF.
    message = (
        b"From: <sender@remote.example>\r\nTo: <zed@bounce.example>\r\n"
        b"Subject: =?utf-8?q?x=0D=0ABcc:_victim@example.org?= %s %n {{7*7}}\r\n"
        b"Message-ID: <hostile@remote.example>\r\nDate: Mon, 24 Nov 2025 10:00:00 +0000\r\n"
        b"\r\nHello.\r\n"
    )
    # Postfix refuses sender-specified routing ("%" in a local part) itself.
    result = send(fresh, ["zed@bounce.example", "a%b@bounce.example"], message=message)
    refused = result["rcpts"]["a%b@bounce.example"]  # type: ignore[index]
    assert refused.code == 554 and "5.7.1" in refused.text
    assert result["data"].code == 250  # type: ignore[attr-defined]
    (dsn,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    head = dsn.data.split(b"\r\n\r\n", 1)[0]
    assert b"victim" not in head and b"Bcc" not in head
    report = parse(dsn.data)
    human = next(report.iter_parts())
    text = human.get_content()
    assert "Subject:  x Bcc: victim@example.org %s %n {{7*7}}" in text  # literal, not 49
    for bad in [
        "../etc@shop.example",
        ".hidden@shop.example",
        "root@shop.example",
        "abuse@shop.example",
        "Mailer-Daemon@shop.example",
        "a" * 40 + "@shop.example",
    ]:
        reply = send_message(
            fresh.postfix.host, fresh.postfix.smtp_port, sender=SENDER, recipients=[bad]
        ).rcpts[bad]
        assert reply.code in (501, 550), (bad, reply)
    connection = sqlite3.connect(fresh.store.path)
    try:
        rows = connection.execute("SELECT address FROM mailboxes WHERE created_by='create'")
        created = {row[0] for row in rows}
    finally:
        connection.close()
    assert not created & {"root@shop.example", "abuse@shop.example", "mailer-daemon@shop.example"}
    assert all(".." not in a and "/" not in a and not a.startswith(".") for a in created)
    shop = fresh.postfix.mail_directory / "shop.example"
    maildirs = {path.name for path in shop.iterdir()} if shop.exists() else set()
    assert maildirs <= {address.partition("@")[0] for address in created}


def test_fifty_concurrent_messages_create_one_mailbox(fresh: World) -> None:
    start = threading.Barrier(50)
    codes: list[int] = []

    def one() -> None:
        start.wait()
        result = send_message(
            fresh.postfix.host,
            fresh.postfix.smtp_port,
            sender=SENDER,
            recipients=["crowd@shop.example"],
        )
        assert result.data is not None
        codes.append(result.data.code)

    threads = [threading.Thread(target=one) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [250] * 50
    fresh.settle()
    assert len(fresh.postfix.maildir_messages("crowd@shop.example")) == 50
    connection = sqlite3.connect(fresh.store.path)
    try:
        (count,) = connection.execute(
            "SELECT count(*) FROM mailboxes WHERE address = 'crowd@shop.example'"
        ).fetchone()
    finally:
        connection.close()
    assert count == 1
    assert fresh.milter.log().count("mailbox created: crowd@shop.example") == 1


def test_milter_killed_mid_message_loses_nothing() -> None:
    with milter_world() as world:
        client = smtplib.SMTP("127.0.0.1", world.postfix.smtp_port, timeout=30)
        try:
            client.ehlo("client.test")
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt("x@fwd.example")[0] == 250
            world.milter.kill()  # the milter has seen MAIL and RCPT, not the message
            code, text = client.data(make_message(SENDER, ["x@fwd.example"]))
        except smtplib.SMTPDataError as refused:
            code, text = refused.smtp_code, refused.smtp_error
        finally:
            client.close()
        assert 400 <= code < 500, (code, text)
        world.settle()
        assert world.postfix.maildir_messages("admin@fwd.example") == []
        assert not world.postfix.maildir("x@fwd.example").exists()
        world.milter.start()
        retry = send_message(
            world.postfix.host, world.postfix.smtp_port, sender=SENDER, recipients=["x@fwd.example"]
        )
        assert retry.data is not None and retry.data.code == 250
        world.settle()
        assert len(world.postfix.maildir_messages("admin@fwd.example")) == 1


def test_dsn_not_accepted_tempfails_the_message() -> None:
    # The MTA refuses the DSN: the original must be tempfailed, never dropped.
    with milter_world(dsn_recipient_restrictions="reject") as world:
        result = send_message(
            world.postfix.host,
            world.postfix.smtp_port,
            sender=SENDER,
            recipients=["zed@bounce.example"],
        )
        assert result.data is not None and result.data.code == 451
        assert "4.3.0" in result.data.text
        world.settle()
        assert world.outside.transactions == []
        assert "DSN not handed over" in world.milter.log()


def test_sendmail_submission_of_the_dsn() -> None:
    with milter_world(sendmail_submit=True) as world:
        result = send_message(
            world.postfix.host,
            world.postfix.smtp_port,
            sender=SENDER,
            recipients=["z@bounce.example"],
        )
        assert result.data is not None and result.data.code == 250
        (dsn,) = world.outside.wait_for(1, QUEUE_SECONDS)
        assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
        assert parse(dsn.data).get_content_type() == "multipart/report"
        world.settle()
        assert len(world.outside.transactions) == 1


def test_with_policyd_in_front() -> None:
    with milter_world(policyd=True) as world:
        result = send(world, ["alice@example.com", "nobody@example.com", "x@fwd.example"])
        rcpts = result["rcpts"]
        assert rcpts["nobody@example.com"].code == 550  # type: ignore[index]
        assert result["data"].code == 250  # type: ignore[attr-defined]
        world.settle()
        assert len(world.postfix.maildir_messages("alice@example.com")) == 1
        assert len(world.postfix.maildir_messages("admin@fwd.example")) == 1
        # policyd refused the unknown recipient; the milter never saw it.
        world.postfix.wait_for_log(r"reject: RCPT from .*<nobody@example.com>", QUEUE_SECONDS)
        assert "nobody@example.com" not in world.milter.log()


def _reload_milter(world: World, config: str, expect: str) -> None:
    """Write `config`, send the milter SIGUSR1 and wait for one more `expect` log line."""
    before = world.milter.log().count(expect)
    world.config_path.write_text(config)
    world.milter.signal(signal.SIGUSR1)
    deadline = time.monotonic() + QUEUE_SECONDS
    while world.milter.log().count(expect) == before:
        assert time.monotonic() < deadline, world.milter.log()
        time.sleep(0.05)


def test_sigusr1_reloads_and_sigterm_stops() -> None:
    with milter_world() as world, CaptureServer() as new_target:
        config = world.config_path.read_text()
        # A new bounce.smtp_submit: the next DSN goes there, not to the old DSN service.
        old_submit = re.search(r'smtp_submit: "inet:127\.0\.0\.1:\d+"', config)
        assert old_submit is not None
        config = config.replace(
            old_submit.group(0), f'smtp_submit: "inet:127.0.0.1:{new_target.port}"'
        )
        _reload_milter(world, config, "milter: reloaded configuration")
        bounced = send(world, ["zed@bounce.example"])
        assert bounced["data"].code == 250  # type: ignore[attr-defined]
        (dsn,) = new_target.wait_for(1, QUEUE_SECONDS)
        assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
        assert parse(dsn.data).get_content_type() == "multipart/report"
        world.settle()
        assert world.outside.transactions == []  # nothing went the old way

        # A restart-only key changed with the action: refused whole, fwd.example forwards on.
        moved = config.replace(
            "fwd.example: {action: forward, forward_to: admin}", "fwd.example: {}"
        ).replace("milter: {listen:", "milter: {timeout: 5m, listen:")
        _reload_milter(world, moved, "reload refused, keeping the old config")
        assert "milter.timeout: changed from 60s to 300s; needs a restart" in world.milter.log()
        forwarded = send(world, ["x@fwd.example"])
        assert forwarded["data"].code == 250  # type: ignore[attr-defined]
        world.settle()
        assert len(world.postfix.maildir_messages("admin@fwd.example")) == 1

        config = config.replace(
            "fwd.example: {action: forward, forward_to: admin}", "fwd.example: {}"
        )
        _reload_milter(world, config, "milter: reloaded configuration")
        process = world.milter.process
        assert process is not None
        refused = send_message(
            world.postfix.host, world.postfix.smtp_port, sender=SENDER, recipients=["x@fwd.example"]
        ).rcpts["x@fwd.example"]
        assert refused.code == 550  # fwd.example now rejects unknown recipients
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "milter: stopped" in world.milter.log()


def _rcpt_until(world: World, recipient: str, code: int) -> tuple[int, bytes]:
    """RCPT TO alone (no message is sent) until Postfix answers `code`: the directory's
    lookup cache may answer from before a change for up to a second."""
    deadline = time.monotonic() + QUEUE_SECONDS
    while True:
        with smtplib.SMTP("127.0.0.1", world.postfix.smtp_port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(SENDER)
            reply = client.rcpt(recipient)
            client.rset()
        if reply[0] == code or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


@pytest.mark.parametrize("policyd", [True, False], ids=["policyd decides", "milter decides"])
def test_a_removed_catch_all_defers_and_never_bounces(policyd: bool) -> None:
    with milter_world(policyd=policyd) as world:
        assert send(world, ["x@fwd.example"])["data"].code == 250  # type: ignore[attr-defined]
        world.settle()
        assert len(world.postfix.maildir_messages("admin@fwd.example")) == 1

        kept = traqmilter_command(world.config_path, "mailbox", "remove", "admin@fwd.example")
        assert kept.returncode == 2, kept
        assert "catch-all target of domains.fwd.example.forward_to" in kept.stderr
        removed = traqmilter_command(
            world.config_path, "mailbox", "remove", "--force", "admin@fwd.example"
        )
        assert removed.returncode == 0, removed

        code, text = _rcpt_until(world, "y@fwd.example", 451)
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        result = send_message(
            world.postfix.host,
            world.postfix.smtp_port,
            sender=SENDER,
            recipients=["z@fwd.example", "alice@example.com"],
        )
        assert result.rcpts["z@fwd.example"].code == 451
        assert result.data is not None and result.data.code == 250  # alice's copy
        world.settle()
        assert world.outside.transactions == []  # no bounce, to anyone
        assert len(world.postfix.maildir_messages("alice@example.com")) >= 1
        deciding = world.policyd if policyd else world.milter
        assert "warning: forward target <admin@fwd.example> of <y@fwd.example>" in (deciding.log())
        assert "status=bounced" not in world.postfix.log_text()

        restored = traqmilter_command(world.config_path, "mailbox", "add", "admin@fwd.example")
        assert restored.returncode == 0, restored
        assert _rcpt_until(world, "w@fwd.example", 250)[0] == 250
        assert send(world, ["w@fwd.example"])["data"].code == 250  # type: ignore[attr-defined]
        world.settle()
        assert len(world.postfix.maildir_messages("admin@fwd.example")) == 2


@pytest.mark.parametrize("policyd", [True, False], ids=["policyd decides", "milter decides"])
def test_bounce_for_an_unknown_local_sender_is_refused_at_rcpt(policyd: bool) -> None:
    # A DSN to gone@example.com (a local domain, no such mailbox) could never be
    # delivered: the bounce recipient is refused at RCPT as `reject` would refuse it,
    # the same under Postfix as under Sendmail (test_sendmail_e2e.py).
    with milter_world(policyd=policyd) as world:
        result = send(world, ["zed@bounce.example", "alice@example.com"], sender="gone@example.com")
        rcpts = result["rcpts"]
        assert str(rcpts["zed@bounce.example"]) == (  # type: ignore[index]
            "550 5.1.1 <zed@bounce.example>: Recipient address rejected: User unknown"
        )
        assert result["data"].code == 250  # type: ignore[attr-defined]
        world.settle()
        assert len(world.postfix.maildir_messages("alice@example.com")) == 1
        assert world.outside.transactions == []  # no DSN, no notice to anyone
        deciding = world.policyd if policyd else world.milter
        assert "rule=unknown_bounce_sender_unknown" in deciding.log()
        assert "DSN" not in world.milter.log()
