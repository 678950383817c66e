"""CaptureServer: the "outside world" for Postfix tests.

A small ESMTP server on 127.0.0.1 (port chosen by the OS) that accepts every transaction
and records it: envelope sender and recipients with their ESMTP parameters (SIZE, BODY,
RET, ENVID, NOTIFY, ORCPT, ...) and the message bytes as received (dot-unstuffed, CRLF
line ends kept). Postfix relays all non-local mail here (see tests/support/postfix.py).
Standard library only; one thread per SMTP session.

SECURITY: test code only; it listens on loopback and bounds line length and message size.
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# RFC 5321 allows 512 octets per command line and 1000 per text line; leave some slack
# for ESMTP parameters, but never read an unbounded line.
MAX_LINE_BYTES = 4096
MAX_MESSAGE_BYTES = 50 * 1024 * 1024

# Reply to a RCPT TO address: "250 2.1.5 Ok" accepts, any other reply is sent as given.
RcptReply = Callable[[str], str]


def accept_every_recipient(_address: str) -> str:
    """The default RCPT policy: accept everything."""
    return "250 2.1.5 Ok"


@dataclass(frozen=True)
class Recipient:
    """One accepted RCPT TO: the address and its ESMTP parameters (NOTIFY, ORCPT, ...)."""

    address: str
    options: dict[str, str | None]


@dataclass(frozen=True)
class Transaction:
    """One completed mail transaction as the capture server received it."""

    helo: str
    mail_from: str
    mail_options: dict[str, str | None]
    recipients: tuple[Recipient, ...]
    data: bytes

    @property
    def rcpt_tos(self) -> list[str]:
        """The envelope recipient addresses, in RCPT order."""
        return [recipient.address for recipient in self.recipients]


def parse_path_and_options(argument: str) -> tuple[str, dict[str, str | None]]:
    """Split "<addr> KEY=VALUE KEY" (after "FROM:" or "TO:") into address and parameters.

    Parameter names are upper-cased; values are kept as sent (xtext is not decoded).
    """
    argument = argument.strip()
    if argument.startswith("<"):
        end = argument.find(">")
        if end < 0:
            raise ValueError(f"unterminated path: {argument!r}")
        address, rest = argument[1:end], argument[end + 1 :]
    else:
        address, _, rest = argument.partition(" ")
    options: dict[str, str | None] = {}
    for word in rest.split():
        name, sep, value = word.partition("=")
        options[name.upper()] = value if sep else None
    return address, options


@dataclass
class _Session:
    helo: str = ""
    mail_from: str | None = None
    mail_options: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)

    def reset(self) -> None:
        self.mail_from = None
        self.mail_options = {}
        self.recipients = []


class _SmtpHandler(socketserver.StreamRequestHandler):
    server: _CaptureTCPServer
    timeout = 30

    def handle(self) -> None:
        try:
            self._session()
        except (TimeoutError, ConnectionError):
            # Postfix caches idle connections and drops them when it likes: not an error.
            return

    def _session(self) -> None:
        self._reply("220 capture.test ESMTP")
        session = _Session()
        while True:
            line = self.rfile.readline(MAX_LINE_BYTES)
            if not line:
                return
            if not line.endswith(b"\n"):
                self._reply("500 5.5.2 Line too long")
                return
            command, _, argument = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            verb = command.upper()
            if verb == "QUIT":
                self._reply("221 2.0.0 Bye")
                return
            self._command(session, verb, argument)

    def _command(self, session: _Session, verb: str, argument: str) -> None:
        if verb == "EHLO":
            session.helo = argument
            session.reset()
            self._reply(
                "250-capture.test",
                "250-PIPELINING",
                f"250-SIZE {MAX_MESSAGE_BYTES}",
                "250-8BITMIME",
                "250-SMTPUTF8",
                "250-DSN",
                "250 ENHANCEDSTATUSCODES",
            )
        elif verb == "HELO":
            session.helo = argument
            session.reset()
            self._reply("250 capture.test")
        elif verb == "MAIL" and argument[:5].upper() == "FROM:":
            session.reset()
            session.mail_from, session.mail_options = parse_path_and_options(argument[5:])
            self._reply("250 2.1.0 Ok")
        elif verb == "RCPT" and argument[:3].upper() == "TO:":
            if session.mail_from is None:
                self._reply("503 5.5.1 Error: need MAIL command")
                return
            address, options = parse_path_and_options(argument[3:])
            reply = self.server.rcpt_reply(address)
            if reply.startswith("250"):
                session.recipients.append(Recipient(address, options))
            self._reply(reply)
        elif verb == "DATA":
            self._data(session)
        elif verb == "RSET":
            session.reset()
            self._reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            self._reply("250 2.0.0 Ok")
        else:
            self._reply("502 5.5.2 Error: command not recognized")

    def _data(self, session: _Session) -> None:
        if session.mail_from is None or not session.recipients:
            self._reply("503 5.5.1 Error: need RCPT command")
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(MAX_LINE_BYTES)
            if not line:
                return
            if line in (b".\r\n", b".\n"):
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size > MAX_MESSAGE_BYTES:
                self._reply("552 5.3.4 Message too big")
                return
            lines.append(line)
        self.server.record(
            Transaction(
                helo=session.helo,
                mail_from=session.mail_from,
                mail_options=session.mail_options,
                recipients=tuple(session.recipients),
                data=b"".join(lines),
            )
        )
        session.reset()
        self._reply("250 2.0.0 Ok: captured")

    def _reply(self, *lines: str) -> None:
        self.wfile.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))


class _CaptureTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, rcpt_reply: RcptReply, address: tuple[str, int]) -> None:
        super().__init__(address, _SmtpHandler)
        self.rcpt_reply = rcpt_reply
        self.transactions: list[Transaction] = []
        self.changed = threading.Condition()

    def record(self, transaction: Transaction) -> None:
        with self.changed:
            self.transactions.append(transaction)
            self.changed.notify_all()


class CaptureServer:
    """A recording SMTP server on 127.0.0.1, running in a background thread.

    Use as a context manager, or call start()/stop(). `rcpt_reply` decides the reply to each
    RCPT TO (default: accept all), so a test can make the outside world refuse a recipient.
    `host` and `port` place it elsewhere on loopback (another "host" on the same port, as
    an MTA whose relay mailer has one port for every host sees it); port 0: the OS's choice.
    """

    def __init__(
        self, rcpt_reply: RcptReply = accept_every_recipient, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._server = _CaptureTCPServer(rcpt_reply, (host, port))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    @property
    def host(self) -> str:
        host: str = self._server.server_address[0]
        return host

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    @property
    def transactions(self) -> list[Transaction]:
        """A snapshot of every transaction captured so far."""
        with self._server.changed:
            return list(self._server.transactions)

    def start(self) -> CaptureServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the socket; sessions in progress are abandoned."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def clear(self) -> None:
        """Forget the transactions captured so far."""
        with self._server.changed:
            self._server.transactions.clear()

    def wait_for(self, count: int, timeout: float) -> list[Transaction]:
        """Wait until at least `count` transactions were captured; return all of them.

        Raises TimeoutError (with what was captured) when they do not arrive in time.
        """
        deadline = time.monotonic() + timeout
        with self._server.changed:
            while len(self._server.transactions) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"captured {len(self._server.transactions)} of {count} transactions "
                        f"in {timeout} s: {self._server.transactions!r}"
                    )
                self._server.changed.wait(remaining)
            return list(self._server.transactions)

    def __enter__(self) -> CaptureServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
