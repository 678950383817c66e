"""A Postfix socketmap(5) server: answers transport(5) lookups for the outbox action.

The outbox action relays mail for an unknown recipient of an outbox domain unaltered, to
the same envelope recipient, through the domain's outbox_relay. Postfix performs that
routing itself when its transport_maps ask traqmilter:

    transport_maps = socketmap:inet:127.0.0.1:10041:transport

For an unknown recipient of an outbox domain the answer is `OK smtp:[mx2.example.com]:25`;
for everything else (known recipients, other domains and actions, bare domain keys that
Postfix tries after the address) `NOTFOUND `, so Postfix routes as it would without
traqmilter. The decision is core.engine.transport_for() over routing_engine(): it never
depends on the sender, the client, blocks or queue pressure, so an accepted message is
routed the same way whenever its delivery is attempted.

Sendmail invented this protocol (its `socket` map class), and asks the same question with
it: the milter in the sendmail role serves SENDMAIL_MAILHOST_MAP, the mailHost map of
FEATURE(ldap_routing) (contrib/sendmail/traqmilter.mc), whose answer is the relay host
alone (`OK [mx2.example.com]`, core.engine.outbox_relay_for): Sendmail then relays the
original address there.

The protocol: each request is a netstring "LEN:NAME KEY," and each reply a netstring
"LEN:STATUS DATA,"; Postfix keeps the connection for many requests. SocketmapDecoder is
the sans-I/O codec (bytes in, requests or one error out); SocketmapServer only moves
bytes, on the same policyd.stream.StreamServer as policyd's PolicyServer.

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

import logging
from collections.abc import Callable
from dataclasses import dataclass

from policyd.stream import StreamConnection, StreamServer
from traqmilter.core.engine import (
    Engine,
    RcptDecision,
    RcptFacts,
    routing_engine,
    transport_for,
)
from traqmilter.core.rule_names import RuleName

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
"""Longest request payload: a map name, a space and an address (at most 256 octets)."""
MAX_LENGTH_DIGITS = len(str(MAX_REQUEST_BYTES))
TRANSPORT_MAP = "transport"
SENDMAIL_MAILHOST_MAP = "ldapmh"
"""FEATURE(ldap_routing) names its mailHost map `ldapmh`; Sendmail's socket map sends the
map's name before each key."""
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
    """The socketmap handler: the MTA's routing lookups for the outbox action, decided by
    the engine. By default Postfix's transport(5) lookups (map TRANSPORT_MAP, answered by
    transport_for); the sendmail role's milter serves SENDMAIL_MAILHOST_MAP with
    outbox_relay_for."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        map_name: str = TRANSPORT_MAP,
        route: Callable[[RcptDecision], str | None] = transport_for,
    ) -> None:
        """engine gives the current engine (a reload replaces it)."""
        self._engine = engine
        self.map_name = map_name
        self._route = route
        self._routing: tuple[Engine, Engine] | None = None  # (engine, its routing engine)

    def _routing_engine(self) -> Engine:
        current = self._engine()
        if self._routing is None or self._routing[0] is not current:
            self._routing = (current, routing_engine(current))
        return self._routing[1]

    def __call__(self, request: SocketmapRequest) -> str:
        if request.name != self.map_name:
            return "PERM unknown map name"
        if "@" not in request.key:
            return NOT_FOUND  # a domain key: only addresses are ever routed
        decision = self._routing_engine().rcpt(RcptFacts(request.key), record=False)
        if decision.rule is RuleName.LOOKUP_FAILED:
            return "TEMP recipient directory unavailable"
        route = self._route(decision)
        return NOT_FOUND if route is None else f"OK {route}"


class _SocketmapConnection(StreamConnection):
    """One Postfix socketmap client connection."""

    def __init__(self, server: SocketmapServer) -> None:
        super().__init__(server)
        self._handler = server.handler
        self._decoder = SocketmapDecoder()

    def buffer_updated(self, nbytes: int) -> None:
        self.touch()
        replies: list[bytes] = []
        for item in self._decoder.feed(bytes(self.read_view[:nbytes])):
            if isinstance(item, SocketmapError):
                self.protocol_error(replies, item.reason)
                return
            try:
                reply = self._handler(item)
            except Exception:
                logger.exception("socketmap: lookup failed")
                reply = "TEMP internal error"
            replies.append(encode_reply(reply))
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))


class SocketmapServer(StreamServer[Handler]):
    """Serves socketmap lookups on one listen address with one handler (see
    policyd.stream.StreamServer for the options, start() and close())."""

    name = "socketmap"
    connection = _SocketmapConnection
