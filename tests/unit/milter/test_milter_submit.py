"""DSN hand-over: over SMTP to a loopback listener, or through a sendmail command."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import capture
from tests.support.capture import CaptureServer
from traqmilter.core.dsn import DsnMessage
from traqmilter.core.settings import BounceSettings
from traqmilter.milter.submit import (
    SendmailSubmitter,
    SmtpSubmitter,
    SubmitError,
    open_submitter,
)

DATA = b"From: MAILER-DAEMON@mx.example.com\r\nSubject: report\r\n\r\nbody\r\n.dot line\r\n"


def make_dsn(recipient: str = "sender@remote.example", *, smtputf8: bool = False) -> DsnMessage:
    return DsnMessage(
        envelope_recipient=recipient,
        data=DATA,
        message_id="<1@mx.example.com>",
        recipients=("zed@example.com",),
        smtputf8=smtputf8,
        body_8bitmime=False,
        returned_content="headers",
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_smtp_hands_over_with_a_null_sender() -> None:
    with CaptureServer() as server:
        SmtpSubmitter(f"inet:127.0.0.1:{server.port}", timeout=10).submit(make_dsn())
        (transaction,) = server.wait_for(1, timeout=10)
    assert transaction.mail_from == ""
    assert transaction.rcpt_tos == ["sender@remote.example"]
    assert transaction.data == DATA


def test_smtp_refusal_raises() -> None:
    with CaptureServer(rcpt_reply=lambda _a: "550 5.1.1 no such user") as server:
        submitter = SmtpSubmitter(f"inet:127.0.0.1:{server.port}", timeout=10)
        with pytest.raises(SubmitError, match="refused the DSN"):
            submitter.submit(make_dsn())
        assert server.transactions == []


def test_smtp_unreachable_raises() -> None:
    submitter = SmtpSubmitter(f"inet:127.0.0.1:{free_port()}", timeout=10)
    with pytest.raises(SubmitError, match="cannot connect"):
        submitter.submit(make_dsn())


class _UnixCapture(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        super().__init__(path, capture._SmtpHandler)
        self.rcpt_reply = capture.accept_every_recipient
        self.transactions: list[capture.Transaction] = []
        self.changed = threading.Condition()

    def record(self, transaction: capture.Transaction) -> None:
        with self.changed:
            self.transactions.append(transaction)


@pytest.fixture
def unix_capture(tmp_path: Path) -> Iterator[tuple[str, _UnixCapture]]:
    path = str(tmp_path / "dsn.sock")
    server = _UnixCapture(path)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield path, server
    server.shutdown()
    thread.join()
    server.server_close()


def test_smtp_over_a_unix_socket(unix_capture: tuple[str, _UnixCapture]) -> None:
    path, server = unix_capture
    SmtpSubmitter(f"unix:{path}", timeout=10).submit(make_dsn(smtputf8=True))
    (transaction,) = server.transactions
    assert transaction.mail_from == "" and "SMTPUTF8" in transaction.mail_options


def write_command(tmp_path: Path, body: str) -> tuple[str, ...]:
    script = tmp_path / "fake-sendmail"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return (str(script), "-i", "-f", "")


def test_sendmail_gets_the_dsn_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = write_command(tmp_path, f'cat > {out}; printf "%s|" "$@" > {out}.argv')
    SendmailSubmitter(command, timeout=10).submit(make_dsn("-oQ/tmp@remote.example"))
    assert out.read_bytes() == DATA.replace(b"\r\n", b"\n")
    assert (tmp_path / "out.argv").read_text() == "-i|-f||--|-oQ/tmp@remote.example|"


def test_sendmail_failure_raises(tmp_path: Path) -> None:
    command = write_command(tmp_path, 'echo "postdrop: queue file write error" >&2; exit 75')
    with pytest.raises(SubmitError, match="exited with 75: postdrop: queue file write error"):
        SendmailSubmitter(command, timeout=10).submit(make_dsn())


def test_sendmail_missing_program_raises(tmp_path: Path) -> None:
    with pytest.raises(SubmitError):
        SendmailSubmitter((str(tmp_path / "absent"),), timeout=10).submit(make_dsn())


def test_open_submitter_follows_the_settings() -> None:
    smtp = open_submitter(BounceSettings(), local_hostname="mx.example.com")
    assert isinstance(smtp, SmtpSubmitter) and smtp.listen == "inet:127.0.0.1:10026"
    sendmail = open_submitter(BounceSettings(submit="sendmail"), local_hostname="x")
    assert isinstance(sendmail, SendmailSubmitter)
    assert sendmail.command == ("/usr/sbin/sendmail", "-i", "-f", "")
