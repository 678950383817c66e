"""Handing a DSN to the local MTA, never to a remote MX (SPEC 2: queues belong to the MTA).

Two ways, chosen by `bounce.submit`:
- smtp: MAIL FROM:<> over SMTP to `bounce.smtp_submit`, a loopback smtpd of the MTA that
  runs no milter and no policy service (contrib/postfix/master.cf.fragment), so the DSN is
  neither judged again nor re-entered into this milter. Handed over = 250 after DATA.
- sendmail: `bounce.sendmail_command` with the recipient appended after "--"; the command
  reads the DSN on standard input. Handed over = exit status 0.

Either way the hand-over is bounded by `bounce.submit_timeout`, and anything short of the
MTA taking responsibility raises SubmitError: the milter then tempfails the original
message (SPEC 7), so the sender retries and no failure report is ever lost.

SECURITY: the recipient is the original envelope sender, already parsed by core.dsn (no
control characters); with sendmail it follows "--", so it can never be read as an option.

BUGS: if the milter dies after the MTA took the DSN but before Postfix saw the end-of-message
reply, the original is tempfailed and a retry sends a second DSN. A duplicate report is the
price of never losing one.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Protocol

from traqmilter.core.listen import parse_listen
from traqmilter.core.settings import BounceSettings

MAX_REPORTED_OUTPUT = 300  # characters of the MTA's complaint kept for the log


class SubmitError(Exception):
    """The MTA did not take the DSN; str() says why (safe to log)."""


class Outgoing(Protocol):
    """What a submitter reads of a message: a DSN (core.dsn) or a digest (core.digest),
    both sent with the null envelope sender."""

    @property
    def envelope_recipient(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def smtputf8(self) -> bool: ...
    @property
    def body_8bitmime(self) -> bool: ...


class DsnSubmitter(Protocol):
    def submit(self, dsn: Outgoing) -> None:
        """Hand dsn to the MTA; return only once it has taken responsibility for it.
        Raises SubmitError otherwise."""
        ...


class _UnixSMTP(smtplib.SMTP):
    """smtplib's SMTP over a unix-domain socket: the "host" is the socket path."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(host)
        except BaseException:
            sock.close()
            raise
        return sock


class SmtpSubmitter:
    """DSN submission over SMTP to the MTA's loopback service for DSNs."""

    def __init__(self, listen: str, *, timeout: float, local_hostname: str = "localhost") -> None:
        self.listen = listen
        self.timeout = timeout
        self.local_hostname = local_hostname

    def _client(self) -> smtplib.SMTP:
        address = parse_listen(self.listen)
        if address.family == "unix":
            return _UnixSMTP(address.path, local_hostname=self.local_hostname, timeout=self.timeout)
        return smtplib.SMTP(
            address.host, address.port, local_hostname=self.local_hostname, timeout=self.timeout
        )

    def submit(self, dsn: Outgoing) -> None:
        options = []
        if dsn.smtputf8:
            options.append("SMTPUTF8")
        if dsn.body_8bitmime:
            options.append("BODY=8BITMIME")
        try:
            client = self._client()
        except (OSError, smtplib.SMTPException) as exc:
            raise SubmitError(f"cannot connect to {self.listen}: {brief(exc)}") from exc
        try:
            client.ehlo_or_helo_if_needed()
            # sendmail() raises unless MAIL, the RCPT and DATA all succeed.
            client.sendmail("", [dsn.envelope_recipient], dsn.data, mail_options=options)
        except (OSError, smtplib.SMTPException) as exc:
            raise SubmitError(f"{self.listen} refused the DSN: {brief(exc)}") from exc
        finally:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()


class SendmailSubmitter:
    """DSN submission through the MTA's sendmail command."""

    def __init__(self, command: tuple[str, ...], *, timeout: float) -> None:
        if not command:
            raise ValueError("sendmail command is empty")
        self.command = command
        self.timeout = timeout

    def submit(self, dsn: Outgoing) -> None:
        # sendmail(1) reads a UNIX text stream: LF line ends.
        data = dsn.data.replace(b"\r\n", b"\n")
        argv = [*self.command, "--", dsn.envelope_recipient]
        try:
            completed = subprocess.run(
                argv,
                input=data,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SubmitError(f"{self.command[0]}: {brief(exc)}") from exc
        if completed.returncode != 0:
            output = (completed.stderr or completed.stdout).decode("utf-8", "replace")
            raise SubmitError(
                f"{self.command[0]} exited with {completed.returncode}: {brief(output)}"
            )


class ConfiguredSubmitter:
    """The submitter the current `bounce:` settings name: rebuilt when a reload changes
    them, so the next DSN goes where the new config says (thread-safe: libmilter calls it
    from each session's thread)."""

    def __init__(self, settings: Callable[[], BounceSettings], *, local_hostname: str) -> None:
        self.settings = settings
        self.local_hostname = local_hostname
        self._lock = threading.Lock()
        self._built_for: BounceSettings | None = None
        self._current: DsnSubmitter | None = None

    def current(self) -> DsnSubmitter:
        settings = self.settings()
        with self._lock:
            if self._current is None or settings != self._built_for:
                self._current = open_submitter(settings, local_hostname=self.local_hostname)
                self._built_for = settings
            return self._current

    def submit(self, dsn: Outgoing) -> None:
        self.current().submit(dsn)


def open_submitter(settings: BounceSettings, *, local_hostname: str) -> DsnSubmitter:
    """The submitter the `bounce:` settings name."""
    if settings.submit == "sendmail":
        return SendmailSubmitter(settings.sendmail_command, timeout=settings.submit_timeout)
    return SmtpSubmitter(
        settings.smtp_submit, timeout=settings.submit_timeout, local_hostname=local_hostname
    )


def brief(problem: object) -> str:
    text = " ".join(str(problem).split())
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:MAX_REPORTED_OUTPUT]
