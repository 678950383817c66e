"""Golden transcript: Postfix requests in, policy replies and log lines out, through the real
server, adapter and engine over a loopback socket, with the server reading 4096, 128, 16 and 1
bytes at a time (and the client writing in pieces of the same size)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from policyd_support import OMIT, Deployment, PolicyClient, ServerThread, policy_request

from policyd.adapter import PolicyAdapter
from policyd.main import decision_observer
from traqmilter.core.attack import Block

pytestmark = pytest.mark.timeout(60)

READ_SIZES = [4096, 128, 16, 1]
DUNNO = b"action=DUNNO\n\n"
# Postfix itself puts "<recipient>: Recipient address rejected: " before the reply's text.
UNKNOWN = b"action=550 5.1.1 User unknown\n\n"
BLOCKED = b"action=450 4.7.1 Too many unknown recipients from your address, try again later\n\n"
BAD_ADDRESS = b"action=501 5.1.3 Bad recipient address syntax\n\n"
QUEUE_FULL = b"action=452 4.3.1 Insufficient system storage, try again later\n\n"
ATTACKER = "198.51.100.7"

ZED = "zed@example.com"
PM = "postmaster@example.com"


def rcpt(recipient: str = "alice@example.com", client: str = "203.0.113.5", **more: str) -> bytes:
    return policy_request(recipient=recipient, client_address=client, **more)


def crlf(request: bytes) -> bytes:
    """The request as a policy client other than Postfix writes it: CR LF line ends."""
    return request.replace(b"\n", b"\r\n")


SENDER = "someone@sender.example"
C = "203.0.113.5"
A = "alice@example.com"
REJECTED = "Recipient address rejected"
ZED_UNKNOWN = f"550 5.1.1 <{ZED}>: {REJECTED}: User unknown"
BLOCKED_TEXT = "Too many unknown recipients from your address, try again later"


def logged(
    action: str, client: str, to: str, rule: str, said: str = "", sender: str = SENDER
) -> str:
    """The decision line policyd logs (traqmilter.logs.decision; the fixed parts are those
    of policy_request); `said` is the reply as the line shows it."""
    said = f" {said};" if said else ""
    return (
        f"NOQUEUE: policyd: {action}: RCPT from mail.sender.example[{client}]:{said} "
        f"from=<{sender}> to=<{to}> proto=ESMTP helo=<mail.sender.example> rule={rule}"
    )


def unknown(client: str) -> list[str]:
    return [logged("reject", client, ZED, "unknown_reject", ZED_UNKNOWN)]


def blocked(to: str = ZED) -> list[str]:
    said = f"450 4.7.1 <{to}>: {REJECTED}: {BLOCKED_TEXT}"
    return [logged("defer", ATTACKER, to, "client_blocked", said)]


NO_RECIPIENT = [logged("dunno", ATTACKER, "", "no_recipient")]

# label, queue size while asking, request, want reply, want log lines (at level DEBUG).
# One persistent connection, in order.
TRANSCRIPT: list[tuple[str, int, bytes, bytes, list[str]]] = [
    ("known", 0, rcpt(), DUNNO, [logged("dunno", C, A, "known")]),
    ("known, case and extension", 0, rcpt("Alice+news@EXAMPLE.com"), DUNNO,
     [logged("dunno", C, "Alice+news@EXAMPLE.com", "known")]),
    ("unknown", 0, rcpt(ZED, "192.0.2.1"), UNKNOWN, unknown("192.0.2.1")),
    ("unknown UTF-8", 0, rcpt("zoë@example.com", "192.0.2.2"), UNKNOWN,
     [logged("reject", "192.0.2.2", "zo\\xeb@example.com", "unknown_reject",
             f"550 5.1.1 <zo\\xeb@example.com>: {REJECTED}: User unknown")]),
    ("unknown, reason naming the recipient", 0, rcpt("Zoë+x@Example.NET", "192.0.2.3"),
     "action=550 5.1.1 No mailbox zoë+x@example.net here\n\n".encode(),
     [logged("reject", "192.0.2.3", "Zo\\xeb+x@Example.NET", "unknown_reject",
             f"550 5.1.1 <Zo\\xeb+x@Example.NET>: {REJECTED}: No mailbox zoë+x@example.net here")]),
    ("known UTF-8", 0, rcpt("josé@example.com"), DUNNO,
     [logged("dunno", C, "jos\\xe9@example.com", "known")]),
    ("remote domain", 0, rcpt("zed@elsewhere.example"), DUNNO,
     [logged("dunno", C, "zed@elsewhere.example", "not_local")]),
    ("postmaster", 0, rcpt(PM), DUNNO, [logged("dunno", C, PM, "postmaster")]),
    ("bad address", 0, rcpt("a b@example.com"), BAD_ADDRESS,
     [logged("reject", C, "a b@example.com", "bad_address",
             f"501 5.1.3 <a b@example.com>: {REJECTED}: Bad recipient address syntax")]),
    # A request that names no recipient: no opinion, and not counted (below: the attacker's
    # block still takes `threshold` unknown recipients).
    ("empty recipient", 0, rcpt("", ATTACKER), DUNNO, NO_RECIPIENT),
    ("missing recipient", 0, rcpt(OMIT, ATTACKER), DUNNO, NO_RECIPIENT),
    ("missing recipient, again", 0, rcpt(OMIT, ATTACKER), DUNNO, NO_RECIPIENT),
    ("missing recipient, CR LF", 0, crlf(rcpt(OMIT, ATTACKER)), DUNNO, NO_RECIPIENT),
    ("CR LF: known", 0, crlf(rcpt()), DUNNO, [logged("dunno", C, A, "known")]),
    ("CR LF: unknown", 0, crlf(rcpt(ZED, "192.0.2.4")), UNKNOWN, unknown("192.0.2.4")),
    ("state MAIL", 0, policy_request(protocol_state="MAIL", recipient=OMIT), DUNNO, []),
    ("state DATA", 0, rcpt(protocol_state="DATA"), DUNNO, []),
    ("state END-OF-MESSAGE", 0, rcpt(protocol_state="END-OF-MESSAGE"), DUNNO, []),
    ("state VRFY", 0, rcpt(ZED, protocol_state="VRFY"), DUNNO, []),
    ("unknown attributes ignored", 0, rcpt(future_attribute="x"), DUNNO,
     [logged("dunno", C, A, "known")]),
    ("queue full", 60_001, rcpt(), QUEUE_FULL,
     [logged("defer", C, A, "queue_full",
             f"452 4.3.1 <{A}>: {REJECTED}: Insufficient system storage, try again later")]),
    ("queue full, postmaster passes", 60_001, rcpt(PM), DUNNO,
     [logged("dunno", C, PM, "postmaster")]),
    ("queue full, remote passes", 60_001, rcpt("x@elsewhere.example"), DUNNO,
     [logged("dunno", C, "x@elsewhere.example", "not_local")]),
    ("null sender: refused, not counted", 0, rcpt(ZED, ATTACKER, sender=""), UNKNOWN,
     [logged("reject", ATTACKER, ZED, "unknown_null_sender", ZED_UNKNOWN, sender="")]),
    ("authenticated: not counted", 0, rcpt(ZED, ATTACKER, sasl_username="u"), UNKNOWN,
     unknown(ATTACKER)),
    ("exempt network: not counted", 0, rcpt(ZED, "127.0.0.1"), UNKNOWN, unknown("127.0.0.1")),
    ("attack 1", 0, rcpt(ZED, ATTACKER), UNKNOWN, unknown(ATTACKER)),
    ("attack 2, CR LF", 0, crlf(rcpt(ZED, ATTACKER)), UNKNOWN, unknown(ATTACKER)),
    ("attack 3: the threshold, still answered", 0, rcpt(ZED, ATTACKER), UNKNOWN,
     unknown(ATTACKER)),
    ("attack 4, past the threshold, blocks", 0, rcpt(ZED, ATTACKER), BLOCKED,
     [*blocked(), f"policyd: block: client={ATTACKER} attempts=4 until=1970-01-12T14:46:40Z"]),
    ("blocked, CR LF", 0, crlf(rcpt(ZED, ATTACKER)), BLOCKED, blocked()),
    ("blocked: known gets the same answer", 0, rcpt(client=ATTACKER), BLOCKED, blocked(A)),
    ("blocked: postmaster still passes", 0, rcpt(PM, ATTACKER), DUNNO,
     [logged("dunno", ATTACKER, PM, "postmaster")]),
    ("other clients unaffected", 0, rcpt(), DUNNO, [logged("dunno", C, A, "known")]),
]  # fmt: skip

# label, request bytes: each on its own connection, each closed without a reply.
MALFORMED: list[tuple[str, bytes]] = [
    ("unknown request type", rcpt(request="smtpd_other_policy")),
    ("missing request", rcpt(request=OMIT)),
    ("line without '='", b"request=smtpd_access_policy\nprotocol_state RCPT\n\n"),
    ("duplicate recipient", rcpt().replace(b"recipient=", b"recipient=a@b\nrecipient=", 1)),
    ("NUL byte", rcpt(helo_name="a\0b")),
    ("invalid UTF-8", rcpt().replace(b"alice", b"al\xffce")),
    ("empty request", b"\n"),
    ("CR LF line without '='", crlf(rcpt()).replace(b"protocol_state=", b"protocol_state ")),
    ("CR LF, line too long", crlf(rcpt(ccert_subject="x" * 3000))),
    ("line too long", rcpt(ccert_subject="x" * 3000)),
]


def _capturing_logger(lines: list[str]) -> logging.Logger:
    """A logger of its own at DEBUG whose messages land in `lines` (not propagated)."""
    logger = logging.getLogger(f"golden.{id(lines)}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger.handlers = [Keep()]
    return logger


@pytest.mark.parametrize("read_size", READ_SIZES)
def test_golden_transcript(
    read_size: int,
    deployment: Deployment,
    start_server: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    lines: list[str] = []
    adapter = PolicyAdapter(
        deployment.engine,
        deployment.blocks.append,
        on_decision=decision_observer(_capturing_logger(lines), None),  # as policyd.main's
    )
    server = start_server(adapter, read_size=read_size)
    client = connect(server.port)
    got = []
    for label, queue_size, request, _, _ in TRANSCRIPT:
        server.call(lambda size=queue_size: setattr(deployment.queue, "size", size))  # type: ignore[misc]
        lines.clear()
        reply = client.ask(request, chunk=read_size)
        got.append((label, reply, list(lines)))
    assert got == [(label, want, log) for label, _, _, want, log in TRANSCRIPT]
    assert deployment.blocks == [Block(ATTACKER, 1_000_000.0 + 3600, 4)]
    assert client.is_open()


@pytest.mark.parametrize("read_size", READ_SIZES)
@pytest.mark.parametrize(("label", "bad_request"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_closes_without_reply(
    label: str,
    bad_request: bytes,
    read_size: int,
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve(read_size=read_size)
    client = connect(server.port)
    assert client.ask(policy_request(), chunk=read_size) == DUNNO
    client.send_until_refused(bad_request, chunk=read_size)
    assert client.read_to_eof() == b"", label
    assert server.call(lambda: server.server.protocol_errors) == 1
