"""The policy-delegation server: moves bytes between Postfix and a request handler.

Postfix keeps one connection per smtpd process, idle between SMTP sessions, and reuses it
for every request of that process; so a connection is closed only on EOF, a protocol error,
a handler failure, the idle timeout or shutdown, never after a reply. Requests pipelined in
one read are answered in order. The handler is a plain function (request -> action text),
called on the event loop: it must not block for long (the engine and the directory answer
in microseconds).

Failure semantics (SPEC 7): when a request cannot be framed or the handler fails, the
server logs, sends no reply and closes the connection; Postfix then applies its default
action (tempfail). The log never holds the exception text of a reply, and no exception text
ever reaches the wire.

SECURITY: each connection holds at most one decoder buffer (codec.MAX_REQUEST_BYTES) plus
the replies to one read; reading pauses while the write buffer is over WRITE_HIGH_WATER, so
a client that pipelines and never reads stalls itself. At most max_connections connections
are served; the excess is accepted and closed at once. A stale unix socket is removed only
if it is a socket and nothing answers on it.

BUGS: the replies to one read are built before back-pressure can act, so the write buffer
may pass WRITE_HIGH_WATER by the replies to one read_size read (a few KiB).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import cast

from policyd.codec import (
    PolicyDecoder,
    PolicyRequest,
    ProtocolError,
    ProtocolViolation,
    encode_reply,
)
from traqmilter.core.listen import ListenAddress, parse_listen

logger = logging.getLogger(__name__)

Handler = Callable[[PolicyRequest], str]

LISTEN_BACKLOG = 1024
WRITE_HIGH_WATER = 64 * 1024
"""Bytes of unsent replies at which a connection stops reading."""
DEFAULT_READ_SIZE = 8192
"""Largest read per connection (a Postfix request is 0.5-1.5 KiB)."""
DEFAULT_SHUTDOWN_GRACE_SECONDS = 5.0


class _PolicyConnection(asyncio.BufferedProtocol):
    """One Postfix policy client connection.

    A BufferedProtocol, so that reads go into one small buffer per connection (instead of
    a 256 KiB allocation per read) and their size is bounded by read_size.
    """

    __slots__ = (
        "_decoder",
        "_handler",
        "_idle_timer",
        "_last_active",
        "_loop",
        "_peer",
        "_read_view",
        "_server",
        "transport",
    )

    def __init__(self, server: PolicyServer) -> None:
        self._server = server
        self._handler = server.handler
        self._loop = server.loop
        self._decoder = PolicyDecoder()
        self._read_view = memoryview(bytearray(server.read_size))
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._peer = "?"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport, so no isinstance.
        transport = cast(asyncio.Transport, base_transport)
        server = self._server
        if server.closing or len(server.connections) >= server.max_connections:
            server.refused_connections += 1
            logger.warning(
                "policyd: connection refused: %s (max_connections=%d)",
                "shutting down" if server.closing else "too many connections",
                server.max_connections,
            )
            transport.abort()
            return
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = transport.get_extra_info("peername")
            self._peer = f"[{peer[0]}]:{peer[1]}" if peer else "?"
        else:
            self._peer = "unix"
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        server.connections.add(self)
        self._last_active = self._loop.time()
        self._idle_timer = self._loop.call_at(
            self._last_active + server.idle_timeout, self._check_idle
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        self._last_active = self._loop.time()
        items = self._decoder.feed(bytes(self._read_view[:nbytes]))
        if not items:
            return
        handler = self._handler
        replies: list[bytes] = []
        for item in items:
            if not isinstance(item, PolicyRequest):
                self._fail(replies, item)
                return
            try:
                replies.append(encode_reply(handler(item)))
            except ProtocolViolation as exc:
                self._fail(replies, exc.error)
                return
            except Exception:
                # A bug or a failed effect: Postfix must tempfail, the daemon must go on.
                logger.exception("policyd: request handler failed; closing %s", self._peer)
                self._fail(replies, None)
                return
        assert self.transport is not None
        self.transport.write(b"".join(replies))

    def _fail(self, replies: list[bytes], error: ProtocolError | None) -> None:
        """Close without answering the failed request; earlier ones in the read still
        get their replies (close() sends what was written before it)."""
        if error is not None:
            logger.warning("policyd: protocol error from %s: %s; closing", self._peer, error)
            self._server.protocol_errors += 1
        if self.transport is not None:
            if replies:
                self.transport.write(b"".join(replies))
            self.transport.close()

    def close(self) -> None:
        # transport.close() still sends the replies already written.
        if self.transport is not None:
            self.transport.close()

    def _check_idle(self) -> None:
        deadline = self._last_active + self._server.idle_timeout
        if self._loop.time() >= deadline:
            logger.info("policyd: closing idle connection %s", self._peer)
            self._idle_timer = None
            self.close()
        else:
            self._idle_timer = self._loop.call_at(deadline, self._check_idle)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return False  # close our side too; nothing is ever sent after the client's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.transport is not None:
            self._server.connection_ended(self)
            self.transport = None


class PolicyServer:
    """Serves the policy protocol on one listen address with one handler.

    start() binds and begins accepting; close() stops accepting, lets the replies already
    made reach their clients (at most shutdown_grace_seconds) and closes every connection.
    """

    loop: asyncio.AbstractEventLoop  # the loop start() ran on

    def __init__(
        self,
        handler: Handler,
        *,
        listen: str,
        max_connections: int = 1000,
        idle_timeout: float = 3600.0,
        socket_mode: int = 0o660,
        shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS,
        read_size: int = DEFAULT_READ_SIZE,
    ) -> None:
        """read_size bounds each read from a client; tests set it as low as 1 byte to
        prove the framing works at any read size."""
        if max_connections < 1 or idle_timeout <= 0 or read_size < 1:
            raise ValueError("max_connections, idle_timeout and read_size must be positive")
        self.read_size = read_size
        self.handler = handler
        self.address = parse_listen(listen, any_port=True)  # port 0: tests and benches
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.socket_mode = socket_mode
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.connections: set[_PolicyConnection] = set()
        self.closing = False
        self.refused_connections = 0
        self.protocol_errors = 0
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._unix_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        self._all_closed: asyncio.Future[None] | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def port(self) -> int:
        """The TCP port bound (useful after listening on port 0)."""
        if self._port is None:
            raise RuntimeError("not listening on an inet socket")
        return self._port

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        address = self.address
        if address.family == "inet":
            self._server = await self.loop.create_server(
                lambda: _PolicyConnection(self),
                address.host,
                address.port,
                backlog=LISTEN_BACKLOG,
                reuse_address=True,
            )
            self._port = self._server.sockets[0].getsockname()[1]
        else:
            sock = _bind_unix(address.path, self.socket_mode)
            identity = os.stat(address.path)
            self._unix_identity = (identity.st_dev, identity.st_ino)
            try:
                self._server = await self.loop.create_unix_server(
                    lambda: _PolicyConnection(self), sock=sock, backlog=LISTEN_BACKLOG
                )
            except BaseException:
                sock.close()
                self._remove_unix_socket()
                raise
        logger.debug("policyd: listening on %s", self.listen_text)

    @property
    def listen_text(self) -> str:
        """The listen address, with the port actually bound."""
        if self._port is not None:
            return str(ListenAddress("inet", host=self.address.host, port=self._port))
        return str(self.address)

    async def serve_forever(self) -> None:
        """Return after close() has finished."""
        if self._stopped is None:
            raise RuntimeError("start() first")
        await self._stopped.wait()

    def connection_ended(self, connection: _PolicyConnection) -> None:
        self.connections.discard(connection)
        closed = self._all_closed
        if not self.connections and closed is not None and not closed.done():
            closed.set_result(None)

    async def close(self) -> None:
        if self.closing:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self.connections:
            self._all_closed = self.loop.create_future()
            for connection in list(self.connections):
                connection.close()
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._all_closed), self.shutdown_grace_seconds
                )
            except TimeoutError:
                logger.warning(
                    "policyd: %d connections did not drain in %.1fs; aborting them",
                    len(self.connections),
                    self.shutdown_grace_seconds,
                )
                for connection in list(self.connections):
                    if connection.transport is not None:
                        connection.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        self._remove_unix_socket()
        logger.debug("policyd: stopped listening on %s", self.listen_text)
        if self._stopped is not None:
            self._stopped.set()

    def _remove_unix_socket(self) -> None:
        """Unlink our unix socket, unless another process has replaced it meanwhile."""
        if self._unix_identity is not None:
            remove_unix_socket(self.address.path, self._unix_identity)
            self._unix_identity = None


def remove_unix_socket(path: str, identity: tuple[int, int]) -> None:
    """Unlink the socket we bound at path (identity: its st_dev, st_ino), unless another
    process has replaced it. After a privilege drop the directory may not be writable:
    then the socket stays, and the next start (as root) replaces it."""
    try:
        current = os.lstat(path)
        if (current.st_dev, current.st_ino) == identity:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except PermissionError as exc:
        logger.warning("cannot remove %s at stop: %s", path, exc.strerror)


def _bind_unix(path: str, mode: int) -> socket.socket:
    """A bound (not yet listening) unix socket at path with the given mode."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not removing it")
        if _unix_socket_answers(path):
            raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Nobody can connect before listen(), so the mode is right before the first client.
        os.chmod(path, mode)
    except BaseException:
        sock.close()
        raise
    return sock


def _unix_socket_answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except TimeoutError:
        return True  # a full backlog: someone is serving there
    finally:
        probe.close()
    return True
