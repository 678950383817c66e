"""Issue 10's capabilities under the sendmail role, through real SMTP into a real Sendmail
8.17 (tests/integration/sendmail_world.py): `bounce_to: verified` (SMTP AUTH, an exempt
network, Authentication-Results of this host's verifier, forgeries ignored), the digest
and on_create, and a Sendmail as the client that meets the 452 4.5.3 split.

One world serves the module: Sendmail with SMTP AUTH (Cyrus SASL over a sasldb of its
own), the stand-in upstream verifier (tests/support/ar_milter.py: spf=pass for
good.example, spf=fail for anyone else) before traqmilter in InputMailFilters,
`bounce.authserv_id` naming it, and every domain's digest going to ADMIN, a mailbox of
example.com, through Sendmail's submission program and so through the milter again.
127.0.0.1 is exempt (dictionary_attack.exempt); the other clients are strangers.

With TRAQMILTER_SENDMAIL_TRANSCRIPTS=FILE the SMTP replies of each test are written there
(sendmail_world.write_transcripts_at_end).
"""

from __future__ import annotations

import email
import email.policy
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sendmail_world import (
    EXEMPT,
    QUEUE_SECONDS,
    World,
    record,
    send,
    sendmail_world,
    write_transcripts_at_end,  # noqa: F401 (an autouse fixture)
)

from tests.support.ar_milter import verifier_milter
from tests.support.capture import Transaction
from tests.support.sendmail import MYHOSTNAME, REPO, SendmailInstance
from tests.support.smtp import make_message, send_message

pytestmark = pytest.mark.sendmail

ADMIN = "hostmaster@example.com"
# A notify address of a local domain that does not exist: the digest is refused there.
NO_ADMIN = "nobody-here@example.com"
LOGIN, PASSWORD = "relayuser", "relay-secret"
PERIOD = 2  # seconds of a digest period: short, so a test sees several
# Clients neither exempt nor authenticated, one per test: each unknown recipient they send
# counts towards dictionary_attack.threshold (3).
STRANGERS = ("127.0.0.10", "127.0.0.11", "127.0.0.12")
STRANGER = "127.0.0.13"
SENDING_CLIENT = "127.0.0.8"  # the sending Sendmail's address
UNKNOWN_REJECTED = "5.1.1 <zed@bounce.example>: Recipient address rejected: User unknown"
FORGERIES = {
    "": "no Authentication-Results",
    "relay.elsewhere.example": "its own Authentication-Results of another authserv-id",
    MYHOSTNAME: "its own Authentication-Results of ours beside the verifier's",
}
SPLIT = (
    "452 4.5.3 <{}>: Recipient address rejected: Too many recipients; "
    "send this one again in a separate transaction"
)


@pytest.fixture(scope="module")
def world(on_create_hooks: Path) -> Iterator[World]:
    notify = (
        f"undelivered: {{notify: {ADMIN}, on_create: [{on_create_hooks / 'on_create'}]}}\n"
        f"notifications: {{period: {PERIOD}s}}\n"
        "exceptions: {'lost-*@fwd.example': "
        f"{{action: forward, forward_to: admin, notify: {NO_ADMIN}}}}}\n"
    )
    with (
        verifier_milter(MYHOSTNAME, "good.example") as port,
        sendmail_world(
            bounce=f"authserv_id: {MYHOSTNAME}",
            extra_config=notify,
            sasl_users={LOGIN: PASSWORD},
            milters_before=(f"inet:{port}@127.0.0.1",),
            mailboxes=(NO_ADMIN,),  # start-up refuses a notify address that is no mailbox
        ) as started,
    ):
        yield started


@pytest.fixture
def fresh(world: World) -> World:
    world.settle()
    world.clear()
    return world


def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + QUEUE_SECONDS + 2 * PERIOD
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def sent_to(world: World, recipient: str, *, sender: str = "") -> list[Transaction]:
    """What `outside` received for `recipient` alone from `sender` (null: DSNs, digests)."""
    return [
        t for t in world.outside.transactions if t.rcpt_tos == [recipient] and t.mail_from == sender
    ]


def body(transaction: Transaction) -> str:
    message = email.message_from_bytes(transaction.data, policy=email.policy.default)
    text: str = message.get_content()  # type: ignore[attr-defined]
    return text.replace("\r\n", "\n")


# --------------------------------------------------------------------------- notifications


def test_digest_reaches_the_admin_once_through_the_milter_and_on_create_runs(
    fresh: World, on_create_hooks: Path
) -> None:
    # First in the module: no earlier event is waiting for its period.
    created = send(
        fresh,
        "create with a notify address: the digest reaches it once, through the milter",
        ["newbie+tag@shop.example"],
        sender="someone@remote.example",
        client=EXEMPT,
    )
    assert created.data is not None and created.data.code == 250, created

    def digests() -> list[Transaction]:
        return sent_to(fresh, ADMIN)

    wait_until(lambda: any("newbie@shop.example" in body(t) for t in digests()), "the digest")
    first = next(t for t in digests() if "newbie@shop.example" in body(t))
    assert "New mailboxes (create):\n    newbie@shop.example\n" in body(first)
    message = email.message_from_bytes(first.data, policy=email.policy.default)
    assert message["To"] == ADMIN and message["Auto-Submitted"] == "auto-generated"
    ran = on_create_hooks / "ran"
    wait_until(ran.exists, "the on_create hook")
    assert ran.read_text() == "newbie@shop.example newbie@shop.example\n"
    # The digest went through Sendmail's submission program into the daemon, so through
    # the milter, as a null-sender message to a known mailbox.
    fresh.sendmail.log.wait_for(
        r"from=<>, .*daemon=MTA, relay=localhost \[127\.0\.0\.1\]", QUEUE_SECONDS
    )
    # No loop: the digest's own passage made no event. Any would be counted before this
    # forward, so in the digest that lists it or in one between the two.
    later = send(
        fresh,
        "forward after the digest: the next digest lists it alone",
        ["after@fwd.example"],
        sender="someone@remote.example",
        client=EXEMPT,
    )
    assert later.data is not None and later.data.code == 250, later
    wait_until(lambda: any("after@fwd.example" in body(t) for t in digests()), "a second digest")
    fresh.settle()
    since = digests()[digests().index(first) + 1 :]
    assert len(since) == 1, [body(t) for t in since]
    text = body(since[0])
    assert "after@fwd.example" in text
    for other in (ADMIN, "newbie", "shop.example", "MAILER-DAEMON"):
        assert other not in text, text
    log = fresh.milter.log()
    assert log.count(f"digest handed over: to=<{ADMIN}>") >= 2
    assert "mailbox created: newbie@shop.example" in log


# --------------------------------------------------------------------------- bounce_to: verified


@pytest.mark.parametrize(
    ("client", "login"),
    [("127.0.0.9", (LOGIN, PASSWORD)), (EXEMPT, None)],
    ids=["smtp auth", "exempt network"],
)
def test_a_trusted_client_gets_its_dsn(
    fresh: World, client: str, login: tuple[str, str] | None
) -> None:
    # The verifier says spf=fail for remote.example: only the client vouches for it.
    sender = f"trusted-{client}@remote.example"
    mark = len(fresh.milter.log())
    title = "SMTP AUTH" if login else "exempt network"
    result = send(
        fresh,
        f"bounce_to: verified, {title} client: DSN to the sender",
        ["zed@bounce.example"],
        sender=sender,
        client=client,
        login=login,
    )
    assert result.data is not None and result.data.code == 250, result
    wait_until(lambda: sent_to(fresh, sender), "the DSN")
    fresh.settle()
    (dsn,) = sent_to(fresh, sender)
    assert b"Final-Recipient: rfc822; zed@bounce.example" in dsn.data
    assert re.search(
        rf"milter: bounced: from=<{re.escape(sender)}> to=<zed@bounce\.example> "
        rf"client=\S*\[{re.escape(client)}\] rule=unknown_bounce_trusted_client",
        fresh.milter.log()[mark:],
    )
    if login is not None:  # Sendmail's {auth_authen}, read by the milter at MAIL
        fresh.sendmail.log.wait_for(
            rf"AUTH=server, relay=\[{re.escape(client)}\], authid={LOGIN}", QUEUE_SECONDS
        )


@pytest.mark.parametrize(
    ("forged", "client"),
    list(zip(FORGERIES, STRANGERS, strict=True)),
    ids=["no header", "another authserv-id", "our authserv-id beside the verifier's"],
)
def test_an_unverified_sender_is_refused_at_end_of_message(
    fresh: World, forged: str, client: str
) -> None:
    # The stranger's own claim of spf=pass is believed under no authserv-id: another one is
    # ignored, and one under ours is a second beside the verifier's (spf=fail), so neither
    # is believed. The bounce falls back to 550 for the message; no DSN.
    sender = "eve@evil.example"
    header = (
        f"Authentication-Results: {forged}; spf=pass smtp.mailfrom={sender}\r\n".encode()
        if forged
        else b""
    )
    mark = len(fresh.milter.log())
    result = send(
        fresh,
        f"bounce_to: verified, stranger, {FORGERIES[forged]}: 550 at end of DATA, no DSN",
        ["zed@bounce.example"],
        sender=sender,
        client=client,
        message=header + make_message(sender, ["zed@bounce.example"]),
    )
    assert result.rcpts["zed@bounce.example"].code == 250
    assert result.data is not None and result.data.code == 550, result
    assert UNKNOWN_REJECTED in result.data.text
    fresh.settle()
    assert sent_to(fresh, sender) == []
    log = fresh.milter.log()[mark:]
    assert "END-OF-MESSAGE" in log and "rule=unverified" in log


def test_the_verifiers_header_verifies_the_sender(fresh: World) -> None:
    # Sendmail shows traqmilter the header an earlier milter added.
    mark = len(fresh.milter.log())
    result = send(
        fresh,
        "bounce_to: verified, stranger with spf=pass from the verifier milter: DSN",
        ["zed@bounce.example"],
        sender="ann@good.example",
        client=STRANGER,
    )
    assert result.data is not None and result.data.code == 250, result
    wait_until(lambda: sent_to(fresh, "ann@good.example"), "the DSN")
    fresh.settle()
    assert len(sent_to(fresh, "ann@good.example")) == 1
    assert "rule=authres_spf_pass" in fresh.milter.log()[mark:]


# --------------------------------------------------------------------------- a Sendmail client


def test_a_real_sendmail_client_sends_the_deferred_recipient_again_alone(fresh: World) -> None:
    """A plain Sendmail relays a message for a known recipient and a bounce recipient to
    the world's Sendmail from a stranger's address: one of the two gets 452 4.5.3 and
    waits in its queue; its next queue run sends it alone, and each is delivered once."""
    sender, recipients = "eve@good.example", ["alice@example.com", "zed@bounce.example"]
    sending = SendmailInstance(
        fresh.root / "sending",
        milter_socket="",
        socketmap_socket="",
        relay_port=fresh.sendmail.smtp_port,
        relay_domains=(),
        client_address=SENDING_CLIENT,
        hostname="sender.traqmilter.test",
    )
    mark = len(fresh.milter.log())
    with sending:
        assert sending.log is not None
        submitted = send_message(
            sending.host, sending.smtp_port, sender=sender, recipients=recipients
        )
        assert submitted.data is not None and submitted.data.code == 250, submitted
        deferred = sending.log.wait_for(
            r"to=<([^>]+)>, .*dsn=4\.5\.3, reply=(452 4\.5\.3 <\1>: [^,]*), stat=Deferred",
            QUEUE_SECONDS,
        )
        later = deferred.group(1)
        assert deferred.group(2) == SPLIT.format(later)
        (first,) = set(recipients) - {later}
        sending.log.wait_for(rf"to=<{re.escape(first)}>, .*stat=Sent", QUEUE_SECONDS)
        assert len(sending.queued()) == 1
        sending.flush_queue()  # its next try
        retried = sending.log.wait_for(rf"to=<{re.escape(later)}>, .*(stat=Sent .*)", QUEUE_SECONDS)
        record(
            "a Sendmail relaying to it: 452 4.5.3, queued, sent alone on its next queue run",
            f"RCPT TO:<{later}>  ->  {deferred.group(2)}  (logged: stat=Deferred)",
            f"next queue run, RCPT TO:<{later}> alone  ->  {retried.group(1)}",
        )
        sending.wait_queue_empty(QUEUE_SECONDS)
        sending.flush_queue()  # nothing left to send again
        fresh.settle()
    # Once each: alice's copy, and the DSN for zed@bounce.example to the verified sender.
    (copy,) = sent_to(fresh, "alice@example.com", sender=sender)
    assert parse_to(copy) == ", ".join(recipients)
    (dsn,) = sent_to(fresh, sender)
    assert b"Final-Recipient: rfc822; zed@bounce.example" in dsn.data
    log = fresh.milter.log()[mark:]
    assert f"{SPLIT.format(later)}; from=<{sender}> to=<{later}>" in log
    assert "rule=separate_transaction" in log and "rule=authres_spf_pass" in log


def parse_to(transaction: Transaction) -> str:
    message = email.message_from_bytes(transaction.data, policy=email.policy.default)
    return str(message["To"])


def test_the_docs_give_the_auth_setup_the_tests_run(world: World) -> None:
    docs = (REPO / "docs" / "sendmail.md").read_text()
    section = docs.partition("*An SMTP AUTH client.*")[2].partition("*An exempt network.*")[0]
    mc, conf = (block.split("```")[0] for block in section.split("```\n")[1:4:2])
    built = world.sendmail.mc().splitlines()
    for line in (line.strip() for line in mc.splitlines() if line.strip()):
        assert line in built, line
    ours = (world.sendmail.sasl_directory / "Sendmail.conf").read_text().splitlines()
    documented = [line.strip() for line in conf.splitlines() if line.strip()]
    assert documented[:-1] == ours[:-1]  # all but sasldb_path, the test's own
    assert documented[-1].startswith("sasldb_path: ") and ours[-1].startswith("sasldb_path: ")


def test_a_digest_to_a_removed_notify_mailbox_is_refused_and_tried_again(fresh: World) -> None:
    # Last in the module: from here on the refused digest is tried again every period.
    # Start-up refuses a notify address that is no mailbox; one removed afterwards stays.
    assert fresh.store.remove_mailbox(NO_ADMIN)
    # The digest (null sender) meets the rule for null-sender mail to an unknown recipient:
    # refused, never an action, never counted, so no loop. Sendmail's submission program
    # exits 67 (no such user) and reports the refusal to Sendmail's postmaster; the milter
    # keeps the digest for its next attempt (traqmilter.milter.notify), refused alike.
    mark = len(fresh.milter.log())
    kept = f"digest to {NO_ADMIN} not handed over (kept for the next attempt)"
    result = send(
        fresh,
        "forward whose digest goes to an unknown local address",
        ["lost-1@fwd.example"],
        sender="someone@remote.example",
        client=EXEMPT,
    )
    assert result.data is not None and result.data.code == 250, result
    wait_until(lambda: fresh.milter.log()[mark:].count(kept) >= 2, "two refused attempts")
    wait_until(lambda: len(sent_to(fresh, "postmaster@example.com")) >= 2, "two notices")
    log = fresh.milter.log()[mark:]
    assert log.count(f"to=<{NO_ADMIN}> rule=unknown_null_sender") >= 2
    assert "exited with 67" in log
    assert log.count("milter: forwarded: ") == 1  # the refusals made no event of their own
    refused = fresh.sendmail.log.wait_for(
        rf"to={re.escape(NO_ADMIN)}, .*(reply=550 [^,]*), stat=User unknown", QUEUE_SECONDS
    )
    record(
        "the digest to an unknown local address, as Sendmail's submission program logged it",
        f"RCPT TO:<{NO_ADMIN}>  ->  {refused.group(1).removeprefix('reply=')}",
    )
    assert all(NO_ADMIN.encode() in n.data for n in sent_to(fresh, "postmaster@example.com"))
    copies = [t for t in fresh.outside.transactions if t.rcpt_tos == ["admin@fwd.example"]]
    assert len(copies) == 1  # the forward itself
    assert sent_to(fresh, NO_ADMIN) == []
