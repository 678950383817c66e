"""The policy-delegation server: moves bytes between Postfix and a request handler.

Postfix keeps one connection per smtpd process, idle between SMTP sessions, and reuses it
for every request of that process; so a connection is closed only on EOF, a protocol error,
a handler failure, the idle timeout or shutdown, never after a reply. Requests pipelined in
one read are answered in order. The handler is a plain function ((request, notes) ->
action text), called on the event loop: it must not block for long (the engine and the
directory answer in microseconds). `notes` is the connection's ConnectionNotes: what the
handler remembers about the connection (a warning given once per connection).

Failure semantics (SPEC 7): when a request cannot be framed or the handler fails, the
server logs, sends no reply and closes the connection; Postfix then applies its default
action (tempfail). The log never holds the exception text of a reply, and no exception text
ever reaches the wire.

SECURITY: each connection holds at most one decoder buffer (codec.MAX_REQUEST_BYTES) plus
the replies to one read; listening, connection limits, back-pressure and idle timeouts are
policyd.stream's, shared with the socketmap server.

BUGS: the replies to one read are built before back-pressure can act, so the write buffer
may pass WRITE_HIGH_WATER by the replies to one read_size read (a few KiB).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from policyd.codec import (
    PolicyDecoder,
    PolicyRequest,
    ProtocolViolation,
    encode_reply,
)
from policyd.stream import (
    StreamConnection,
    StreamServer,
)

logger = logging.getLogger(__name__)


class ConnectionNotes:
    """What a request handler remembers about one connection: its peer, for logs, and the
    warnings already given on it (a misconfigured client is reported once per connection,
    not once per request)."""

    __slots__ = ("peer", "warned")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.warned: set[str] = set()

    def first(self, warning: str) -> bool:
        """True the first time `warning` is noted on this connection."""
        if warning in self.warned:
            return False
        self.warned.add(warning)
        return True


Handler = Callable[[PolicyRequest, ConnectionNotes], str]


class _PolicyConnection(StreamConnection):
    """One Postfix policy client connection."""

    __slots__ = ("_decoder", "_handler", "_notes")

    def __init__(self, server: PolicyServer) -> None:
        super().__init__(server)
        self._handler = server.handler
        self._decoder = PolicyDecoder()
        self._notes: ConnectionNotes | None = None  # made at the first request (peer known)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_active = self.loop.time()  # touch(), inlined: this is the hot path
        items = self._decoder.feed(bytes(self.read_view[:nbytes]))
        if not items:
            return
        handler = self._handler
        notes = self._notes
        if notes is None:
            notes = self._notes = ConnectionNotes(self.peer)
        replies: list[bytes] = []
        for item in items:
            if not isinstance(item, PolicyRequest):
                self.protocol_error(replies, item)
                return
            try:
                replies.append(encode_reply(handler(item, notes)))
            except ProtocolViolation as exc:
                self.protocol_error(replies, exc.error)
                return
            except Exception:
                # A bug or a failed effect: Postfix must tempfail, the daemon must go on.
                # Earlier requests of the read still get their replies; this one none.
                logger.exception("policyd: request handler failed; closing %s", self.peer)
                self.write_and_close(replies)
                return
        assert self.transport is not None
        self.transport.write(b"".join(replies))


class PolicyServer(StreamServer[Handler]):
    """Serves the policy protocol on one listen address with one handler (see
    policyd.stream.StreamServer for the options, start() and close())."""

    name = "policyd"
    connection = _PolicyConnection
