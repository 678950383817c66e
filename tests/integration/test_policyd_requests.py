"""The running policyd (`traqmilter policyd`, a child process, real sockets) on what other
policy clients than Postfix send: CR LF line ends, RCPT requests that name no recipient;
and the dictionary-attack threshold counted through it."""

from __future__ import annotations

from pathlib import Path

from tests.integration.daemon_world import (
    KNOWN,
    PolicyConnection,
    inet_policyd,
    is_block,
    make_directory,
    rcpt_request,
    write_config,
)
from tests.support.daemon_process import DaemonProcess
from tests.support.postfix import free_loopback_port

THRESHOLD = 2
CLIENT = "203.0.113.9"
WARNING = "RCPT request without a recipient"


def crlf(request: bytes) -> bytes:
    return request.replace(b"\n", b"\r\n")


def without_recipient(client: str) -> bytes:
    return rcpt_request("omitted", client).replace(b"recipient=omitted\n", b"")


def test_crlf_requests_and_requests_without_recipient(tmp_path: Path) -> None:
    make_directory(tmp_path)
    port = free_loopback_port()
    config = tmp_path / "traqmilter.yaml"
    write_config(config, root=tmp_path, threshold=THRESHOLD, policyd=inet_policyd(port))
    with DaemonProcess(config, "policyd", port) as daemon:
        first, second = PolicyConnection(port=port), PolicyConnection(port=port)
        try:
            # CR LF line ends are read as LF: the same answers, on a connection kept open.
            assert first.ask(crlf(rcpt_request(KNOWN, CLIENT))) == "DUNNO"
            # No recipient named (empty or left out), LF or CR LF: no opinion, nothing
            # counted, one warning per connection.
            for request in (
                rcpt_request("", CLIENT),
                without_recipient(CLIENT),
                crlf(without_recipient(CLIENT)),
                rcpt_request("", CLIENT),
            ):
                assert first.ask(request) == "DUNNO"
            assert second.ask(without_recipient(CLIENT)) == "DUNNO"
            # threshold: 2 answers two unknown recipients honestly (the requests without a
            # recipient counted nothing) and blocks at the third, CR LF or not.
            for n in range(THRESHOLD):
                action = first.ask(crlf(rcpt_request(f"nobody{n}@example.com", CLIENT)))
                assert action.startswith("550 5.1.1"), action
            assert is_block(second.ask(rcpt_request("nobody-past@example.com", CLIENT)))
            assert is_block(first.ask(crlf(rcpt_request(KNOWN, CLIENT))))
        finally:
            first.close()
            second.close()
        assert daemon.stop() == 0
        log = daemon.log()
    warnings = [line for line in log.splitlines() if WARNING in line]
    assert len(warnings) == 2, log  # one per connection
    assert all("warning:" in line and f"client {CLIENT}" in line for line in warnings), warnings
    assert f"block: client={CLIENT} attempts={THRESHOLD + 1} " in log, log
    assert "Traceback" not in log and "protocol error" not in log, log
