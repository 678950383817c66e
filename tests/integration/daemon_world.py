"""Helpers for the daemon-process tests: a config with a SQLite directory holding the
postmaster, a blocking policy client (one persistent connection, like one smtpd process),
and the dictionary-attack probe that shows which threshold a running policyd applies."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.postfix import free_loopback_port
from traqmilter.core.address import parse_address
from traqmilter.directory.sqlite import SqliteDirectory

TIMEOUT = 10.0
KNOWN = "admin@example.com"


def write_config(path: Path, *, root: Path, threshold: int, policyd: str, extra: str = "") -> None:
    path.write_text(
        f"""\
state_dir: {root}/state
directory: {{sqlite: {root}/state/directory.sqlite}}
domains:
  example.com: {{}}
postmaster: {KNOWN}
dictionary_attack: {{threshold: {threshold}, window: 10m, block: 1h, exempt: []}}
queue: {{directory: {root}/no-queue}}
policyd:
{policyd}
{extra}"""
    )
    path.chmod(0o644)  # the daemon re-reads it on SIGHUP, after dropping root


def inet_policyd(port: int) -> str:
    """The `policyd:` section of write_config for policyd on 127.0.0.1:port (and its
    socketmap on another free port)."""
    return (
        f'  listen: "inet:127.0.0.1:{port}"\n'
        f'  socketmap_listen: "inet:127.0.0.1:{free_loopback_port()}"\n'
    )


def make_directory(root: Path) -> None:
    """The SQLite store with the postmaster's mailbox (start-up refuses a config whose
    postmaster does not exist)."""
    (root / "state").mkdir(exist_ok=True)
    store = SqliteDirectory(str(root / "state" / "directory.sqlite"))
    try:
        store.add_mailbox(parse_address(KNOWN))
    finally:
        store.close()


def rcpt_request(recipient: str, client: str) -> bytes:
    """A request as Postfix sends it at RCPT time."""
    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": client,
        "client_name": "unknown",
        "helo_name": "harvester.example",
        "sender": "someone@sender.example",
        "recipient": recipient,
        "queue_id": "",
        "instance": "1.2.3",
    }
    return "".join(f"{k}={v}\n" for k, v in attributes.items()).encode() + b"\n"


class PolicyConnection:
    def __init__(self, *, unix_path: str = "", port: int = 0) -> None:
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(unix_path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def ask(self, request: bytes) -> str:
        """The action of the reply; AssertionError if the server closes instead."""
        self.sock.sendall(request)
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "policyd closed the connection without a reply"
            self.buffer += chunk
        reply, _, self.buffer = self.buffer.partition(b"\n\n")
        text = reply.decode()
        assert text.startswith("action="), text
        return text[len("action=") :]

    def close(self) -> None:
        self.sock.close()


def is_block(action: str) -> bool:
    return action.startswith(("450 4.7.1", "421 4.7.1"))


def unknown_until_blocked(connection: PolicyConnection, client: str, limit: int = 50) -> int:
    """The attempt at which policyd answers `client`'s unknown recipients with a block: for
    a fresh client, dictionary_attack.threshold + 1."""
    for attempt in range(1, limit + 1):
        action = connection.ask(rcpt_request(f"nobody{attempt}@example.com", client))
        if is_block(action):
            return attempt
        assert action.startswith("550 5.1.1"), action
    raise AssertionError(f"{client} not blocked after {limit} unknown recipients")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
