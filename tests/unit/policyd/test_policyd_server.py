"""The policy server's connection handling: persistence, pipelining, limits, unix sockets,
failures, back-pressure and shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from policyd_support import Deployment, PolicyClient, ServerThread, policy_request, wait_until

from policyd.codec import PolicyRequest
from policyd.server import ConnectionNotes, PolicyServer
from policyd.stream import WRITE_HIGH_WATER

pytestmark = pytest.mark.timeout(60)

DUNNO = b"action=DUNNO\n\n"
UNKNOWN = b"action=550 5.1.1 User unknown\n\n"
# From an exempt client, so that asking many times never starts a dictionary-attack block.
ASK_UNKNOWN = policy_request(recipient="zed@example.com", client_address="127.0.0.1")


def test_300_idle_connections_stay_open_while_another_is_served(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve()
    idle = [connect(server.port) for _ in range(300)]
    for client in idle:  # each smtpd process asks once, then its connection idles
        assert client.ask(policy_request()) == DUNNO
    busy = connect(server.port)
    for n in range(200):
        assert busy.ask(ASK_UNKNOWN if n % 2 else policy_request()) == (UNKNOWN if n % 2 else DUNNO)
    assert server.connection_count() == 301
    assert all(client.is_open() for client in idle)
    for client in idle:  # and each one still works
        assert client.ask(ASK_UNKNOWN) == UNKNOWN


def test_pipelined_requests_are_answered_in_order(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve()
    client = connect(server.port)
    recipients = ["alice@example.com", "zed@example.com", "x@elsewhere.example"] * 5
    client.send(b"".join(policy_request(recipient=r, client_address="::1") for r in recipients))
    replies = [client.reply() for _ in recipients]
    assert replies == [UNKNOWN if r.startswith("zed") else DUNNO for r in recipients]
    assert client.is_open()


def test_pipelined_requests_before_a_bad_one_are_answered_then_closed(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve()
    client = connect(server.port)
    good = policy_request()
    client.send(good + good + b"no equals sign\n\n" + good)
    assert client.read_to_eof() == DUNNO + DUNNO


def test_accepted_tcp_connections_have_nodelay(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve()
    assert connect(server.port).ask(policy_request()) == DUNNO

    def nodelay() -> int:
        (connection,) = server.server.connections
        assert connection.transport is not None
        sock = connection.transport.get_extra_info("socket")
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    assert server.call(nodelay) != 0


def test_connections_beyond_the_limit_are_closed_at_once(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve(max_connections=2)
    first, second = connect(server.port), connect(server.port)
    assert first.ask(policy_request()) == DUNNO
    assert second.ask(policy_request()) == DUNNO
    excess = connect(server.port)
    excess.send_until_refused(policy_request())
    assert excess.read_to_eof() == b""
    assert server.call(lambda: server.server.refused_connections) == 1
    assert first.ask(policy_request()) == DUNNO


def test_an_idle_connection_is_closed_after_the_idle_timeout(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve(idle_timeout=0.05)
    client = connect(server.port)
    assert client.ask(policy_request()) == DUNNO
    assert client.read_to_eof() == b""  # closed by the server, not by a reply
    wait_until(lambda: server.connection_count() == 0)


def test_a_failing_handler_closes_that_connection_only(
    deployment: Deployment,
    start_server: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handler(request: PolicyRequest, notes: ConnectionNotes) -> str:
        if request.get("recipient") == "boom@example.com":
            raise RuntimeError("secret internal detail")
        return deployment.adapter(request, notes)

    server = start_server(handler)
    good, doomed = connect(server.port), connect(server.port)
    with caplog.at_level(logging.ERROR, logger="policyd.server"):
        assert doomed.ask(policy_request()) == DUNNO
        doomed.send(policy_request(recipient="boom@example.com"))
        assert doomed.read_to_eof() == b""
        assert good.ask(policy_request(recipient="zed@example.com")) == UNKNOWN
    assert "request handler failed" in caplog.text
    assert "secret internal detail" in caplog.text  # logged for the admin, never sent


@pytest.mark.parametrize("action", ["", "DUNNO\naction=OK"])
def test_an_unencodable_action_closes_without_reply(
    action: str,
    start_server: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = start_server(lambda request, notes: action)
    client = connect(server.port)
    client.send(policy_request())
    assert client.read_to_eof() == b""


def test_a_client_that_never_reads_stalls_itself_not_the_server(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve(shutdown_grace_seconds=0.1)
    good = connect(server.port)
    assert good.ask(policy_request()) == DUNNO
    flooder = connect(server.port)
    assert flooder.ask(ASK_UNKNOWN) == UNKNOWN
    flooder.sock.settimeout(None)  # block in sendall until the server gives up on it

    def shrink_send_buffers() -> None:  # so that the replies back up after a few KiB
        for connection in server.server.connections:
            assert connection.transport is not None
            sock = connection.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    server.call(shrink_send_buffers)
    flood = ASK_UNKNOWN * 100_000  # 11 MB of requests, 8 MB of replies
    sender = threading.Thread(target=flooder.send_until_refused, args=(flood,), daemon=True)
    sender.start()

    def write_buffers() -> list[int]:
        return sorted(
            c.transport.get_write_buffer_size()
            for c in server.server.connections
            if c.transport is not None and not c.transport.is_reading()
        )

    wait_until(lambda: len(server.call(write_buffers)) == 1)
    (queued,) = server.call(write_buffers)
    assert WRITE_HIGH_WATER <= queued < WRITE_HIGH_WATER + 2 * 8192  # plus one read's replies
    assert good.ask(ASK_UNKNOWN) == UNKNOWN
    server.stop()  # the flooder cannot be drained: aborted after the grace period
    sender.join(10)
    assert not sender.is_alive()
    assert good.read_to_eof() == b""


def test_close_ends_idle_connections_and_serve_forever(
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    server = serve()
    waiter = asyncio.run_coroutine_threadsafe(server.server.serve_forever(), server.loop)
    clients = [connect(server.port) for _ in range(5)]
    for client in clients:
        assert client.ask(policy_request()) == DUNNO
    port = server.port
    server.run(server.server.close())
    waiter.result(10)
    assert all(client.read_to_eof() == b"" for client in clients)
    with pytest.raises(ConnectionRefusedError):
        PolicyClient(port)


def test_unix_socket_mode_and_cleanup(
    tmp_path: Path,
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    path = tmp_path / "policyd.sock"
    server = serve(listen=f"unix:{path}", socket_mode=0o600)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert connect(unix_path=str(path)).ask(policy_request()) == DUNNO
    server.stop()
    assert not path.exists()


def test_a_stale_unix_socket_is_replaced(
    tmp_path: Path,
    serve: Callable[..., ServerThread],
    connect: Callable[..., PolicyClient],
) -> None:
    path = tmp_path / "policyd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # left behind by a crashed daemon: nobody listens
    serve(listen=f"unix:{path}")
    assert connect(unix_path=str(path)).ask(policy_request()) == DUNNO


def test_a_live_unix_socket_is_not_taken_over(tmp_path: Path, deployment: Deployment) -> None:
    path = tmp_path / "policyd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(OSError, match="another server is listening"):
            ServerThread(deployment.adapter, listen=f"unix:{path}").stop()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_file_in_the_way_is_never_removed(tmp_path: Path, deployment: Deployment) -> None:
    path = tmp_path / "policyd.sock"
    path.write_text("precious")
    server = PolicyServer(deployment.adapter, listen=f"unix:{path}")
    with pytest.raises(OSError, match="not a socket"):
        asyncio.run(server.start())
    assert path.read_text() == "precious"
