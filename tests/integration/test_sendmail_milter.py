"""The milter in the sendmail role against a real libmilter MTA side: Debian's `miltertest`
(from OpenDKIM) speaks the milter protocol as Sendmail does, driven by Lua scripts.

`traqmilter -c CFG milter` runs as its own process with `milter.role: sendmail`, so its
RCPT callback makes the RCPT-time decisions (no policy service). miltertest connects
through a recording proxy: miltertest checks what it can itself (its reply code, its
EOM checks), and the proxy keeps every packet the milter sent, so the tests also see the
exact reply texts and recipient changes on the wire. DSNs go to a capture server standing
in for the MTA's submission service.

miltertest must be installed (Debian package `miltertest`); the test fails without it,
except for a user who could not install it (not root), where it is skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path

import pytest

from tests.support.capture import CaptureServer
from tests.support.daemon_process import DaemonProcess
from tests.support.postfix import free_loopback_port
from traqmilter.core.plan import HOP_HEADER, ORIGINAL_TO_HEADER
from traqmilter.directory.sqlite import SqliteDirectory

MILTERTEST = "miltertest"
MILTERTEST_SECONDS = 60
DSN_SECONDS = 20.0
MAILBOXES = ("alice@example.com", "admin@fwd.example", "postmaster@example.com")
SENDER = "sender@remote.example"
THRESHOLD = 3
USER_UNKNOWN = "Recipient address rejected: User unknown"
BLOCKED = "Recipient address rejected: Too many unknown recipients from your address"

# Milter protocol reply commands (libmilter/mfdef.h).
CONTINUE, REPLYCODE, DISCARD, ACCEPT = "c", "y", "d", "a"
ADDRCPT, ADDRCPT_PAR, DELRCPT, ADDHEADER = "+", "2", "-", "h"


def _miltertest_or_skip() -> str:
    path = shutil.which(MILTERTEST)
    if path is not None:
        return path
    if os.geteuid() != 0:
        pytest.skip("miltertest is not installed and cannot be as non-root")
    pytest.fail("miltertest is missing: apt-get install miltertest (scripts/setup)")


# --------------------------------------------------------------------------- the wire


@dataclass
class Packet:
    command: str
    data: bytes

    @property
    def text(self) -> str:
        return self.data.rstrip(b"\0").decode("utf-8", "replace")


def parse_packets(stream: bytes) -> list[Packet]:
    """Milter packets: a 32-bit big-endian length (command byte included), command, data."""
    packets = []
    offset = 0
    while offset + 5 <= len(stream):
        (length,) = struct.unpack_from(">I", stream, offset)
        command = chr(stream[offset + 4])
        packets.append(Packet(command, stream[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return packets


class RecordingProxy:
    """A loopback TCP proxy in front of the milter that keeps what the milter sends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.received = bytearray()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _peer = self.listener.accept()
            except OSError:  # closed
                return
            milter = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            self.sockets += [client, milter]
            for source, sink, record in ((client, milter, False), (milter, client, True)):
                thread = threading.Thread(
                    target=self._pump, args=(source, sink, record), daemon=True
                )
                thread.start()
                self.threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if record:
                    with self.lock:
                        self.received += chunk
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def take(self) -> list[Packet]:
        """The milter's packets of the sessions that have ended, then forget them."""
        for thread in self.threads:
            thread.join(timeout=MILTERTEST_SECONDS)
        self.threads.clear()
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        with self.lock:
            packets = parse_packets(bytes(self.received))
            self.received.clear()
        return packets

    def close(self) -> None:
        self.listener.close()


# --------------------------------------------------------------------------- the MTA side


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def session_script(
    port: int,
    *,
    client: str,
    sender: str,
    recipients: Sequence[str],
    queue_id: str,
    checks: Sequence[tuple[str, ...]] = (),
) -> str:
    """A Lua script for one SMTP session as Sendmail 8.17 runs it with this milter: the
    default connect and MAIL macros, each RCPT, and DATA if a recipient was accepted, then
    headers, body and EOM unless the milter accepted the message at DATA (Sendmail then
    skips the milter for the rest of it). It prints "rcpt ADDRESS REPLY", "data REPLY",
    "eom REPLY" and "check OP ARGS true|false" for the eom_check()s given as (MT_op, arg, ...)."""
    lines = [
        "local function must(result, what)",
        "  if result ~= nil then mt.echo('failed ' .. what .. ': ' .. result); os.exit(2) end",
        "end",
        "local function reply(c) return string.char(math.floor(mt.getreply(c))) end",
        f'local conn = mt.connect("inet:{port}@127.0.0.1", 50, 0.1)',
        "if conn == nil then mt.echo('failed connect'); os.exit(2) end",
        "must(mt.negotiate(conn, nil, nil, nil), 'negotiate')",
        # The milter skips the connect step; Sendmail sends its macros all the same.
        "must(mt.macro(conn, SMFIC_CONNECT, 'j', 'mx.example.com', '_', "
        f"{_lua(f'client.test [{client}]')}, '{{daemon_name}}', 'MTA'), 'connect macros')",
        f"must(mt.macro(conn, SMFIC_MAIL, 'i', {_lua(queue_id)}, "
        f"'{{mail_addr}}', {_lua(sender)}), 'mail macros')",
        f"must(mt.mailfrom(conn, {_lua(f'<{sender}>')}), 'mailfrom')",
        "local accepted = false",
    ]
    for recipient in recipients:
        lines += [
            f"must(mt.macro(conn, SMFIC_RCPT, '{{rcpt_addr}}', {_lua(recipient)}), 'rcpt macros')",
            f"must(mt.rcptto(conn, {_lua(f'<{recipient}>')}), 'rcptto')",
            f"mt.echo('rcpt {recipient} ' .. reply(conn))",
            "if reply(conn) == 'c' then accepted = true end",
        ]
    lines += [
        "if accepted then",
        "  must(mt.data(conn), 'data')",
        "  mt.echo('data ' .. reply(conn))",
        "end",
        f"if accepted and reply(conn) ~= '{ACCEPT}' then",
        f"  must(mt.header(conn, 'From', {_lua(f'<{sender}>')}), 'header')",
        "  must(mt.header(conn, 'Subject', 'miltertest'), 'header')",
        "  must(mt.bodystring(conn, 'Hello from miltertest.\\r\\n'), 'body')",
        "  must(mt.eom(conn), 'eom')",
        "  mt.echo('eom ' .. reply(conn))",
    ]
    for op, *args in checks:
        call = ", ".join(["conn", op, *(_lua(a) for a in args)])
        lines.append(f"  mt.echo('check {op} {' '.join(args)} ' .. tostring(mt.eom_check({call})))")
    lines += ["end", "mt.disconnect(conn)"]
    return "\n".join(lines) + "\n"


@dataclass
class Session:
    rcpt: dict[str, str]
    data: str | None
    eom: str | None
    checks: dict[str, bool]
    packets: list[Packet]

    def sent(self, command: str) -> list[str]:
        return [p.text for p in self.packets if p.command == command]

    def reply_texts(self) -> list[str]:
        return self.sent(REPLYCODE)

    def added_recipients(self) -> list[tuple[str, str]]:
        """(address, ESMTP parameters) of each recipient added, with or without them."""
        added = []
        for packet in self.packets:
            if packet.command in (ADDRCPT, ADDRCPT_PAR):
                address, _, params = packet.data.rstrip(b"\0").partition(b"\0")
                added.append((address.decode(), params.decode()))
        return added

    def added_headers(self) -> dict[str, str]:
        return dict(
            tuple(p.data.rstrip(b"\0").decode().split("\0", 1))  # type: ignore[misc]
            for p in self.packets
            if p.command == ADDHEADER
        )


@dataclass
class Rig:
    root: Path
    miltertest: str
    proxy: RecordingProxy
    dsn_intake: CaptureServer
    milter: DaemonProcess
    sessions: int = field(default=0)

    def session(
        self,
        recipients: Sequence[str],
        *,
        client: str,
        sender: str = SENDER,
        checks: Sequence[tuple[str, ...]] = (),
    ) -> Session:
        self.sessions += 1
        script = self.root / f"session{self.sessions}.lua"
        script.write_text(
            session_script(
                self.proxy.port,
                client=client,
                sender=sender,
                recipients=recipients,
                queue_id=f"5AQID{self.sessions:04d}",
                checks=checks,
            )
        )
        run = subprocess.run(
            [self.miltertest, "-s", str(script)],
            capture_output=True,
            text=True,
            timeout=MILTERTEST_SECONDS,
            check=False,
        )
        assert run.returncode == 0, (run.stdout, run.stderr, self.milter.log())
        rcpt: dict[str, str] = {}
        data = eom = None
        results: dict[str, bool] = {}
        for line in run.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "rcpt":
                address, _, code = rest.rpartition(" ")
                rcpt[address] = code
            elif kind == "data":
                data = rest
            elif kind == "eom":
                eom = rest
            elif kind == "check":
                what, _, result = rest.rpartition(" ")
                results[what] = result == "true"
        return Session(rcpt, data, eom, results, self.proxy.take())


def config_yaml(root: Path, *, milter_port: int, dsn_port: int) -> str:
    return f"""\
state_dir: {root}/state
directory: {{sqlite: {root}/directory.sqlite}}
domains:
  example.com: {{}}
  fwd.example: {{action: forward, forward_to: admin}}
  old.example: {{action: readdress, readdress_to: example.com}}
  bounce.example: {{action: bounce}}
postmaster: postmaster@example.com
milter: {{listen: "inet:127.0.0.1:{milter_port}", role: sendmail}}
bounce: {{smtp_submit: "inet:127.0.0.1:{dsn_port}", reporting_mta: mx.example.com}}
queue: {{directory: {root}/queue}}
dictionary_attack: {{threshold: {THRESHOLD}, window: 10m, block: 1h, exempt: []}}
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    miltertest = _miltertest_or_skip()
    root = tmp_path_factory.mktemp("sendmail-milter")
    (root / "state").mkdir()
    (root / "queue").mkdir()
    store = SqliteDirectory(str(root / "directory.sqlite"))
    store.bulk_add(MAILBOXES)
    store.close()
    milter_port = free_loopback_port()
    with contextlib.ExitStack() as stack:
        dsn_intake = stack.enter_context(CaptureServer())
        config = root / "traqmilter.yaml"
        config.write_text(config_yaml(root, milter_port=milter_port, dsn_port=dsn_intake.port))
        milter = stack.enter_context(DaemonProcess(config, "milter", milter_port))
        proxy = RecordingProxy(milter_port)
        stack.callback(proxy.close)
        yield Rig(root, miltertest, proxy, dsn_intake, milter)


def test_unknown_recipient_is_rejected_in_postfixs_words(rig: Rig) -> None:
    session = rig.session(["nobody@example.com", "alice@example.com"], client="192.0.2.1")
    assert session.rcpt == {"nobody@example.com": REPLYCODE, "alice@example.com": CONTINUE}
    assert session.reply_texts() == [f"550 5.1.1 <nobody@example.com>: {USER_UNKNOWN}"]
    # Nothing to do for the known recipient: accepted at DATA, no headers, body or EOM.
    assert session.data == ACCEPT and session.eom is None
    assert session.sent(DELRCPT) == [] and session.added_recipients() == []


def test_forward_replaces_the_unknown_recipients_with_one_copy(rig: Rig) -> None:
    session = rig.session(
        ["x@fwd.example", "y@fwd.example"],
        client="192.0.2.2",
        checks=[
            ("MT_RCPTDELETE", "<x@fwd.example>"),
            ("MT_RCPTDELETE", "<y@fwd.example>"),
            ("MT_HDRADD", ORIGINAL_TO_HEADER),
            ("MT_HDRADD", HOP_HEADER),
        ],
    )
    assert session.rcpt == {"x@fwd.example": CONTINUE, "y@fwd.example": CONTINUE}
    assert session.data == CONTINUE and session.eom == CONTINUE
    assert all(session.checks.values()) and len(session.checks) == 4, session.checks
    assert session.sent(DELRCPT) == ["<x@fwd.example>", "<y@fwd.example>"]
    assert session.added_recipients() == [("<admin@fwd.example>", "")]
    assert session.added_headers()[ORIGINAL_TO_HEADER] == "<x@fwd.example>, <y@fwd.example>"


def test_readdress_moves_the_recipient_to_the_new_domain(rig: Rig) -> None:
    session = rig.session(
        ["carol+news@old.example"],
        client="192.0.2.3",
        checks=[("MT_RCPTDELETE", "<carol+news@old.example>"), ("MT_HDRADD", HOP_HEADER)],
    )
    assert session.rcpt == {"carol+news@old.example": CONTINUE}
    assert session.eom == CONTINUE
    assert all(session.checks.values()) and len(session.checks) == 2, session.checks
    # The original recipient travels on as ORCPT (xtext: "+" is "+2B").
    assert session.added_recipients() == [
        ("<carol+news@example.com>", "ORCPT=rfc822;carol+2Bnews@old.example")
    ]


def test_bounce_hands_one_dsn_over_and_keeps_the_known_recipient(rig: Rig) -> None:
    rig.dsn_intake.clear()
    session = rig.session(
        ["gone@bounce.example", "alice@example.com"],
        client="192.0.2.4",
        checks=[("MT_RCPTDELETE", "<gone@bounce.example>")],
    )
    assert session.rcpt == {"gone@bounce.example": CONTINUE, "alice@example.com": CONTINUE}
    assert session.eom == CONTINUE
    assert session.checks == {"MT_RCPTDELETE <gone@bounce.example>": True}
    (dsn,) = rig.dsn_intake.wait_for(1, DSN_SECONDS)
    assert dsn.mail_from == "" and [r.address for r in dsn.recipients] == [SENDER]
    report = message_from_bytes(dsn.data, policy=email_policy.default)
    assert report.get_content_type() == "multipart/report"
    assert "Final-Recipient: rfc822; gone@bounce.example" in dsn.data.decode()


def test_bounce_alone_discards_the_message_after_the_dsn(rig: Rig) -> None:
    rig.dsn_intake.clear()
    session = rig.session(["gone@bounce.example"], client="192.0.2.5")
    assert session.eom == DISCARD
    assert len(rig.dsn_intake.wait_for(1, DSN_SECONDS)) == 1


def test_harvester_is_blocked_and_postmaster_still_reached(rig: Rig) -> None:
    harvester = "198.51.100.7"
    guesses = [f"guess{n}@example.com" for n in range(THRESHOLD + 1)]  # the last one blocks
    session = rig.session(
        [*guesses, "alice@example.com", "postmaster@example.com"], client=harvester
    )
    assert session.rcpt == {
        **{g: REPLYCODE for g in guesses},
        "alice@example.com": REPLYCODE,
        "postmaster@example.com": CONTINUE,
    }
    texts = session.reply_texts()
    assert texts[:THRESHOLD] == [f"550 5.1.1 <{g}>: {USER_UNKNOWN}" for g in guesses[:-1]]
    assert texts[THRESHOLD].startswith(f"450 4.7.1 <{guesses[-1]}>: {BLOCKED}")
    assert texts[THRESHOLD + 1].startswith(f"450 4.7.1 <alice@example.com>: {BLOCKED}")
    # The block outlives the session: a new connection from that client is still refused.
    again = rig.session(["alice@example.com"], client=harvester)
    assert again.rcpt == {"alice@example.com": REPLYCODE}


def test_null_sender_to_unknown_is_refused_but_not_counted(rig: Rig) -> None:
    server = "203.0.113.9"
    gone = [f"old{n}@example.com" for n in range(THRESHOLD * 2)]
    session = rig.session(gone, client=server, sender="")
    assert session.reply_texts() == [f"550 5.1.1 <{g}>: {USER_UNKNOWN}" for g in gone]
    later = rig.session(["alice@example.com"], client=server)
    assert later.rcpt == {"alice@example.com": CONTINUE} and later.data == ACCEPT
