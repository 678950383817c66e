"""What policyd's two servers share: one listening socket and the connections it accepts.

PolicyServer (the policy protocol) and SocketmapServer (transport lookups) differ only in
how a connection turns bytes into replies; both are a StreamServer whose connections are
StreamConnections. Postfix keeps one connection per process open and idle between uses,
so a connection is closed only on EOF, an error, the idle timeout or shutdown.

SECURITY: each connection reads into one buffer of read_size bytes; reading pauses while
its unsent replies pass WRITE_HIGH_WATER, so a client that sends and never reads stalls
itself. At most max_connections are served; the excess is accepted and closed at once. A
stale unix socket is removed only if it is a socket and nothing answers on it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from typing import Any, Generic, TypeVar, cast

from traqmilter.core.listen import ListenAddress, parse_listen

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
WRITE_HIGH_WATER = 64 * 1024
"""Bytes of unsent replies at which a connection stops reading."""
DEFAULT_READ_SIZE = 8192
"""Largest read per connection (a Postfix request is 0.5-1.5 KiB)."""
DEFAULT_SHUTDOWN_GRACE_SECONDS = 5.0


class StreamConnection(asyncio.BufferedProtocol):
    """One client connection. Subclasses implement buffer_updated(): the bytes just read
    are self.read_view[:nbytes]; they call self.touch() first and reply with
    self.transport.write(), or self.write_and_close() to end the connection."""

    def __init__(self, server: StreamServer[Any]) -> None:
        self.server = server
        self.loop = server.loop
        self.read_view = memoryview(bytearray(server.read_size))
        self.last_active = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.peer = "?"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport, so no isinstance.
        transport = cast(asyncio.Transport, base_transport)
        server = self.server
        if server.closing or len(server.connections) >= server.max_connections:
            server.refused_connections += 1
            logger.warning(
                "%s: connection refused: %s (max_connections=%d)",
                server.name,
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
            self.peer = f"[{peer[0]}]:{peer[1]}" if peer else "?"
        else:
            self.peer = "unix"
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        server.connections.add(self)
        self.last_active = self.loop.time()
        self.idle_timer = self.loop.call_at(
            self.last_active + server.idle_timeout, self._check_idle
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_view

    def touch(self) -> None:
        """Note activity: the idle timeout counts from the last read."""
        self.last_active = self.loop.time()

    def protocol_error(self, replies: list[bytes], detail: object) -> None:
        """Log a request that cannot be answered and close without replying to it."""
        server = self.server
        logger.warning("%s: protocol error from %s: %s; closing", server.name, self.peer, detail)
        server.protocol_errors += 1
        self.write_and_close(replies)

    def write_and_close(self, replies: list[bytes]) -> None:
        """Send the replies made so far, then close (close() still sends what was written)."""
        if self.transport is not None:
            if replies:
                self.transport.write(b"".join(replies))
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _check_idle(self) -> None:
        # One timer per connection, moved on only when it fires: a read costs one clock
        # call, not a timer cancelled and created.
        deadline = self.last_active + self.server.idle_timeout
        if self.loop.time() >= deadline:
            logger.info("%s: closing idle connection %s", self.server.name, self.peer)
            self.idle_timer = None
            self.close()
        else:
            self.idle_timer = self.loop.call_at(deadline, self._check_idle)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return False  # close our side too; nothing is ever sent after the client's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None:
            self.server.connection_ended(self)
            self.transport = None


HandlerT = TypeVar("HandlerT")


class StreamServer(Generic[HandlerT]):
    """Listens on one address and keeps its connections; `handler` answers their requests.

    start() binds and begins accepting; close() stops accepting, lets the replies already
    made reach their clients (at most shutdown_grace_seconds) and closes every connection.
    Subclasses set `name` (for logs) and `connection`, the StreamConnection subclass that
    serves one client.
    """

    name: str
    connection: type[StreamConnection]
    loop: asyncio.AbstractEventLoop  # the loop start() ran on

    def __init__(
        self,
        handler: HandlerT,
        *,
        listen: str,
        max_connections: int = 1000,
        idle_timeout: float = 3600.0,
        socket_mode: int = 0o660,
        shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS,
        read_size: int = DEFAULT_READ_SIZE,
    ) -> None:
        """listen may name port 0 (any free port: tests and benches). read_size bounds each
        read from a client; tests set it as low as 1 byte to prove the framing works at any
        read size."""
        if max_connections < 1 or idle_timeout <= 0 or read_size < 1:
            raise ValueError("max_connections, idle_timeout and read_size must be positive")
        self.handler = handler
        self.address = parse_listen(listen, any_port=True)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.socket_mode = socket_mode
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.read_size = read_size
        self.connections: set[StreamConnection] = set()
        self.closing = False
        self.refused_connections = 0
        self.protocol_errors = 0
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._unix_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        self._all_closed: asyncio.Future[None] | None = None
        self._stopped: asyncio.Event | None = None

    def new_connection(self) -> StreamConnection:
        return self.connection(self)

    @property
    def port(self) -> int:
        """The TCP port bound (useful after listening on port 0)."""
        if self._port is None:
            raise RuntimeError("not listening on an inet socket")
        return self._port

    @property
    def listen_text(self) -> str:
        """The listen address, with the port actually bound."""
        if self._port is not None:
            return str(ListenAddress("inet", host=self.address.host, port=self._port))
        return str(self.address)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        address = self.address
        if address.family == "inet":
            self._server = await self.loop.create_server(
                self.new_connection,
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
                    self.new_connection, sock=sock, backlog=LISTEN_BACKLOG
                )
            except BaseException:
                sock.close()
                self._remove_unix_socket()
                raise
        logger.debug("%s: listening on %s", self.name, self.listen_text)

    async def serve_forever(self) -> None:
        """Return after close() has finished."""
        if self._stopped is None:
            raise RuntimeError("start() first")
        await self._stopped.wait()

    def connection_ended(self, connection: StreamConnection) -> None:
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
                    "%s: %d connections did not drain in %.1fs; aborting them",
                    self.name,
                    len(self.connections),
                    self.shutdown_grace_seconds,
                )
                for connection in list(self.connections):
                    if connection.transport is not None:
                        connection.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        self._remove_unix_socket()
        logger.debug("%s: stopped listening on %s", self.name, self.listen_text)
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
