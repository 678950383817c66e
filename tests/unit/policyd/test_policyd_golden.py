"""Golden transcript: Postfix requests in, policy replies out, through the real server,
adapter and engine over a loopback socket, with the server reading 4096, 128, 16 and 1
bytes at a time (and the client writing in pieces of the same size)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from policyd_support import OMIT, Deployment, PolicyClient, ServerThread, policy_request

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


# label, queue size while asking, request, want reply. One persistent connection, in order.
TRANSCRIPT: list[tuple[str, int, bytes, bytes]] = [
    ("known", 0, rcpt(), DUNNO),
    ("known, case and extension", 0, rcpt("Alice+news@EXAMPLE.com"), DUNNO),
    ("unknown", 0, rcpt(ZED, "192.0.2.1"), UNKNOWN),
    ("unknown UTF-8", 0, rcpt("zoë@example.com", "192.0.2.2"), UNKNOWN),
    ("unknown, reason naming the recipient", 0, rcpt("Zoë+x@Example.NET", "192.0.2.3"),
     "action=550 5.1.1 No mailbox zoë+x@example.net here\n\n".encode()),
    ("known UTF-8", 0, rcpt("josé@example.com"), DUNNO),
    ("remote domain", 0, rcpt("zed@elsewhere.example"), DUNNO),
    ("postmaster", 0, rcpt(PM), DUNNO),
    ("bad address", 0, rcpt("a b@example.com"), BAD_ADDRESS),
    # A request that names no recipient: no opinion, and not counted (below: the attacker's
    # block still takes `threshold` unknown recipients).
    ("empty recipient", 0, rcpt("", ATTACKER), DUNNO),
    ("missing recipient", 0, rcpt(OMIT, ATTACKER), DUNNO),
    ("missing recipient, again", 0, rcpt(OMIT, ATTACKER), DUNNO),
    ("missing recipient, CR LF", 0, crlf(rcpt(OMIT, ATTACKER)), DUNNO),
    ("CR LF: known", 0, crlf(rcpt()), DUNNO),
    ("CR LF: unknown", 0, crlf(rcpt(ZED, "192.0.2.4")), UNKNOWN),
    ("state MAIL", 0, policy_request(protocol_state="MAIL", recipient=OMIT), DUNNO),
    ("state DATA", 0, rcpt(protocol_state="DATA"), DUNNO),
    ("state END-OF-MESSAGE", 0, rcpt(protocol_state="END-OF-MESSAGE"), DUNNO),
    ("state VRFY", 0, rcpt(ZED, protocol_state="VRFY"), DUNNO),
    ("unknown attributes ignored", 0, rcpt(future_attribute="x"), DUNNO),
    ("queue full", 60_001, rcpt(), QUEUE_FULL),
    ("queue full, postmaster passes", 60_001, rcpt(PM), DUNNO),
    ("queue full, remote passes", 60_001, rcpt("x@elsewhere.example"), DUNNO),
    ("null sender: refused, not counted", 0, rcpt(ZED, ATTACKER, sender=""), UNKNOWN),
    ("authenticated: not counted", 0, rcpt(ZED, ATTACKER, sasl_username="u"), UNKNOWN),
    ("exempt network: not counted", 0, rcpt(ZED, "127.0.0.1"), UNKNOWN),
    ("attack 1", 0, rcpt(ZED, ATTACKER), UNKNOWN),
    ("attack 2, CR LF", 0, crlf(rcpt(ZED, ATTACKER)), UNKNOWN),
    ("attack 3: the threshold, still answered", 0, rcpt(ZED, ATTACKER), UNKNOWN),
    ("attack 4, past the threshold, blocks", 0, rcpt(ZED, ATTACKER), BLOCKED),
    ("blocked, CR LF", 0, crlf(rcpt(ZED, ATTACKER)), BLOCKED),
    ("blocked: known gets the same answer", 0, rcpt(client=ATTACKER), BLOCKED),
    ("blocked: postmaster still passes", 0, rcpt(PM, ATTACKER), DUNNO),
    ("other clients unaffected", 0, rcpt(), DUNNO),
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


@pytest.mark.parametrize("read_size", READ_SIZES)
def test_golden_transcript(
    read_size: int,
    deployment: Deployment,
    start_server: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = start_server(deployment.adapter, read_size=read_size)
    client = connect(server.port)
    got = []
    for label, queue_size, request, _ in TRANSCRIPT:
        server.call(lambda size=queue_size: setattr(deployment.queue, "size", size))  # type: ignore[misc]
        got.append((label, client.ask(request, chunk=read_size)))
    assert got == [(label, want) for label, _, _, want in TRANSCRIPT]
    assert deployment.blocks == [Block(ATTACKER, 1_000_000.0 + 3600, 4)]
    assert client.is_open()


@pytest.mark.parametrize("read_size", READ_SIZES)
@pytest.mark.parametrize(("label", "bad_request"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_closes_without_reply(
    label: str,
    bad_request: bytes,
    read_size: int,
    deployment: Deployment,
    start_server: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = start_server(deployment.adapter, read_size=read_size)
    client = connect(server.port)
    assert client.ask(policy_request(), chunk=read_size) == DUNNO
    client.send_until_refused(bad_request, chunk=read_size)
    assert client.read_to_eof() == b"", label
    assert server.call(lambda: server.server.protocol_errors) == 1
