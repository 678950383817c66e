"""bounce_to: verified end to end: real SMTP into a private Postfix with traqmilter's milter.

Two worlds, each with loopback no longer exempt (dictionary_attack.exempt: []) so the test
client is an untrusted stranger:
- `authres`: an upstream verifier (tests/support/ar_milter.py, standing in for OpenDKIM,
  OpenDMARC or an SPF milter) runs before traqmilter in smtpd_milters and adds one
  Authentication-Results header under this host's authserv-id; Postfix's header_checks
  removes any header the client sent under that id, as docs/actions.md tells the
  administrator to configure.
- `spf`: no upstream verifier; traqmilter checks SPF itself at RCPT time against a DNS
  server on loopback (tests/support/dns_server.py). No real DNS is asked.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import pytest
from milter_world import QUEUE_SECONDS, World, milter_world

from tests.support.ar_milter import verifier_milter
from tests.support.dns_server import DnsServer
from tests.support.postfix import (
    MYHOSTNAME,
    TRUSTED_CLIENT,
    PostfixError,
    PostfixInstance,
)
from tests.support.smtp import Reply, SendResult, make_message, send_message

pytestmark = [pytest.mark.postfix, pytest.mark.slow]

UNTRUSTED = "dictionary_attack: {exempt: []}\n"
DROP_EXCEPTION = "exceptions: {'drop-*@bounce.example': {action: bounce, unverified: discard}}\n"
# Postfix 3.7 inline regexp table: the client's own copies of our A-R header are removed
# by cleanup(8) before any milter sees the message; headers a milter adds are not subject
# to header_checks.
STRIP_OURS = "{ {/^Authentication-Results:[[:space:]]*mx[.]traqmilter[.]test[[:space:];]/ IGNORE} }"
UNKNOWN_REJECTED = "5.1.1 <zed@bounce.example>: Recipient address rejected: User unknown"


@pytest.fixture(scope="module")
def authres() -> Iterator[World]:
    with (
        verifier_milter(MYHOSTNAME, "good.example") as port,
        milter_world(
            extra_config=UNTRUSTED + DROP_EXCEPTION,
            bounce_config=f"authserv_id: {MYHOSTNAME}",
            milters_before=[f"inet:127.0.0.1:{port}"],
            header_checks=[f"regexp:{STRIP_OURS}"],
        ) as world,
    ):
        yield world


@pytest.fixture
def ar(authres: World) -> World:
    authres.settle()
    authres.clear()
    return authres


def send(world: World, sender: str, recipients: list[str], extra_headers: str = "") -> SendResult:
    message = extra_headers.encode() + make_message(sender, recipients)
    return send_message(
        world.postfix.host,
        world.postfix.smtp_port,
        sender=sender,
        recipients=recipients,
        message=message,
    )


def data_reply(result: SendResult) -> Reply:
    assert result.data is not None, result
    return result.data


def test_sender_verified_by_the_upstream_header_gets_the_dsn(ar: World) -> None:
    result = send(ar, "alice@good.example", ["zed@bounce.example"])
    assert data_reply(result).code == 250
    (dsn,) = ar.outside.wait_for(1, QUEUE_SECONDS)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["alice@good.example"]
    assert b"Status: 5.1.1" in dsn.data
    ar.settle()
    log = ar.milter.log()
    assert "milter: bounced: from=<alice@good.example> to=<zed@bounce.example>" in log
    assert "rule=authres_spf_pass" in log


def test_forged_header_of_another_authserv_id_is_ignored(ar: World) -> None:
    forged = (
        "Authentication-Results: relay.elsewhere.example;"
        " spf=pass smtp.mailfrom=eve@evil.example\r\n"
    )
    result = send(ar, "eve@evil.example", ["zed@bounce.example"], forged)
    reply = data_reply(result)
    assert (reply.code, UNKNOWN_REJECTED in reply.text) == (550, True), reply
    assert "END-OF-MESSAGE" in ar.milter.log() and "rule=unverified" in ar.milter.log()
    ar.settle()
    assert ar.outside.transactions == []  # no DSN to the forged sender


def test_forged_header_under_our_own_authserv_id_is_removed_by_postfix(ar: World) -> None:
    forged = f"Authentication-Results: {MYHOSTNAME}; spf=pass smtp.mailfrom=eve@evil.example\r\n"
    result = send(ar, "eve@evil.example", ["zed@bounce.example"], forged)
    assert data_reply(result).code == 550
    ar.settle()
    assert ar.outside.transactions == []


def test_unverified_discard_drops_the_recipient_and_delivers_the_rest(ar: World) -> None:
    result = send(ar, "eve@evil.example", ["alice@example.com", "drop-me@bounce.example"])
    assert data_reply(result).code == 250
    ar.settle()
    *_, delivered = ar.postfix.maildir_messages("alice@example.com")
    assert delivered["Authentication-Results"].startswith(f"{MYHOSTNAME}; spf=fail")
    assert ar.outside.transactions == []  # no DSN
    log = ar.milter.log()
    assert (
        "dropped: sender not verified: from=<eve@evil.example> to=<drop-me@bounce.example>" in log
    )
    assert "rule=unverified_discard" in log


SPLIT = (
    "4.5.3 <{}>: Recipient address rejected: Too many recipients; "
    "send this one again in a separate transaction"
)


@pytest.mark.parametrize(
    ("first", "later"),
    [("alice@example.com", "zed@bounce.example"), ("zed@bounce.example", "alice@example.com")],
    ids=["known first", "unverified first"],
)
def test_unverified_beside_a_known_recipient_goes_in_a_transaction_of_its_own(
    ar: World, first: str, later: str
) -> None:
    """The later of the two kinds gets 452 4.5.3 at RCPT time; the first transaction goes
    on with the first kind; the client sends the deferred recipient again in a new
    transaction (smtplib does not retry by itself: the test does what a client does)."""
    mark = len(ar.milter.log())
    before = len(ar.postfix.maildir_messages("alice@example.com"))
    result = send(ar, "eve@evil.example", [first, later])
    assert (result.rcpts[first].code, result.rcpts[later].code) == (250, 452), result
    assert result.rcpts[later].text == SPLIT.format(later)
    retry = send(ar, "eve@evil.example", [later])
    assert retry.rcpts[later].code == 250, retry
    known, unverified = (result, retry) if first == "alice@example.com" else (retry, result)
    assert data_reply(known).code == 250
    reply = data_reply(unverified)
    assert (reply.code, UNKNOWN_REJECTED in reply.text) == (550, True), reply
    ar.settle()
    *_, delivered = ar.postfix.maildir_messages("alice@example.com")
    assert len(ar.postfix.maildir_messages("alice@example.com")) == before + 1
    assert delivered["Authentication-Results"].startswith(f"{MYHOSTNAME}; spf=fail")
    assert ar.outside.transactions == []  # no DSN to the unverified sender
    log = ar.milter.log()[mark:]
    assert f"452 {SPLIT.format(later)}; from=<eve@evil.example> to=<{later}>" in log
    assert "rule=separate_transaction" in log and "rule=unverified" in log


# --------------------------------------------------------------------------- a real client

SENDING_HOSTNAME = "sender.traqmilter.test"


@contextlib.contextmanager
def chained(extra_config: str = UNTRUSTED) -> Iterator[tuple[World, PostfixInstance]]:
    """The `authres` world as contrib deploys it (policyd in front too), fed by a second
    private Postfix, plain (no milter, no policy service, no local domains), that relays
    everything to it: a real Postfix smtp(8) client, which retries deferred recipients
    itself. It binds to TRUSTED_CLIENT, in the receiving Postfix's mynetworks, so the
    bounce it writes for a refused recipient may be relayed on to `outside`; traqmilter
    still trusts no client (dictionary_attack.exempt: [])."""
    with (
        verifier_milter(MYHOSTNAME, "good.example") as port,
        milter_world(
            extra_config=extra_config,
            policyd=True,
            bounce_config=f"authserv_id: {MYHOSTNAME}",
            milters_before=[f"inet:127.0.0.1:{port}"],
            header_checks=[f"regexp:{STRIP_OURS}"],
        ) as world,
    ):
        sending = PostfixInstance(
            world.root / "sending",
            sqlite_path=world.root / "db" / "directory.sqlite",  # unused: no local domains
            relay_port=world.postfix.smtp_port,
            extra_main_cf={
                "myhostname": SENDING_HOSTNAME,
                "virtual_mailbox_domains": "",
                "virtual_mailbox_maps": "",
                "virtual_alias_maps": "",
                "smtp_bind_address": TRUSTED_CLIENT,
            },
        )
        with sending:
            yield world, sending


@pytest.fixture(scope="module")
def chain() -> Iterator[tuple[World, PostfixInstance]]:
    with chained() as pair:
        yield pair


def test_a_real_postfix_client_sends_the_deferred_recipient_again_alone(
    chain: tuple[World, PostfixInstance],
) -> None:
    world, sending = chain
    recipients = ["alice@example.com", "zed@bounce.example"]
    submitted = send_message(
        sending.host,
        sending.smtp_port,
        sender="eve@evil.example",
        recipients=recipients,
        source_address=TRUSTED_CLIENT,  # the sending Postfix relays for its mynetworks
    )
    assert data_reply(submitted).code == 250, submitted
    relay = rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{world.postfix.smtp_port}"
    said = r"host 127\.0\.0\.1\[127\.0\.0\.1\] said: "
    split = sending.wait_for_log(
        rf"to=<([^>]+)>, {relay},.* status=deferred \({said}452 4\.5\.3 <\1>: Recipient "
        r"address rejected: Too many recipients; send this one again in a separate "
        r"transaction \(in reply to RCPT TO command\)\)",
        QUEUE_SECONDS,
    )
    assert split.group(1) in recipients
    sending.wait_for_log(rf"to=<alice@example\.com>, {relay},.* status=sent \(250 ", QUEUE_SECONDS)
    sending.wait_for_log(
        rf"to=<zed@bounce\.example>, {relay},.* status=bounced \({said}550 5\.1\.1 "
        r"<zed@bounce\.example>: Recipient address rejected: User unknown "
        r"\(in reply to end of DATA command\)\)",
        QUEUE_SECONDS,
    )
    sending.wait_queue_empty(QUEUE_SECONDS)
    world.settle()
    *_, delivered = world.postfix.maildir_messages("alice@example.com")
    assert delivered["To"] == ", ".join(recipients)
    # The only report is the sending server's own, to a sender it accepted mail from:
    # traqmilter sent no DSN to the unverified sender.
    (report,) = world.outside.wait_for(1, QUEUE_SECONDS)
    assert (report.mail_from, report.rcpt_tos) == ("", ["eve@evil.example"])
    assert f"Reporting-MTA: dns; {SENDING_HOSTNAME}".encode() in report.data
    assert b"Final-Recipient: rfc822; zed@bounce.example" in report.data
    assert b"Status: 5.1.1" in report.data
    log = world.milter.log()
    assert "rule=separate_transaction" in log and "rule=unverified" in log
    # policyd had no objection to either recipient: the split is the milter's alone
    assert "rule=separate_transaction" not in world.policyd.log()


# --------------------------------------------------------------------------- attack counting
THRESHOLD = 3


@pytest.fixture(scope="module")
def counting_chain() -> Iterator[tuple[World, PostfixInstance]]:
    with chained(f"dictionary_attack: {{exempt: [], threshold: {THRESHOLD}}}\n") as pair:
        yield pair


def retried(sending: PostfixInstance, regex: str) -> None:
    """Wait for the sending Postfix's retry to be logged. Its queue manager sometimes finds
    the message still being delivered when it scans the deferred queue and then leaves it
    until a later scan (measured: more than 20 s with a 1 s queue_run_delay); a flush
    (`postqueue -f`) asks for that scan now, as an administrator would."""
    deadline = time.monotonic() + QUEUE_SECONDS
    while True:
        try:
            sending.wait_for_log(regex, 3)
            return
        except PostfixError:
            if time.monotonic() > deadline:
                raise
            sending.flush()


def test_unknown_recipients_split_off_and_sent_again_count_once(
    counting_chain: tuple[World, PostfixInstance],
) -> None:
    """policyd counts each unknown recipient at RCPT; the milter then defers it (452 4.5.3)
    beside a known one, and the sending Postfix sends it again later, alone. That retry
    is not counted a second time: THRESHOLD unknown recipients, each split off and
    retried, leave the client unblocked (each retry reaches end of data and gets its 550
    there); the next unknown recipient still blocks it."""
    world, sending = counting_chain
    relay = rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{world.postfix.smtp_port}"
    said = r"host 127\.0\.0\.1\[127\.0\.0\.1\] said: "
    for n in range(THRESHOLD):
        unknown = f"zed{n}@bounce.example"
        submitted = send_message(
            sending.host,
            sending.smtp_port,
            sender="eve@evil.example",
            # Postfix sends a message's recipients sorted by domain: a.example (not local,
            # relayed on: settled at RCPT time) comes first, so the unknown one is split off
            recipients=["amy@a.example", unknown],
            source_address=TRUSTED_CLIENT,
        )
        assert data_reply(submitted).code == 250, submitted
        at = re.escape(unknown)
        sending.wait_for_log(
            rf"to=<{at}>, {relay},.* status=deferred \({said}452 4\.5\.3 ", QUEUE_SECONDS
        )
        # the retry is accepted at RCPT (a blocked client would get 450 4.7.1 there)
        retried(
            sending,
            rf"to=<{at}>, {relay},.* status=bounced \({said}550 5\.1\.1 .*"
            r"\(in reply to end of DATA command\)\)",
        )
    sending.wait_queue_empty(QUEUE_SECONDS)
    assert "blocked" not in world.policyd.log()
    submitted = send_message(
        sending.host,
        sending.smtp_port,
        sender="eve@evil.example",
        recipients=["one-more@bounce.example"],
        source_address=TRUSTED_CLIENT,
    )
    assert data_reply(submitted).code == 250, submitted
    sending.wait_for_log(
        rf"to=<one-more@bounce\.example>, {relay},.* status=deferred \({said}450 4\.7\.1 ",
        QUEUE_SECONDS,
    )


# --------------------------------------------------------------------------- own SPF check

SPF_RECORDS = {
    ("spf-pass.example", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
    ("spf-fail.example", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"'],
}


@pytest.fixture(scope="module")
def spf_world() -> Iterator[tuple[World, DnsServer]]:
    with (
        DnsServer(SPF_RECORDS) as dns,
        milter_world(
            extra_config=UNTRUSTED,
            bounce_config=f'spf_check: true, spf_timeout: 3, spf_resolver: "{dns.address}"',
        ) as world,
    ):
        yield world, dns


def test_own_spf_check_decides_at_rcpt_time(spf_world: tuple[World, DnsServer]) -> None:
    world, dns = spf_world
    world.settle()
    world.clear()
    passing = send(world, "alice@spf-pass.example", ["zed@bounce.example"])
    assert data_reply(passing).code == 250
    (dsn,) = world.outside.wait_for(1, QUEUE_SECONDS)
    assert dsn.rcpt_tos == ["alice@spf-pass.example"]
    assert "rule=unknown_bounce_spf_pass" in world.milter.log()

    for sender in ("eve@spf-fail.example", "eve@no-such-domain.example"):
        failing = send(world, sender, ["zed@bounce.example"])
        reply = failing.rcpts["zed@bounce.example"]
        assert (reply.code, UNKNOWN_REJECTED in reply.text) == (550, True), (sender, reply)
    assert world.milter.log().count("rule=unknown_bounce_unverified") == 2

    asked = len(dns.asked())
    again = send(world, "alice@spf-pass.example", ["zed@bounce.example"])
    assert data_reply(again).code == 250
    assert len(dns.asked()) == asked  # the result was remembered
    world.settle()
    assert ("spf-pass.example", "TXT") in dns.asked()
