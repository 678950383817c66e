"""A Postfix socketmap(5) server: answers transport(5) lookups for the outbox action.

The outbox action relays mail for an unknown recipient of an outbox domain unaltered, to
the same envelope recipient, through the domain's outbox_relay. Postfix performs that
routing itself when its transport_maps ask traqmilter:

    transport_maps = socketmap:inet:127.0.0.1:10041:transport

For an unknown recipient of an outbox domain the answer is `OK smtp:[mx2.example.com]:25`;
for everything else (known recipients, other domains and actions, bare domain keys that
Postfix tries after the address) `NOTFOUND `, so Postfix routes as it would without
traqmilter. The decision is core.message.transport_for() over routing_engine(): it never
depends on the sender, the client, blocks or queue pressure, so an accepted message is
routed the same way whenever its delivery is attempted.

The protocol: each request is a netstring "LEN:NAME KEY," and each reply a netstring
"LEN:STATUS DATA,"; Postfix keeps the connection for many requests. SocketmapDecoder is
the sans-I/O codec (bytes in, requests or one error out); SocketmapServer only moves
bytes, with the start/close shape of policyd.server.PolicyServer.

Failure semantics: a request that cannot be framed closes the connection without a reply
(Postfix retries, then defers the mail); a lookup that cannot be answered (directory
unavailable, a bug) is answered `TEMP`, which Postfix turns into a deferral; an unknown map
name is `PERM` (a configuration error, logged by Postfix). Nothing is ever routed on doubt.

SECURITY: a request is at most MAX_REQUEST_BYTES (its length prefix is checked before the
payload is read, so the buffer never grows beyond it); NUL and invalid UTF-8 are errors;
replies never echo request bytes. At most max_connections connections are served.

BUGS: the lookup runs on the event loop; a SQLite lookup costs microseconds, a followed
Postfix map held in memory the same.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from policyd.server import LISTEN_BACKLOG, _bind_unix, remove_unix_socket
from traqmilter.core.engine import Engine, RcptFacts
from traqmilter.core.listen import parse_listen
from traqmilter.core.message import routing_engine, transport_for

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
"""Longest request payload: a map name, a space and an address (at most 256 octets)."""
MAX_LENGTH_DIGITS = len(str(MAX_REQUEST_BYTES))
TRANSPORT_MAP = "transport"
NOT_FOUND = "NOTFOUND "


@dataclass(frozen=True, slots=True)
class SocketmapRequest:
    name: str
    key: str


@dataclass(frozen=True, slots=True)
class SocketmapError:
    """Why the bytes on a connection are not a socketmap request (safe to log)."""

    reason: str


class SocketmapDecoder:
    """Netstring requests from bytes fed in reads of any size. After an error it stays
    failed: nothing after a framing error can be trusted."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.failed = False

    def feed(self, data: bytes) -> list[SocketmapRequest | SocketmapError]:
        if self.failed:
            return []
        self._buffer += data
        items: list[SocketmapRequest | SocketmapError] = []
        while self._buffer:
            item = self._next()
            if item is None:
                break
            items.append(item)
            if isinstance(item, SocketmapError):
                self.failed = True
                self._buffer.clear()
                break
        return items

    def _next(self) -> SocketmapRequest | SocketmapError | None:
        buffer = self._buffer
        colon = buffer.find(b":", 0, MAX_LENGTH_DIGITS + 1)
        if colon < 0:
            if len(buffer) > MAX_LENGTH_DIGITS or not buffer.isdigit():
                return SocketmapError("bad netstring length")
            return None  # the length is still arriving
        digits = bytes(buffer[:colon])
        if not digits.isdigit() or (len(digits) > 1 and digits.startswith(b"0")):
            return SocketmapError("bad netstring length")
        length = int(digits)
        if length > MAX_REQUEST_BYTES:
            return SocketmapError("request too long")
        end = colon + 1 + length
        if len(buffer) <= end:
            return None
        if buffer[end] != ord(","):
            return SocketmapError("netstring not terminated by a comma")
        payload = bytes(buffer[colon + 1 : end])
        del buffer[: end + 1]
        return _request(payload)


def _request(payload: bytes) -> SocketmapRequest | SocketmapError:
    if b"\0" in payload:
        return SocketmapError("NUL byte in request")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return SocketmapError("request is not UTF-8")
    name, space, key = text.partition(" ")
    if not space or not name or not key:
        return SocketmapError("request is not 'name key'")
    return SocketmapRequest(name, key)


def encode_reply(reply: str) -> bytes:
    payload = reply.encode("utf-8")
    return b"%d:%s," % (len(payload), payload)


Handler = Callable[[SocketmapRequest], str]


class TransportLookup:
    """The socketmap handler: Postfix transport(5) lookups decided by the engine."""

    def __init__(self, engine: Callable[[], Engine]) -> None:
        """engine gives the current engine (a reload replaces it)."""
        self._engine = engine
        self._routing: tuple[Engine, Engine] | None = None  # (engine, its routing engine)

    def _routing_engine(self) -> Engine:
        current = self._engine()
        if self._routing is None or self._routing[0] is not current:
            self._routing = (current, routing_engine(current))
        return self._routing[1]

    def __call__(self, request: SocketmapRequest) -> str:
        if request.name != TRANSPORT_MAP:
            return "PERM unknown map name"
        if "@" not in request.key:
            return NOT_FOUND  # a domain key: only addresses are ever routed
        decision = self._routing_engine().rcpt(RcptFacts(request.key), record=False)
        if decision.rule == "lookup_failed":
            return "TEMP recipient directory unavailable"
        route = transport_for(decision)
        return NOT_FOUND if route is None else f"OK {route}"


class _SocketmapConnection(asyncio.Protocol):
    def __init__(self, server: SocketmapServer) -> None:
        self._server = server
        self._decoder = SocketmapDecoder()
        self._idle: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        server = self._server
        if server.closing or len(server.connections) >= server.max_connections:
            logger.warning("socketmap: connection refused: too many connections or closing")
            transport.abort()
            return
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.connections.add(self)
        self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._server.loop.call_later(self._server.idle_timeout, self.close)

    def data_received(self, data: bytes) -> None:
        self._arm_idle_timer()
        replies: list[bytes] = []
        for item in self._decoder.feed(data):
            if isinstance(item, SocketmapError):
                logger.warning("socketmap: protocol error: %s; closing", item.reason)
                self._server.protocol_errors += 1
                self._write_and_close(replies)
                return
            try:
                reply = self._server.handler(item)
            except Exception:
                logger.exception("socketmap: lookup failed")
                reply = "TEMP internal error"
            replies.append(encode_reply(reply))
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))

    def _write_and_close(self, replies: list[bytes]) -> None:
        if self.transport is not None:
            if replies:
                self.transport.write(b"".join(replies))
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.transport is not None:
            self._server.connections.discard(self)
            self.transport = None


class SocketmapServer:
    """Serves socketmap lookups on one listen address with one handler.

    start() binds and begins accepting; close() stops accepting and closes every
    connection (a socketmap reply is written at once, so nothing is left to drain)."""

    loop: asyncio.AbstractEventLoop

    def __init__(
        self,
        handler: Handler,
        *,
        listen: str,
        max_connections: int = 1000,
        idle_timeout: float = 3600.0,
        socket_mode: int = 0o660,
    ) -> None:
        if max_connections < 1 or idle_timeout <= 0:
            raise ValueError("max_connections and idle_timeout must be positive")
        self.handler = handler
        self.address = parse_listen(listen, any_port=True)  # port 0: tests and benches
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.socket_mode = socket_mode
        self.connections: set[_SocketmapConnection] = set()
        self.closing = False
        self.protocol_errors = 0
        self._server: asyncio.Server | None = None
        self._unix_identity: tuple[int, int] | None = None

    @property
    def port(self) -> int:
        """The TCP port bound (useful after listening on port 0)."""
        if self._server is None or self.address.family != "inet":
            raise RuntimeError("not listening on an inet socket")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        address = self.address
        if address.family == "inet":
            self._server = await self.loop.create_server(
                lambda: _SocketmapConnection(self),
                address.host,
                address.port,
                backlog=LISTEN_BACKLOG,
                reuse_address=True,
            )
        else:
            sock = _bind_unix(address.path, self.socket_mode)
            identity = os.stat(address.path)
            self._unix_identity = (identity.st_dev, identity.st_ino)
            self._server = await self.loop.create_unix_server(
                lambda: _SocketmapConnection(self), sock=sock, backlog=LISTEN_BACKLOG
            )
        logger.info("socketmap: listening on %s", address)

    async def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self._unix_identity is not None:
            remove_unix_socket(self.address.path, self._unix_identity)
            self._unix_identity = None
        logger.info("socketmap: stopped listening on %s", self.address)
