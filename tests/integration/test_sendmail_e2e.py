"""The milter in the sendmail role behind a real Sendmail 8.17 (Debian's binary, unpacked
by scripts/setup --test): real SMTP in, the replies Sendmail itself gives, and what it
relays to the capture server. sendmail.cf is built from contrib/sendmail/traqmilter.mc
as shipped (tests/support/sendmail.py).

One world (Sendmail + milter) serves the module; the failure, queue and unix-socket
tests start their own. 127.0.0.1 is exempt from dictionary-attack counting; the tests
that count use other loopback clients (127.0.0.3, ...), one each.

With TRAQMILTER_SENDMAIL_TRANSCRIPTS=FILE the SMTP replies of each test are written there
(sendmail_world.write_transcripts_at_end).
"""

from __future__ import annotations

import email
import email.policy
import pwd
import re
import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path

import pytest
from sendmail_world import (
    MX2_HOST,
    QUEUE_SECONDS,
    SENDER,
    THRESHOLD,
    UNPRIVILEGED_USER,
    World,
    record,
    send,
    sendmail_world,
    transcript,
    write_transcripts_at_end,  # noqa: F401 (an autouse fixture)
)

from tests.support.capture import Transaction
from tests.support.fixtures import require_sendmail
from tests.support.sendmail import (
    CONTRIB_MC,
    CONTRIB_MILTER_SOCKET,
    CONTRIB_SOCKETMAP_SOCKET,
    MYHOSTNAME,
    REPO,
    SendmailError,
    SendmailInstance,
)
from tests.support.smtp import SendResult, make_message, send_message
from traqmilter.core.plan import HOP_HEADER, ORIGINAL_TO_HEADER
from traqmilter.core.settings import LoopSettings

pytestmark = pytest.mark.sendmail

USER_UNKNOWN = "Recipient address rejected: User unknown"
BLOCKED = (
    "Recipient address rejected: Too many unknown recipients from your address, try again later"
)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with sendmail_world() as started:
        yield started


@pytest.fixture
def fresh(world: World) -> World:
    world.settle()
    world.clear()
    return world


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def rejected(address: str, code: str, text: str) -> str:
    """A RCPT refusal as Sendmail words it: its own "<address>... " before the milter's."""
    return f"{code} <{address}>... {text}"


def test_unknown_is_refused_known_and_postmaster_are_delivered(fresh: World) -> None:
    result = send(
        fresh,
        "unknown recipient 550 5.1.1; known and postmaster delivered",
        ["nobody@example.com", "alice@example.com", "postmaster@example.com", "postmaster"],
    )
    assert str(result.rcpts["nobody@example.com"]) == "550 " + rejected(
        "nobody@example.com", "5.1.1", USER_UNKNOWN
    )
    for address in ("alice@example.com", "postmaster@example.com", "postmaster"):
        assert result.rcpts[address].code == 250
    assert result.data is not None and result.data.code == 250
    (relayed,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    # Bare postmaster is Sendmail's alias of postmaster@example.com: one copy.
    assert relayed.rcpt_tos == ["alice@example.com", "postmaster@example.com"]
    fresh.settle()
    assert len(fresh.outside.transactions) == 1


def test_dictionary_attacker_is_blocked_after_the_threshold(fresh: World) -> None:
    client = "127.0.0.3"
    # THRESHOLD unknown recipients are answered honestly; the next one is blocked.
    honest = THRESHOLD
    guesses = [f"guess{n}@example.com" for n in range(honest + 1)]
    result = send(
        fresh,
        f"dictionary attack (threshold {THRESHOLD}): blocked, postmaster still reachable",
        [*guesses, "alice@example.com", "postmaster@example.com"],
        client=client,
    )
    replies = [str(result.rcpts[g]) for g in guesses]
    assert replies[:honest] == [
        "550 " + rejected(g, "5.1.1", USER_UNKNOWN) for g in guesses[:honest]
    ]
    assert replies[honest] == "450 " + rejected(guesses[honest], "4.7.1", BLOCKED)
    # Blocked: a known recipient gets the same answer, so the harvester learns nothing.
    assert str(result.rcpts["alice@example.com"]) == "450 " + rejected(
        "alice@example.com", "4.7.1", BLOCKED
    )
    assert result.rcpts["postmaster@example.com"].code == 250
    assert result.data is not None and result.data.code == 250
    again = send(fresh, "blocked client, next session", ["alice@example.com"], client=client)
    assert again.rcpts["alice@example.com"].code == 450
    (relayed,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert relayed.rcpt_tos == ["postmaster@example.com"]


def test_blocked_client_is_disconnected_with_421_when_configured() -> None:
    # dictionary_attack.disconnect: the milter answers 421; Sendmail passes it on in
    # Postfix's "<rcpt>: " form (it prefixes only 450, 550 and 553) and closes the session.
    client = "127.0.0.6"
    with sendmail_world(dictionary_attack="disconnect: true") as world:
        guesses = [f"guess{n}@example.com" for n in range(THRESHOLD + 2)]
        result = send(
            world,
            f"dictionary attack, disconnect: true (threshold {THRESHOLD}): 421",
            guesses,
            client=client,
        )
        codes = [result.rcpts[g].code for g in guesses if g in result.rcpts]
        assert codes[:THRESHOLD] == [550] * THRESHOLD
        assert str(result.rcpts[guesses[THRESHOLD]]) == (
            f"421 4.7.1 <{guesses[THRESHOLD]}>: Recipient address rejected: "
            "Too many unknown recipients from your address, closing connection"
        )
        assert result.disconnected and guesses[THRESHOLD + 1] not in result.rcpts
        world.settle()
        assert world.outside.transactions == []


def test_null_sender_is_refused_and_not_counted(fresh: World) -> None:
    client = "127.0.0.4"
    gone = [f"gone{n}@example.com" for n in range(THRESHOLD + 2)]
    result = send(
        fresh,
        "null sender to unknown recipients: refused, not counted",
        gone,
        sender="",
        client=client,
    )
    assert [str(result.rcpts[g]) for g in gone] == [
        "550 " + rejected(g, "5.1.1", USER_UNKNOWN) for g in gone
    ]
    # Not one of them counted: this client is not blocked.
    after = send(fresh, "the same client afterwards", ["alice@example.com"], client=client)
    assert after.rcpts["alice@example.com"].code == 250


def test_bounce_sends_one_dsn_to_the_sender_with_a_null_envelope(fresh: World) -> None:
    result = send(
        fresh,
        "bounce: accepted, one DSN to the sender",
        ["zed@bounce.example", "zoe@bounce.example"],
        mail_options=["RET=HDRS", "ENVID=QQ314159"],
        rcpt_options=["NOTIFY=FAILURE"],
    )
    assert [r.code for r in result.rcpts.values()] == [250, 250]
    assert result.data is not None and result.data.code == 250
    (dsn,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    report = parse(dsn.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    _human, status, _headers = report.iter_parts()
    fields = status.as_string()
    assert "Original-Envelope-Id: QQ314159" in fields
    assert fields.count("Action: failed") == 2 and fields.count("Status: 5.1.1") == 2
    fresh.settle()
    assert len(fresh.outside.transactions) == 1  # the original went nowhere
    assert "discarded: no recipient left" in fresh.milter.log()
    # The DSN came back in through the daemon (and so the milter) from the submission
    # program, over SMTP from loopback.
    fresh.sendmail.log.wait_for(
        r"from=<>, .*daemon=MTA, relay=localhost \[127\.0\.0\.1\]", QUEUE_SECONDS
    )


def test_bounce_keeps_the_known_recipient(fresh: World) -> None:
    result = send(
        fresh,
        "bounce with a known recipient: DSN, original delivered",
        ["gone@bounce.example", "alice@example.com"],
    )
    assert result.data is not None and result.data.code == 250
    relayed = fresh.outside.wait_for(2, QUEUE_SECONDS)
    dsn, original = sorted(relayed, key=lambda t: t.mail_from)
    assert dsn.mail_from == "" and dsn.rcpt_tos == [SENDER]
    assert original.mail_from == SENDER and original.rcpt_tos == ["alice@example.com"]


def test_an_unverifiable_bounce_goes_in_a_transaction_of_its_own(fresh: World) -> None:
    # A client outside dictionary_attack.exempt, and no bounce.authserv_id: the sender of
    # a bounce can only be judged at end of message, where nothing verifies it.
    client = "127.0.0.7"
    title = "unverifiable bounce beside a known recipient: 452 4.5.3, then alone: 550"
    mixed = send(fresh, title, ["alice@example.com", "gone@bounce.example"], client=client)
    assert mixed.rcpts["alice@example.com"].code == 250
    assert str(mixed.rcpts["gone@bounce.example"]) == (
        "452 4.5.3 <gone@bounce.example>: Recipient address rejected: Too many recipients; "
        "send this one again in a separate transaction"
    )
    assert mixed.data is not None and mixed.data.code == 250
    alone = send(fresh, "the deferred recipient alone", ["gone@bounce.example"], client=client)
    assert alone.rcpts["gone@bounce.example"].code == 250
    assert alone.data is not None and alone.data.code == 550
    assert "5.1.1 <gone@bounce.example>: Recipient address rejected" in alone.data.text
    (relayed,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert relayed.rcpt_tos == ["alice@example.com"]
    fresh.settle()
    assert len(fresh.outside.transactions) == 1  # no DSN to the unverified sender
    assert "rule=separate_transaction" in fresh.milter.log()


def test_deferred_unknown_recipients_sent_again_count_once(fresh: World) -> None:
    """The milter counts in the sendmail role: THRESHOLD unknown recipients, each deferred
    with 452 and sent again alone, are THRESHOLD attempts, not twice as many; the next
    unknown recipient blocks the client."""
    client = "127.0.0.8"
    for n in range(THRESHOLD):
        gone = f"gone{n}@bounce.example"
        mixed = send(fresh, f"452 split {n}", ["alice@example.com", gone], client=client)
        assert mixed.rcpts[gone].code == 452, mixed
        alone = send(fresh, f"452 split {n}, sent again", [gone], client=client)
        assert alone.rcpts[gone].code == 250, alone  # not blocked
        assert alone.data is not None and alone.data.code == 550
    result = send(fresh, "one unknown more: blocked", ["more@bounce.example"], client=client)
    assert str(result.rcpts["more@bounce.example"]) == "450 " + rejected(
        "more@bounce.example", "4.7.1", BLOCKED
    )


def test_bounce_for_an_unknown_local_sender_is_refused_at_rcpt(fresh: World) -> None:
    # A DSN to gone@example.com (a local domain, no such mailbox) would be refused here
    # (null sender, unknown recipient): the bounce recipient is refused at RCPT instead,
    # as `reject` would, and nothing is accepted whose report could not be delivered.
    logged = len(fresh.milter.log())
    result = send(
        fresh,
        "bounce for an unknown local sender: refused at RCPT, no DSN",
        ["zed@bounce.example", "alice@example.com"],
        sender="gone@example.com",
    )
    assert str(result.rcpts["zed@bounce.example"]) == "550 " + rejected(
        "zed@bounce.example", "5.1.1", USER_UNKNOWN
    )
    assert result.data is not None and result.data.code == 250
    (relayed,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert relayed.mail_from == "gone@example.com" and relayed.rcpt_tos == ["alice@example.com"]
    fresh.settle()
    assert len(fresh.outside.transactions) == 1  # no DSN, no postmaster notice
    log = fresh.milter.log()[logged:]
    assert "rule=unknown_bounce_sender_unknown" in log and "DSN" not in log


def test_forward_delivers_one_copy(fresh: World) -> None:
    result = send(fresh, "forward: one copy to the target", ["x@fwd.example", "y@fwd.example"])
    assert result.data is not None and result.data.code == 250
    (copy,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert copy.rcpt_tos == ["admin@fwd.example"] and copy.mail_from == SENDER
    message = parse(copy.data)
    assert message[ORIGINAL_TO_HEADER] == "<x@fwd.example>, <y@fwd.example>"
    assert message[HOP_HEADER] == f"{MYHOSTNAME} (forward)"
    fresh.settle()
    assert len(fresh.outside.transactions) == 1


def test_readdress_keeps_the_extension(fresh: World) -> None:
    result = send(
        fresh,
        "readdress: new domain, +ext kept",
        ["Zed+Tag@old.example"],
        rcpt_options=["NOTIFY=SUCCESS,FAILURE"],
    )
    assert result.data is not None and result.data.code == 250
    (relayed,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    (recipient,) = relayed.recipients
    assert recipient.address == "Zed+Tag@example.net"
    assert recipient.options["NOTIFY"] == "SUCCESS,FAILURE"
    assert recipient.options["ORCPT"] == "rfc822;Zed+2BTag@old.example"
    assert parse(relayed.data)[HOP_HEADER] == f"{MYHOSTNAME} (readdress)"


def test_create_makes_the_mailbox_and_delivers(fresh: World) -> None:
    result = send(fresh, "create: mailbox made, delivered", ["newbie@shop.example"])
    assert result.data is not None and result.data.code == 250
    (relayed,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert relayed.rcpt_tos == ["newbie@shop.example"]
    box = fresh.store.get_mailbox("newbie@shop.example")
    assert box is not None and box.created_by == "create"
    again = send(
        fresh, "create: the new mailbox is known", ["newbie@shop.example"], client="127.0.0.5"
    )
    assert again.rcpts["newbie@shop.example"].code == 250
    assert "mailbox created: newbie@shop.example" in fresh.milter.log()


def _unaltered(original: bytes, relayed: Transaction, hops: int) -> None:
    """The relayed message is the original plus Sendmail's Received: and the milter's hop
    trace: every header field of the original kept as it was, the body byte for byte."""
    copy = parse(relayed.data)
    sent = parse(original)
    for name, _value in sent.items():
        assert copy.get_all(name) == sent.get_all(name), name
    assert copy.get_all(HOP_HEADER) == [f"{MYHOSTNAME} (outbox)"] * hops
    assert relayed.data.split(b"\r\n\r\n", 1)[1] == original.split(b"\r\n\r\n", 1)[1]


def test_outbox_is_relayed_unaltered_to_the_outbox_relay_once(fresh: World) -> None:
    # far@split.example is unknown: Sendmail asks the milter's socket map (ldap_routing)
    # and relays it to the outbox relay; carol@split.example is known: the usual route.
    recipients = ["far@split.example", "carol@split.example"]
    message = make_message(SENDER, recipients)
    result = send(fresh, "outbox: accepted, relayed unaltered", recipients, message=message)
    assert [r.code for r in result.rcpts.values()] == [250, 250]
    assert result.data is not None and result.data.code == 250
    (relayed,) = fresh.mx2.wait_for(1, QUEUE_SECONDS)
    assert relayed.mail_from == SENDER and relayed.rcpt_tos == ["far@split.example"]
    _unaltered(message, relayed, hops=1)
    (usual,) = fresh.outside.wait_for(1, QUEUE_SECONDS)
    assert usual.rcpt_tos == ["carol@split.example"]
    fresh.settle()
    assert len(fresh.mx2.transactions) == 1 and len(fresh.outside.transactions) == 1
    fresh.sendmail.log.wait_for(
        rf"to=<far@split\.example>, .*relay=\[{MX2_HOST}\] .*stat=Sent", QUEUE_SECONDS
    )


def test_outbox_loop_between_the_two_servers_ends_with_554(fresh: World) -> None:
    # Each server thinks the other has the mailbox: mx2 sends the message back, as
    # received, and Sendmail relays it to mx2 again. Every pass adds a hop; the pass that
    # arrives with max_hops hops is refused at the end of DATA, and the loop ends.
    max_hops = LoopSettings().max_hops
    first = make_message(SENDER, ["far@split.example"])
    result = send(fresh, "outbox loop: first pass", ["far@split.example"], message=first)
    assert result.data is not None and result.data.code == 250
    returned: list[SendResult] = []
    for passes in range(1, max_hops + 2):
        relayed = fresh.mx2.wait_for(passes, QUEUE_SECONDS)[-1]
        assert relayed.rcpt_tos == ["far@split.example"]
        _unaltered(first, relayed, hops=passes)
        again = send(
            fresh,
            f"outbox loop: mx2 sends it back with {passes} hops",
            ["far@split.example"],
            message=relayed.data,
        )
        returned.append(again)
        assert again.data is not None
        if again.data.code != 250:
            break
    assert [r.data.code for r in returned if r.data] == [250] * (max_hops - 1) + [554]
    assert str(returned[-1].data) == "554 5.4.6 Mail loop detected: too many hops"
    fresh.settle()
    assert len(fresh.mx2.transactions) == max_hops and fresh.outside.transactions == []


def test_outbox_waits_in_the_queue_while_the_socket_map_is_down() -> None:
    # mx2 defers the first attempt, so the recipient waits in Sendmail's queue. With the
    # milter (and its socket map) down, a queue run must not send it the usual way;
    # once the milter is back, the next run relays it to the outbox relay, once.
    replies = ["451 4.3.0 Try again later"]

    def mx2_reply(_address: str) -> str:
        return replies.pop() if replies else "250 2.1.5 Ok"

    with sendmail_world(mx2_rcpt_reply=mx2_reply) as world:
        result = send(world, "outbox: relay deferred, queued", ["far@split.example"])
        assert result.data is not None and result.data.code == 250
        world.sendmail.log.wait_for(r"to=<far@split\.example>, .*stat=Deferred", QUEUE_SECONDS)
        world.milter.stop()
        run = world.sendmail.sendmail("-q", "-v")  # one queue run, what it says on the way
        assert "<far@split.example>... Transient parse error" in run, run
        assert len(world.sendmail.queued()) == 1
        assert world.mx2.transactions == [] and world.outside.transactions == []
        world.milter.start()
        world.sendmail.flush_queue()
        world.settle()
        (relayed,) = world.mx2.transactions
        assert relayed.rcpt_tos == ["far@split.example"] and world.outside.transactions == []


def test_loop_is_refused_with_554(fresh: World) -> None:
    hops = "".join(f"{HOP_HEADER}: mx{i}.example (forward)\r\n" for i in range(5)).encode()
    result = send(
        fresh,
        "loop: 554 5.4.6 at end of DATA",
        ["x@fwd.example"],
        message=hops + make_message(SENDER, ["x@fwd.example"]),
    )
    assert result.data is not None and result.data.code == 554
    assert result.data.text.startswith("5.4.6 ")
    fresh.settle()
    assert fresh.outside.transactions == []


def _session_replies(port: int, steps: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Run raw SMTP commands; (command, reply) for each, the 220 greeting first."""
    client = smtplib.SMTP(timeout=30)
    code, text = client.connect("127.0.0.1", port)
    replies = [("(connect)", f"{code} {text.decode()}")]
    try:
        for command, argument in steps:
            if command == "DATA":
                try:
                    code, text = client.data(argument.encode())
                except smtplib.SMTPDataError as refused:
                    code, text = refused.smtp_code, refused.smtp_error
            else:
                code, text = client.docmd(command, argument)
            replies.append(
                (
                    f"{command} {argument}".strip() if command != "DATA" else "DATA",
                    f"{code} {text.decode()}",
                )
            )
    finally:
        client.close()
    return replies


def test_milter_down_tempfails_and_the_retry_is_delivered_once() -> None:
    with sendmail_world() as world:
        port = world.sendmail.smtp_port
        message = make_message(SENDER, ["x@fwd.example"]).decode()
        client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30)
        try:
            steps = [
                ("EHLO client.test", client.ehlo()),
                (f"MAIL FROM:<{SENDER}>", client.mail(SENDER)),
                ("RCPT TO:<x@fwd.example>", client.rcpt("x@fwd.example")),
            ]
            world.milter.kill()  # it has seen MAIL and RCPT, not the message
            try:
                code, text = client.data(message.encode())
            except smtplib.SMTPDataError as refused:
                code, text = refused.smtp_code, refused.smtp_error
        finally:
            client.close()
        steps.append(("DATA (milter killed)", (code, text)))
        record(
            "milter killed mid-message: tempfail at end of DATA",
            *(f"{c}  ->  {r[0]} {r[1].decode().splitlines()[0]}" for c, r in steps),
        )
        assert [r[0] for _c, r in steps[:3]] == [250, 250, 250]
        assert (code, text.decode()) == (451, "4.3.2 Please try again later")
        # Down before the session: Sendmail still greets, then tempfails MAIL.
        down = _session_replies(port, [("EHLO", "client.test"), ("MAIL", f"FROM:<{SENDER}>")])
        record(
            "milter down at connect: 220, then tempfail at MAIL",
            *(f"{c}  ->  {r.splitlines()[0]}" for c, r in down),
        )
        assert down[0][1].startswith("220 ")
        assert down[2][1] == "451 4.3.2 Please try again later"
        world.settle()
        assert world.outside.transactions == []
        world.milter.start()
        retry = send(world, "the retry, milter back", ["x@fwd.example"])
        assert retry.data is not None and retry.data.code == 250
        (copy,) = world.outside.wait_for(1, QUEUE_SECONDS)
        assert copy.rcpt_tos == ["admin@fwd.example"]
        world.settle()
        assert len(world.outside.transactions) == 1


def _wait_for_reply(world: World, recipient: str, code: int) -> SendResult:
    """Send until `recipient` gets `code` (the gauge samples every second)."""
    deadline = time.monotonic() + QUEUE_SECONDS
    while True:
        result = send_message(
            world.sendmail.host, world.sendmail.smtp_port, sender=SENDER, recipients=[recipient]
        )
        if result.rcpts[recipient].code == code or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_queue_limits_read_sendmails_queue() -> None:
    with sendmail_world(queue_limits="high_water: 1, defer_water: 3, sample_interval: 1") as world:
        world.sendmail.submit_queued(2, "held@example.com")
        assert len(world.sendmail.queued()) == 2
        # Above high_water: accept-time actions fall back to reject.
        result = _wait_for_reply(world, "zed@bounce.example", 550)
        transcript("2 messages queued (high_water 1): bounce falls back to reject", SENDER, result)
        assert str(result.rcpts["zed@bounce.example"]) == "550 " + rejected(
            "zed@bounce.example", "5.1.1", USER_UNKNOWN
        )
        world.sendmail.submit_queued(2, "held@example.com")
        # Above defer_water: every new recipient is deferred, postmaster still accepted.
        result = _wait_for_reply(world, "alice@example.com", 452)
        transcript("4 messages queued (defer_water 3): deferred", SENDER, result)
        # Sendmail names the recipient only in 450, 550 and 553 replies: the milter does.
        assert str(result.rcpts["alice@example.com"]) == (
            "452 4.3.1 <alice@example.com>: Recipient address rejected: "
            "Insufficient system storage, try again later"
        )
        postmaster = send(
            world, "queue full: postmaster still accepted", ["postmaster@example.com"]
        )
        assert postmaster.rcpts["postmaster@example.com"].code == 250
        world.sendmail.flush_queue()
        world.settle()
        assert (
            _wait_for_reply(world, "alice@example.com", 250).rcpts["alice@example.com"].code == 250
        )


@pytest.mark.parametrize("identity", ["capability", "group"])
def test_queue_gauge_reads_the_queue_as_an_unprivileged_user(identity: str) -> None:
    # The milter runs as nobody, as systemd's User= runs it: Sendmail's queue (0700 root)
    # is counted with CAP_DAC_READ_SEARCH alone, or through the queue's group (0750, which
    # Sendmail accepts: it queues and delivers with it).
    with sendmail_world(queue_limits="high_water: 1, sample_interval: 1", identity=identity) as w:
        assert _milter_user(w) == UNPRIVILEGED_USER
        w.sendmail.submit_queued(2, "held@example.com")
        result = _wait_for_reply(w, "x@fwd.example", 550)
        transcript(f"queue counted as {UNPRIVILEGED_USER} ({identity}): 550", SENDER, result)
        assert str(result.rcpts["x@fwd.example"]) == "550 " + rejected(
            "x@fwd.example", "5.1.1", USER_UNKNOWN
        )
        assert "queue size not sampled" not in w.milter.log()
        w.sendmail.flush_queue()
        w.settle()
        assert _wait_for_reply(w, "x@fwd.example", 250).rcpts["x@fwd.example"].code == 250


def test_queue_gauge_without_access_logs_and_counts_nothing() -> None:
    with sendmail_world(
        queue_limits="high_water: 1, sample_interval: 1", identity="unprivileged"
    ) as w:
        assert _milter_user(w) == UNPRIVILEGED_USER
        w.sendmail.submit_queued(2, "held@example.com")
        deadline = time.monotonic() + QUEUE_SECONDS
        while "queue size not sampled" not in w.milter.log():
            assert time.monotonic() < deadline, w.milter.log()
            time.sleep(0.1)
        assert "Permission denied" in w.milter.log()
        # The valve fails open: the forward is carried out above high_water.
        result = send(w, "queue unreadable: counted 0, forward accepted", ["x@fwd.example"])
        assert result.data is not None and result.data.code == 250


def _milter_user(world: World) -> str:
    assert world.milter.process is not None
    status = Path(f"/proc/{world.milter.process.pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return pwd.getpwuid(uid).pw_name


def test_unix_socket_milter() -> None:
    with sendmail_world(unix_socket=True) as world:
        result = send(
            world,
            "milter on a unix socket (S=local:...)",
            ["nobody@example.com", "alice@example.com"],
        )
        assert str(result.rcpts["nobody@example.com"]) == "550 " + rejected(
            "nobody@example.com", "5.1.1", USER_UNKNOWN
        )
        assert result.data is not None and result.data.code == 250
        (relayed,) = world.outside.wait_for(1, QUEUE_SECONDS)
        assert relayed.rcpt_tos == ["alice@example.com"]
        # The socket map on a unix socket too (Sendmail's `socket local:/path`).
        outbox = send(world, "outbox, socket map on a unix socket", ["far@split.example"])
        assert outbox.data is not None and outbox.data.code == 250
        (relayed,) = world.mx2.wait_for(1, QUEUE_SECONDS)
        assert relayed.rcpt_tos == ["far@split.example"]


def test_milter_socket_below_a_world_writable_directory_stops_sendmail() -> None:
    # contrib/sendmail/README.md: Sendmail refuses such a socket ("unsafe") and does not
    # start, so the unix socket's directory must not be below /tmp.
    require_sendmail()
    root = Path(tempfile.mkdtemp(prefix="traqmilter-sendmail-"))
    try:
        root.chmod(0o755)  # as sendmail_world's: the instance checks its parents
        unsafe = root / "world-writable"
        unsafe.mkdir(mode=0o777)
        unsafe.chmod(0o1777)  # as /tmp
        instance = SendmailInstance(
            root / "sendmail",
            milter_socket=f"local:{unsafe}/milter.sock",
            socketmap_socket="inet:10041@127.0.0.1",
            relay_port=25,
            relay_domains=("example.com",),
        )
        with pytest.raises(SendmailError, match="sendmail exited 71") as refused:
            instance.start()
        assert f"local socket name {unsafe}/milter.sock unsafe: World writable directory" in (
            str(refused.value)
        )
    finally:
        shutil.rmtree(root)


def _m4_block(text: str) -> list[str]:
    block = text.split("```m4\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_the_docs_give_the_lines_the_tests_build_sendmail_from(world: World) -> None:
    shipped = [line for line in CONTRIB_MC.read_text().splitlines() if not line.startswith("dnl")]
    assert len(shipped) == 2 and shipped[0].startswith("INPUT_MAIL_FILTER(")
    assert shipped[1].startswith("FEATURE(`ldap_routing',")
    readme = (REPO / "contrib" / "sendmail" / "README.md").read_text()
    assert f" 1 {shipped[0]}\n" in readme and f" 2 {shipped[1]}\n" in readme
    assert "RELAY_DOMAIN(`example.com')dnl\n" in readme
    assert "LDAPROUTE_DOMAIN(`split.example')dnl\n" in readme
    documented = _m4_block((REPO / "docs" / "sendmail.md").read_text())
    assert documented[:2] == shipped
    built = world.sendmail.mc().splitlines()
    sockets = {
        CONTRIB_MILTER_SOCKET: f"S={world.sendmail.milter_socket}",
        CONTRIB_SOCKETMAP_SOCKET: f"socket {world.sendmail.socketmap_socket}",
    }
    for line in documented:
        for shipped_socket, ours in sockets.items():
            line = line.replace(shipped_socket, ours)
        assert line in built, line
