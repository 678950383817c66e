"""Send one message over SMTP and report every reply, refused recipients included.

smtplib's sendmail() raises as soon as something is refused; tests need to see exactly
what MAIL, each RCPT and DATA got, so this uses the low-level mail()/rcpt()/data() calls.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: the code and the text (enhanced status code included)."""

    code: int
    text: str

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass
class SendResult:
    """What the server answered to one transaction.

    `data` is None when DATA was not sent (no recipient accepted, or the session ended).
    `disconnected` is True when the server closed the session (e.g. after a 421).
    """

    mail: Reply
    rcpts: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None
    disconnected: bool = False

    @property
    def accepted(self) -> list[str]:
        return [address for address, reply in self.rcpts.items() if reply.positive]


def make_message(
    sender: str, recipients: Sequence[str], subject: str = "test", body: str = "Hello.\n"
) -> bytes:
    """A complete RFC 5322 message (From, To, Date, Message-ID present, CRLF line ends),
    so Postfix has no header to add and relayed copies can be compared byte for byte."""
    message = EmailMessage()
    message["From"] = sender or "MAILER-DAEMON@sender.test"
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="client.test")
    message.set_content(body)
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def _reply(code: int, text: bytes | str) -> Reply:
    return Reply(code, text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def send_message(
    host: str,
    port: int,
    *,
    sender: str,
    recipients: Sequence[str],
    message: bytes | None = None,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
    source_address: str | None = None,
    helo: str = "client.test",
    timeout: float = 30.0,
    login: tuple[str, str] | None = None,
) -> SendResult:
    """Run one SMTP transaction and return every reply; never raises on a refusal.

    `message` defaults to make_message(sender, recipients). `source_address` binds the
    client side (e.g. 127.0.0.2 to connect as a different loopback client). `login`: user
    and password for SMTP AUTH before MAIL (a refusal raises). Connection
    failures and timeouts still raise: a test cannot go on without its server.
    """
    if message is None:
        message = make_message(sender, recipients)
    client = smtplib.SMTP(
        host,
        port,
        local_hostname=helo,
        timeout=timeout,
        source_address=(source_address, 0) if source_address else None,
    )
    result: SendResult | None = None
    try:
        client.ehlo()
        if login is not None:
            client.login(*login)
        result = SendResult(mail=_reply(*client.mail(sender, list(mail_options))))
        if not result.mail.positive:
            client.rset()
            return result
        for recipient in recipients:
            result.rcpts[recipient] = _reply(*client.rcpt(recipient, list(rcpt_options)))
        if not result.accepted:
            client.rset()
            return result
        try:
            result.data = _reply(*client.data(message))
        except smtplib.SMTPDataError as refused:
            # DATA itself was refused (no 354).
            result.data = _reply(refused.smtp_code, refused.smtp_error)
        return result
    except smtplib.SMTPServerDisconnected:
        if result is None:
            raise
        result.disconnected = True
        return result
    finally:
        try:
            client.quit()
        except smtplib.SMTPServerDisconnected:
            client.close()
