"""Hostile clients over a real socket: each is dropped without a reply, while a well-behaved
connection opened before them keeps getting correct answers."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Callable

import pytest
from policyd_support import OMIT, PolicyClient, ServerThread, policy_request

from policyd.codec import MAX_REQUEST_BYTES

pytestmark = pytest.mark.timeout(60)

DUNNO = b"action=DUNNO\n\n"
UNKNOWN = b"action=550 5.1.1 User unknown\n\n"

HOSTILE: list[tuple[str, bytes]] = [
    ("oversized line", b"request=smtpd_access_policy\nhelo_name=" + b"h" * 1_000_000),
    (
        "oversized request",
        b"request=smtpd_access_policy\n"
        + b"".join(b"x%02d=%s\n" % (i, b"y" * 2000) for i in range(20)),
    ),
    ("NUL bytes", policy_request(sender="a\0b@x.example")),
    ("invalid UTF-8", policy_request().replace(b"alice", b"al\xffce")),
    ("missing request=", policy_request(request=OMIT)),
    (
        "100k attributes",
        b"request=smtpd_access_policy\n" + b"".join(b"a%d=b\n" % i for i in range(100_000)) + b"\n",
    ),
    ("random garbage", random.Random(20240501).randbytes(256 * 1024)),
]


@pytest.mark.parametrize(("label", "payload"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_client_is_dropped_and_others_keep_being_served(
    label: str,
    payload: bytes,
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve()
    good = connect(server.port)
    assert good.ask(policy_request()) == DUNNO
    hostile = connect(server.port)
    hostile.send_until_refused(payload)
    assert hostile.read_to_eof() == b"", label
    assert good.ask(policy_request(recipient="zed@example.com")) == UNKNOWN
    assert good.ask(policy_request()) == DUNNO
    assert server.call(lambda: server.server.protocol_errors) == 1
    assert server.connection_count() == 1


def test_half_a_request_then_eof_gets_no_reply(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve()
    good = connect(server.port)
    half = connect(server.port)
    request = policy_request()
    half.send(request[: len(request) // 2])
    half.sock.shutdown(socket.SHUT_WR)
    assert half.read_to_eof() == b""
    assert good.ask(request) == DUNNO


def test_many_hostile_clients_at_once(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    """Every hostile payload on its own connection, all open at the same time, interleaved
    with good requests; the partial requests held meanwhile stay within the limit."""
    server = serve(read_size=512)
    good = connect(server.port)
    hostiles = [connect(server.port) for _ in HOSTILE]
    for client, (_, payload) in zip(hostiles, HOSTILE, strict=True):
        client.send_until_refused(payload[: MAX_REQUEST_BYTES // 2])
        assert good.ask(policy_request()) == DUNNO
    held = server.call(lambda: [c._decoder.buffered for c in server.server.connections])
    assert max(held) < MAX_REQUEST_BYTES
    for client, (_, payload) in zip(hostiles, HOSTILE, strict=True):
        client.send_until_refused(payload[MAX_REQUEST_BYTES // 2 :])
        with contextlib.suppress(OSError):  # already reset by the server
            client.sock.shutdown(socket.SHUT_WR)
    for client, (label, _) in zip(hostiles, HOSTILE, strict=True):
        assert client.read_to_eof() == b"", label
    assert good.ask(policy_request(recipient="zed@example.com")) == UNKNOWN
