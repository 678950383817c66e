"""The socketmap server: the netstring codec, the transport decision, and the wire."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policyd.socketmap import (
    MAX_REQUEST_BYTES,
    SENDMAIL_MAILHOST_MAP,
    SocketmapDecoder,
    SocketmapError,
    SocketmapRequest,
    SocketmapServer,
    TransportLookup,
    encode_reply,
)
from tests.unit.directory.fakes import InMemoryDirectory
from traqmilter.core.attack import AttackTable
from traqmilter.core.engine import Engine, outbox_relay_for
from traqmilter.core.settings import Action, Config, DomainPolicy
from traqmilter.queue_gauge import FixedQueueGauge

TIMEOUT = 10.0


KNOWN = ("alice@split.example", "bob@example.com")


def make_engine(directory: InMemoryDirectory | None = None, queue: int = 0) -> Engine:
    config = Config(
        domains={
            "example.com": DomainPolicy(),
            "split.example": DomainPolicy(action=Action.OUTBOX, outbox_relay="[mx2.example]:2525"),
            "fwd.example": DomainPolicy(action=Action.FORWARD),
        }
    )
    attacks = AttackTable(threshold=3, window_seconds=600, block_seconds=3600)
    return Engine(
        config, directory or InMemoryDirectory(KNOWN), attacks, FixedQueueGauge(queue), lambda: 0.0
    )


# --------------------------------------------------------------------------- the codec


def netstring(text: str) -> bytes:
    payload = text.encode()
    return b"%d:%s," % (len(payload), payload)


DECODE_CASES = [
    # label, wire bytes, want (requests as (name, key), or an error reason)
    ("one request", netstring("transport far@split.example"), [("transport", "far@split.example")]),
    (
        "two pipelined",
        b"13:transport a@b,13:transport c@d,",
        [("transport", "a@b"), ("transport", "c@d")],
    ),
    ("utf-8 key", "17:transport josé@b,".encode(), [("transport", "josé@b")]),
    ("key keeps spaces after the first", b"15:transport a b@c,", [("transport", "a b@c")]),
    ("no comma", b"13:transport a@b;", "netstring not terminated by a comma"),
    ("letters for length", b"ab:transport a@b,", "bad netstring length"),
    ("leading zero", b"013:transport a@b,", "bad netstring length"),
    ("too long", b"%d:" % (MAX_REQUEST_BYTES + 1), "request too long"),
    ("length never ends", b"123456", "bad netstring length"),
    ("no key", b"9:transport,", "request is not 'name key'"),
    ("empty key", b"10:transport ,", "request is not 'name key'"),
    ("NUL", b"13:transport a\x00b,", "NUL byte in request"),
    ("bad utf-8", b"13:transport a\xffb,", "request is not UTF-8"),
]


@pytest.mark.parametrize("read_size", [4096, 128, 16, 1])
@pytest.mark.parametrize(("label", "wire", "want"), DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decoder(label: str, wire: bytes, want: Any, read_size: int) -> None:
    decoder = SocketmapDecoder()
    items: list[SocketmapRequest | SocketmapError] = []
    for offset in range(0, len(wire), read_size):
        items += decoder.feed(wire[offset : offset + read_size])
    if isinstance(want, str):
        assert items[-1] == SocketmapError(want)
        assert decoder.feed(b"13:transport a@b,") == []  # stays failed
    else:
        assert items == [SocketmapRequest(name, key) for name, key in want]


def test_decoder_never_buffers_more_than_one_request() -> None:
    decoder = SocketmapDecoder()
    assert decoder.feed(b"4096:") == []
    assert decoder.feed(b"x" * MAX_REQUEST_BYTES) == []
    assert decoder.feed(b"!") == [SocketmapError("netstring not terminated by a comma")]


def test_encode_reply() -> None:
    assert encode_reply("NOTFOUND ") == b"9:NOTFOUND ,"
    assert encode_reply("OK smtp:[mx2]:25") == b"16:OK smtp:[mx2]:25,"


# --------------------------------------------------------------------------- the decision


@pytest.mark.parametrize(
    ("name", "key", "want"),
    [
        ("transport", "far@split.example", "OK smtp:[mx2.example]:2525"),
        ("transport", "far+ext@split.example", "OK smtp:[mx2.example]:2525"),
        ("transport", "alice@split.example", "NOTFOUND "),
        ("transport", "postmaster@split.example", "NOTFOUND "),
        ("transport", "split.example", "NOTFOUND "),
        ("transport", ".split.example", "NOTFOUND "),
        ("transport", "zed@fwd.example", "NOTFOUND "),
        ("transport", "zed@example.com", "NOTFOUND "),
        ("transport", "someone@remote.example", "NOTFOUND "),
        ("transport", "bad address@split.example", "NOTFOUND "),
        ("virtual", "far@split.example", "PERM unknown map name"),
    ],
)
def test_transport_lookup(name: str, key: str, want: str) -> None:
    lookup = TransportLookup(lambda: make_engine())
    assert lookup(SocketmapRequest(name, key)) == want


@pytest.mark.parametrize(
    ("name", "key", "want"),
    [
        ("ldapmh", "far@split.example", "OK [mx2.example]:2525"),
        ("ldapmh", "alice@split.example", "NOTFOUND "),
        ("ldapmh", "postmaster@split.example", "NOTFOUND "),
        ("ldapmh", "zed@fwd.example", "NOTFOUND "),
        ("ldapmh", "@split.example", "NOTFOUND "),
        ("transport", "far@split.example", "PERM unknown map name"),
    ],
)
def test_sendmail_mailhost_lookup(name: str, key: str, want: str) -> None:
    # Sendmail's FEATURE(ldap_routing) asks its mailHost map, named ldapmh, per address.
    lookup = TransportLookup(lambda: make_engine(), SENDMAIL_MAILHOST_MAP, outbox_relay_for)
    assert lookup(SocketmapRequest(name, key)) == want


def test_transport_lookup_ignores_queue_pressure() -> None:
    lookup = TransportLookup(lambda: make_engine(queue=10**9))
    assert lookup(SocketmapRequest("transport", "far@split.example")).startswith("OK ")


def test_transport_lookup_tempfails_when_the_directory_is_down() -> None:
    lookup = TransportLookup(lambda: make_engine(InMemoryDirectory(unavailable=True)))
    assert lookup(SocketmapRequest("transport", "far@split.example")).startswith("TEMP ")


def test_transport_lookup_follows_a_reload() -> None:
    engines = [make_engine()]
    lookup = TransportLookup(lambda: engines[-1])
    assert lookup(SocketmapRequest("transport", "far@split.example")).startswith("OK ")
    reloaded = make_engine()
    reloaded.config.domains["split.example"] = DomainPolicy()
    engines.append(reloaded)
    assert lookup(SocketmapRequest("transport", "far@split.example")) == "NOTFOUND "


# --------------------------------------------------------------------------- the wire


class ServerThread:
    def __init__(self, handler: Any, **options: Any) -> None:
        options.setdefault("listen", "inet:127.0.0.1:0")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = SocketmapServer(handler, **options)
        self.run(self.server.start())

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    thread = ServerThread(TransportLookup(lambda: make_engine()))
    yield thread
    thread.stop()


def exchange(sock: socket.socket, wire: bytes, replies: int) -> bytes:
    sock.sendall(wire)
    received = b""
    while received.count(b",") < replies:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def test_persistent_connection_answers_in_order(server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", server.server.port), TIMEOUT) as sock:
        wire = netstring("transport far@split.example") + netstring("transport bob@example.com")
        assert (
            exchange(sock, wire, 2) == encode_reply("OK smtp:[mx2.example]:2525") + b"9:NOTFOUND ,"
        )
        assert exchange(sock, netstring("transport bob@example.com"), 1) == b"9:NOTFOUND ,"


def test_protocol_error_closes_without_a_reply(server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", server.server.port), TIMEOUT) as sock:
        sock.sendall(b"13:transport a@b;")
        assert sock.recv(4096) == b""
    assert server.server.protocol_errors == 1


def test_handler_failure_is_a_temporary_answer() -> None:
    def broken(_request: SocketmapRequest) -> str:
        raise RuntimeError("bug")

    thread = ServerThread(broken)
    try:
        with socket.create_connection(("127.0.0.1", thread.server.port), TIMEOUT) as sock:
            assert exchange(sock, b"13:transport a@b,", 1) == b"19:TEMP internal error,"
    finally:
        thread.stop()


def test_unix_socket_and_connection_limit(tmp_path: Path) -> None:
    path = tmp_path / "socketmap.sock"
    thread = ServerThread(
        TransportLookup(lambda: make_engine()), listen=f"unix:{path}", max_connections=1
    )
    try:
        with socket.socket(socket.AF_UNIX) as first, socket.socket(socket.AF_UNIX) as second:
            first.settimeout(TIMEOUT)
            second.settimeout(TIMEOUT)
            first.connect(str(path))
            assert exchange(first, netstring("transport far@split.example"), 1).startswith(b"26:OK")
            second.connect(str(path))
            assert second.recv(4096) == b""  # refused: over max_connections
    finally:
        thread.stop()
    assert not path.exists()


def test_an_idle_connection_times_out() -> None:
    """The listener the socketmap shares with policyd closes a connection idle too long."""
    thread = ServerThread(TransportLookup(lambda: make_engine()), idle_timeout=0.3)
    try:
        with socket.create_connection(("127.0.0.1", thread.server.port), TIMEOUT) as sock:
            assert exchange(sock, netstring("transport bob@example.com"), 1) == b"9:NOTFOUND ,"
            assert sock.recv(4096) == b""
    finally:
        thread.stop()


def test_close_ends_open_connections() -> None:
    thread = ServerThread(TransportLookup(lambda: make_engine()))
    with socket.create_connection(("127.0.0.1", thread.server.port), TIMEOUT) as sock:
        assert exchange(sock, netstring("transport bob@example.com"), 1) == b"9:NOTFOUND ,"
        thread.stop()
        assert sock.recv(4096) == b""
        assert thread.server.connections == set()
